"""The CLI end to end on tiny data, its refusals of bad input, and resume after a kill."""

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import numpy_helper

from toolchain.cli import main
from toolchain.models import create_model
from toolchain.stages.bundle import load_pruned_model
from toolchain.util import sha256_file

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--dataset", "digits", "--model", "vgg11_bn_half", "--train-subset", "300", "--test-subset", "100",
        "--baseline-epochs", "1", "--finetune-epochs", "1", "--batch-size", "64", "--rank-samples", "64",
        "--bn-recalibration", "128", "--bench-runs", "20", "--bench-batch-sizes", "1", "--calibration-samples", "64",
        "--quiet"]


def _run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_tiny_bundle(tmp_path, capsys):
    code, out, err = _run_cli([*TINY, "--out", str(tmp_path), "--run-name", "tiny", "--keep-ratio", "0.5",
                               "--distill"], capsys)
    assert code == 0, err
    bundle = tmp_path / "tiny"
    assert f"bundle: {bundle}" in out
    assert "The pruned model " in out.splitlines()[-2]  # what the run shows, before where it is
    for name in ("model.onnx", "model.pt", "architecture.json", "manifest.json", "report.md", "config.yaml",
                 "rankings.json", "labels.txt"):
        assert (bundle / name).is_file(), name
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256_file(bundle / rel) == digest
    m = manifest["metrics"]
    for key in ("acc_dense", "acc_pruned", "acc_pruned_bn_recalibrated", "acc_oneshot", "acc_finetuned",
                "acc_onnxruntime"):
        assert 0.0 <= m[key] <= 1.0
    assert m["compensation_seconds"] > 0  # compensation is on by default
    assert 0.2 < m["flops_ratio"] < 0.35  # half the channels of every layer: about a quarter of the FLOPs
    assert m["params_pruned"] < m["params_dense"]
    assert set(m["latency"]) == {"dense/fp32", "pruned/fp32", "pruned/int8"}
    assert all(v["status"] == "ok" and "1" in v["batches"] for v in m["latency"].values())
    assert 0.0 <= m["acc_int8"] <= 1.0 and set(m["roofline"]) >= {"jetson-orin-nano-8gb", "raspberry-pi-5"}
    assert manifest["engine"]["built"] is False and manifest["engine"]["reason"]  # no TensorRT here
    for name in ("model.int8.onnx", "calibration.cache", "kit/build_engine.sh", "kit/bench_on_device.py",
                 "report.html"):
        assert name in manifest["files"], name
    assert manifest["config"]["criterion"] == "recon" and manifest["config"]["distill"] is True
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"]["torch"]
    arch = json.loads((bundle / "architecture.json").read_text())
    assert all(k == c // 2 for k, c in zip(arch["kept_counts"].values(), arch["channels"].values()))
    # the weights load weights-only into the rebuilt architecture and agree with the ONNX model
    model = load_pruned_model(bundle)
    x = torch.randn(3, 3, 32, 32)
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-3)
    assert not list(tmp_path.glob(".tiny.partial-*"))
    _device_round_trip(bundle, tmp_path)
    # re-running with the same config reuses every stage and rewrites the same bundle; it first removes what a
    # killed run left (issue 11, item 14): a half-written bundle and a temporary file of an atomic write
    (tmp_path / ".tiny.partial-99999").mkdir()
    (tmp_path / ".tiny.partial-99999" / "model.onnx").write_text("half")
    stale_tmp = next((tmp_path / ".work").glob("rank-*")) / ".rankings.json.abc123.tmp"
    stale_tmp.write_text("half")
    code, _, err = _run_cli([*TINY, "--out", str(tmp_path), "--run-name", "tiny", "--keep-ratio", "0.5",
                             "--distill"], capsys)
    assert code == 0, err
    assert json.loads((bundle / "manifest.json").read_text())["metrics"]["acc_finetuned"] == m["acc_finetuned"]
    # issue 11: the bundle is readable by others (13); resume checkpoints go once their stage is done (14)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o755
    assert not list((tmp_path / ".work").glob("*/last.pt"))
    assert not (tmp_path / ".tiny.partial-99999").exists() and not stale_tmp.exists()
    assert not (tmp_path / ".lock").exists()
    # (19) the stage keys hold the target's content, not its name: an edited profile re-measures
    edited = tmp_path / "edited.yaml"
    profile = yaml.safe_load((ROOT / "targets" / "jetson-orin-nano-8gb.yaml").read_text())
    edited.write_text(yaml.safe_dump({**profile, "memory_budget_mb": 1}))
    code, _, err = _run_cli([*TINY, "--out", str(tmp_path), "--run-name", "tiny", "--keep-ratio", "0.5",
                             "--distill", "--target", str(edited)], capsys)
    assert code == 0, err
    stages = json.loads((bundle / "manifest.json").read_text())["stages"]
    assert stages["export"] == manifest["stages"]["export"] and stages["bench"] != manifest["stages"]["bench"]
    # x86-cpu's profile asks for 7-bit INT8 weights (its int8 kernels saturate with 8): only the delivery re-runs
    code, _, err = _run_cli([*TINY, "--out", str(tmp_path), "--run-name", "tiny", "--keep-ratio", "0.5",
                             "--distill", "--target", "x86-cpu"], capsys)
    assert code == 0, err
    x86 = json.loads((bundle / "manifest.json").read_text())
    assert x86["quantization"]["reduce_range"] is True and manifest["quantization"]["reduce_range"] is False
    assert x86["stages"]["export"] == manifest["stages"]["export"]
    int8 = onnx.load(bundle / "model.int8.onnx")
    assert max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in int8.graph.initializer
               if t.data_type == onnx.TensorProto.INT8) <= 64


def _device_round_trip(bundle: Path, tmp_path: Path) -> None:
    """The kit measures the real bundle (ONNX Runtime here), bench-edge folds two results back into the
    report, and the rewritten manifest still verifies on the device."""
    from toolchain.cli import bench_main

    kit = [sys.executable, str(bundle / "kit" / "bench_on_device.py"), "--backend", "onnxruntime", "--iters", "3",
           "--warmup", "0", "--min-seconds", "0", "--threads", "1"]
    results = []
    for i, precision in enumerate(("fp32", "int8")):
        out = tmp_path / f"device{i}.json"
        proc = subprocess.run([*kit, "--precision", precision, "--batch-sizes", "1", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results.append(out)
    assert bench_main([str(bundle), str(results[0])]) == 0
    assert bench_main([str(bundle), str(results[1])]) == 0  # measured before the first merge: still this bundle
    # issue 11, item 8: the kit run on the merged bundle (its manifest rewritten) still belongs to it
    after = tmp_path / "device-after-merge.json"
    proc = subprocess.run([*kit, "--precision", "fp32", "--batch-sizes", "2", "--out", str(after)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert bench_main([str(bundle), str(after)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {row["precision"] for row in manifest["device_results"]} == {"fp32", "int8"}
    assert "device_latency.png" in (bundle / "report.html").read_text()
    for rel, digest in manifest["files"].items():
        assert sha256_file(bundle / rel) == digest, rel
    check = subprocess.run([sys.executable, str(bundle / "kit" / "bench_on_device.py"), "--check-only"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr


def _assert_refused(tmp_path, capsys, args, needle):
    out_dir = tmp_path / "out"
    code, out, err = _run_cli([*args, "--out", str(out_dir)], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert not out_dir.exists(), "nothing may be written on bad input"


def test_unknown_target_lists_valid_ones(tmp_path, capsys):
    _assert_refused(tmp_path, capsys, ["--target", "jetsonn"], "jetson-orin-nano-8gb")


def test_missing_data_dir(tmp_path, capsys):
    _assert_refused(tmp_path, capsys, ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nope")],
                    "does not exist")


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "test").mkdir()
    _assert_refused(tmp_path, capsys, ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "d")], "class")


def test_cifar10_absent_offline_says_how_to_get_it(tmp_path, capsys):
    _assert_refused(tmp_path, capsys, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "c")],
                    "cifar-10-python.tar.gz")


def test_checkpoint_that_does_not_match(tmp_path, capsys):
    path = tmp_path / "wrong.pt"
    torch.save(create_model("vgg11_bn", num_classes=10).state_dict(), path)
    _assert_refused(tmp_path, capsys, ["--model", "vgg16_bn", "--checkpoint", str(path)], "does not match")


class NotWeights:  # pickles as code: must be refused by weights_only loading
    def __reduce__(self):
        return (print, ("this would run",))


def test_checkpoint_that_is_not_weights_only(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": NotWeights()}, f)
    _assert_refused(tmp_path, capsys, ["--checkpoint", str(path)], "weights-only")


def test_missing_checkpoint(tmp_path, capsys):
    _assert_refused(tmp_path, capsys, ["--checkpoint", str(tmp_path / "none.pt")], "not found")


def test_invalid_yaml(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("keep_ratio: [0.5\n")
    _assert_refused(tmp_path, capsys, ["--config", str(cfg)], "invalid YAML")


def test_unknown_yaml_option(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("keep_ration: 0.5\n")
    _assert_refused(tmp_path, capsys, ["--config", str(cfg)], "unknown option")


@pytest.mark.parametrize("args,needle", [
    (["--keep-ratio", "1.5"], "keep_ratio"),
    (["--keep-ratio", "abc"], "invalid float"),
    (["--criterion", "magic"], "valid: "),
    (["--keep", "features.99=0.5"], "unknown layer"),
    (["--finetune-epochs", "-1"], "finetune_epochs"),
    (["--budget", "garbage"], "budget must look like"),
    (["--budget", "flops=0.5", "--keep", "features.0=0.5"], "exclusive"),
    (["--fold", "sometimes"], "fold must be"),
    (["--compensation", "magic"], "compensation must be"),
    (["--compensation-samples", "0"], "compensation_samples"),
    (["--protect", "features.99"], "matches no prunable layer of vgg11_bn_half; its prunable layers: features.0,"),
    (["--protect", "classifier*"], "'classifier*' matches no prunable layer"),
    (["--protect", "none,stem"], "none stands alone"),
    (["--protect", "features.0", "--keep", "features.0=0.5"], "keep names protected layer(s) features.0"),
    (["--num-classes", "0"], "num_classes must be >= 1"),
    (["--num-classes", "1000"], "without a checkpoint vgg11_bn_half is built for the data's 10 classes"),
])
def test_invalid_flag_values(tmp_path, capsys, args, needle):
    _assert_refused(tmp_path, capsys, [*TINY, *args], needle)


def test_yaml_then_flags(tmp_path, capsys):
    from toolchain.config import build_config, load_yaml

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("keep_ratio: 0.3\nlr: 0.02\ncriterion_options: {alpha: 2.0}\n")
    cfg = build_config(load_yaml(cfg_file), {"lr": 0.05, "keep_ratio": None, "criterion_options": {"gamma": 1.0}})
    assert cfg.keep_ratio == 0.3 and cfg.lr == 0.05
    assert cfg.criterion_options == {"alpha": 2.0, "gamma": 1.0}


def test_list_targets(capsys):
    code, out, _ = _run_cli(["--list-targets"], capsys)
    assert code == 0
    for name in ("jetson-orin-nano-8gb", "jetson-nano", "raspberry-pi-5", "x86-cpu"):
        assert name in out


def test_resume_after_kill(tmp_path):
    """Kill the run during fine-tuning (after its first epoch checkpoint); the rerun resumes there."""
    # L1: resuming does not depend on the criterion, and recon's ranking would cost most of this test's time
    args = [sys.executable, "-m", "toolchain", *TINY, "--criterion", "l1", "--finetune-epochs", "3",
            "--out", str(tmp_path), "--run-name", "r"]
    args.remove("--quiet")
    env = {**os.environ, "BUILD_EDGE_NO_PROGRESS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    work = tmp_path / ".work"
    while time.time() < deadline and not list(work.glob("finetune-*/last.pt")):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "r").exists(), "a killed run leaves no bundle"
    assert not list(work.glob("finetune-*/done.json"))
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log
    for stage in ("baseline", "rank", "prune"):
        assert f"stage {stage:<8} cached" in log, log
    assert "finetune: resuming after epoch" in log, log
    history = json.loads((tmp_path / "r" / "manifest.json").read_text())["metrics"]["finetune_history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert Path(tmp_path / "r" / "model.onnx").is_file()


def test_criterion_flags_do_not_collide_with_config_flags():
    from dataclasses import fields

    from toolchain.cli import CRITERION_FLAGS, build_parser
    from toolchain.config import Config

    build_parser()  # argparse refuses two options with one name
    assert not set(CRITERION_FLAGS) & {f.name for f in fields(Config)}


def test_the_command_of_a_run_rebuilds_its_criterion_options():
    """Store-true options (--at-init) and list values come back as the parser reads them; an option that
    has no flag (YAML only) is refused rather than left out of the command."""
    from toolchain.cli import build_parser, config_argv, flag_values
    from toolchain.config import build_config

    cfg = build_config({}, {"criterion": "mipp", "criterion_options": {"at_init": True, "repeats": 3}})
    assert build_config({}, flag_values(build_parser().parse_args(config_argv(cfg)))) == cfg
    grid = build_config({}, {"budget": "flops=0.4", "sensitivity_fractions": [0.9, 0.5, 0.15],
                             "bench_batch_sizes": [1, 8]})
    assert build_config({}, flag_values(build_parser().parse_args(config_argv(grid)))) == grid
    off = build_config({}, {"criterion": "mipp", "criterion_options": {"at_init": False}})
    assert "False" not in config_argv(off)
    build_parser().parse_args(config_argv(off))  # argparse accepts it
    with pytest.raises(ValueError, match="no flag"):
        config_argv(build_config({}, {"criterion": "cmi", "criterion_options": {"keep_ratio": 0.5}}))
