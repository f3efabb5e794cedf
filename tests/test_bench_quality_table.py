"""benchmarks/bench_quality.py: its markdown (one column per setting and mode that some run fills) and,
with bench_mipp.py and bench_cmi.py, their refusal without the shared material."""

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quality  # noqa: E402


def _run(setting, acc, **extra):
    return {"criterion": "recon", "seed": 0, "setting": setting, "compensation": "lstsq", "acc": acc,
            "flops_ratio": 0.4, "rank_samples": 256, "compensation_samples": 2048, "rank_seconds": 1.0,
            "compensation_seconds": 2.0, **extra}


def test_a_budgets_sensitivity_grid_is_its_own_column_and_no_column_is_empty():
    results = {"dense_acc": 0.9, "test_images": 10000, "machine": "m", "commands": ["python bench"],
               "runs": [_run("uniform:0.4", 0.871), _run("flops:0.4", 0.881),
                        _run("flops:0.4", 0.884, sensitivity_fractions=[0.9, 0.75, 0.5, 0.25, 0.1])]}
    lines = bench_quality.markdown(results).splitlines()
    head = next(line for line in lines if line.startswith("| criterion"))
    assert [c.strip() for c in head.strip("|").split("|")] == [
        "criterion", "N", "uniform:0.4 lstsq 2048", "flops:0.4 lstsq 2048", "flops:0.4 lstsq 2048, 5 fractions"]
    row = next(line for line in lines if line.startswith("| recon"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["recon", "256", "87.1", "88.1 (40.0%)", "88.4 (40.0%)"]


def test_missing_shared_material_is_one_line_and_exit_2_with_nothing_written(tmp_path):
    # the scripts beside a checkout that has no ../shared: a user's clone, or CI without the material
    bench = tmp_path / "repo" / "benchmarks"
    bench.mkdir(parents=True)
    for name in ("bench_quality.py", "bench_mipp.py", "bench_cmi.py"):
        shutil.copy(Path(bench_quality.__file__).parent / name, bench / name)
    out = tmp_path / "out"
    for script, extra in (("bench_quality.py", ["--out", str(out)]), ("bench_mipp.py", []), ("bench_cmi.py", [])):
        proc = subprocess.run([sys.executable, str(bench / script), *extra], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "vgg16_bn_cifar10.pt" in lines[0] and "cifar10-jpeg.tar.gz" in lines[0]
    assert not out.exists() and not (tmp_path / "repo" / ".data").exists()
