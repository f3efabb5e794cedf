"""benchmarks/bench_quality.py: its markdown (one column per setting and mode that some run fills) and,
with bench_mipp.py and bench_cmi.py, their refusal without the shared material."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_ranking_seconds_give_the_range_when_a_row_gathers_several_rankings():
    # cmi ranks once per keep ratio and random once per seed; the line used to show only the last record's time
    results = {"dense_acc": 0.9, "test_images": 10000, "machine": "m", "commands": ["python bench"],
               "runs": [_run("uniform:0.4", 0.871, rank_seconds=195.8), _run("uniform:0.6", 0.833, rank_seconds=195.8),
                        _run("uniform:0.3682", 0.62, rank_seconds=187.7),
                        _run("uniform:0.4", 0.865, criterion="l1", rank_seconds=0.0)]}
    line = next(x for x in bench_quality.markdown(results).splitlines() if x.startswith("Ranking seconds"))
    assert line == "Ranking seconds: recon (N=256): 187.7-195.8 s; l1 (N=256): 0.0 s."


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


def test_a_matched_cut_takes_the_reference_criterions_counts_for_the_same_seed_mode_and_grid():
    def rec(criterion, counts, **kw):
        r = {"criterion": criterion, "seed": 0, "setting": "flops:0.4", "compensation": "lstsq", "rank_samples": 256,
             "compensation_samples": 2048, "kept_counts": {"c0": counts}}
        r.update(kw)
        return r

    results = {"runs": [rec("l1", 1), rec("recon", 2, seed=1), rec("recon", 3, compensation="none",
                                                                      compensation_samples=None),
                        rec("recon", 4, rank_samples=1024), rec("recon", 5, sensitivity_fractions=[0.9, 0.5, 0.1]),
                        rec("recon", 6), rec("recon", 7, setting="flops:0.2")]}
    grid = tuple(bench_quality.SENSITIVITY_FRACTIONS)

    def counts(**kw):
        args = {"reference": "recon", "seed": 0, "mode": "lstsq", "compensation_samples": 2048, "fractions": grid}
        args.update(kw)
        return bench_quality.matched_counts(results, "matched:flops:0.4", **args)

    assert counts() == {"c0": 6}
    assert counts(seed=1) == {"c0": 2}
    assert counts(mode="none", compensation_samples=None) == {"c0": 3}
    assert counts(fractions=(0.9, 0.5, 0.1)) == {"c0": 5}
    assert counts(reference="l1") == {"c0": 1}
    assert counts(compensation_samples=1024) is None
    assert bench_quality.matched_counts(results, "matched:flops:0.2", reference="recon", seed=0, mode="lstsq",
                                        compensation_samples=2048, fractions=grid) == {"c0": 7}
    assert bench_quality.matched_counts(results, "matched:flops:0.3", reference="recon", seed=0, mode="lstsq",
                                        compensation_samples=2048, fractions=grid) is None


def test_a_matched_cut_sorts_after_its_budget_in_the_table():
    results = {"dense_acc": 0.9, "test_images": 10000, "machine": "m", "commands": ["python bench"],
               "runs": [_run("matched:flops:0.4", 0.87), _run("flops:0.2", 0.85), _run("flops:0.4", 0.88),
                        _run("uniform:0.4", 0.86)]}
    head = next(line for line in bench_quality.markdown(results).splitlines() if line.startswith("| criterion"))
    assert [c.strip() for c in head.strip("|").split("|")][2:] == [
        "uniform:0.4 lstsq 2048", "flops:0.4 lstsq 2048", "matched:flops:0.4 lstsq 2048", "flops:0.2 lstsq 2048"]


def test_a_matched_cut_without_the_reference_record_is_one_line_and_exit_2_with_nothing_written(tmp_path):
    script = Path(bench_quality.__file__)
    if not (script.parents[2] / "shared" / "models" / "vgg16_bn_cifar10.pt").exists():
        pytest.skip("needs ../shared (the check runs after the shared material's)")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), "--criteria", "l1", "--settings", "matched:flops:0.4",
                           "--compensation", "lstsq", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "recon's flops:0.4 record" in lines[0], lines
    assert not out.exists()
