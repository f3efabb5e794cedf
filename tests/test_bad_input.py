"""Bad input is refused up front (one line on stderr, exit 2, nothing written); a user's files are never lost.

Driven through ``main()`` like a user would; one test per defect of issue 11 (numbers in the names).
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import TINY
from test_cli import _run_cli as _run
from test_kit import bundle  # noqa: F401  (the kit's small bundle, a module fixture)

from toolchain.cli import main


def _refused(capsys, args, needle, *, untouched=()):
    """Exit 2 with one stderr line holding ``needle``; ``untouched``: (path, content) pairs still there."""
    code, _, err = _run(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "\x1b[" not in lines[0]
    for path, content in untouched:
        assert Path(path).read_text() == content
    return lines[0]


def _user_tree(root: Path) -> list[tuple[Path, str]]:
    """A user's own files in an --out folder, with another bundle and the work folders."""
    files = {root / "notes.txt": "mine", root / "other-bundle" / "manifest.json": '{"tool": "build-edge"}',
             root / ".work" / "x" / "done.json": "{}"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files.items())


@pytest.mark.parametrize("name", [".", "..", "/abs/dir", "a/b"])
def test_01_run_names_that_are_not_one_folder_name_are_refused(tmp_path, capsys, name):
    out = tmp_path / "out"
    tree = _user_tree(out)
    _refused(capsys, [*TINY, "--out", str(out), "--run-name", name], "run_name", untouched=tree)
    assert sorted(p.name for p in out.iterdir()) == [".work", "notes.txt", "other-bundle"]


def test_01_a_destination_that_is_not_a_bundle_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    tree = _user_tree(out)
    (out / "mine").mkdir()
    (out / "mine" / "thesis.tex").write_text("years of work")
    tree.append((out / "mine" / "thesis.tex", "years of work"))
    _refused(capsys, [*TINY, "--out", str(out), "--run-name", "mine"], "not a build-edge bundle", untouched=tree)
    assert not (out / ".cache").exists(), "refused before the data stage"


def test_01_write_bundle_itself_refuses_a_foreign_destination(tmp_path):
    from toolchain.errors import UserError
    from toolchain.stages.bundle import check_destination

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"tool": "build-edge"}))
    check_destination(tmp_path / "b")  # an older bundle of the run may be replaced
    check_destination(tmp_path / "new")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "manifest.json").write_text(json.dumps({"tool": "something else"}))
    for foreign in (tmp_path / "f", tmp_path):
        with pytest.raises(UserError, match="not a build-edge bundle"):
            check_destination(foreign)


@pytest.mark.parametrize("args,needle", [
    (["--criterion", "cmi", "--cutoff", "garbage"], "cutoff"),
    (["--criterion", "cmi", "--kernel", "wide"], "kernel"),
    (["--criterion", "recon", "--recon-weight", "heavy"], "recon_weight"),
    (["--criterion", "mipp", "--mipp-estimator", "guess"], "mipp_estimator"),
])
def test_02_criterion_options_are_parsed_before_any_work(tmp_path, capsys, args, needle):
    _refused(capsys, [*TINY, "--out", str(tmp_path / "out"), *args], needle)
    assert not (tmp_path / "out").exists()


def test_03_an_option_the_criterion_does_not_take_names_the_criteria_that_do(tmp_path, capsys):
    line = _refused(capsys, [*TINY, "--out", str(tmp_path / "out"), "--criterion", "l1", "--cutoff", "scree"],
                    "cutoff")
    assert "l1" in line and "cmi" in line
    assert not (tmp_path / "out").exists()


def test_03_a_criterion_option_samples_points_to_the_run_setting(tmp_path, capsys):
    """It used to be accepted and ignored: a YAML asking cmi for 64 images ranked on the default number."""
    config = tmp_path / "run.yaml"
    config.write_text("criterion: cmi\ncriterion_options:\n  samples: 64\n")
    _refused(capsys, [*TINY, "--config", str(config), "--out", str(tmp_path / "out")], "--samples")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset", ["99", "12"])
def test_04_an_opset_the_exporter_cannot_write_is_refused(tmp_path, capsys, opset):
    _refused(capsys, [*TINY, "--out", str(tmp_path / "out"), "--opset", opset], "opset")
    assert not (tmp_path / "out").exists()


def _image_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for cls in ("a", "b"):
            (root / part / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / part / cls / f"{i}.png")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_05_a_corrupt_image_is_one_line_naming_the_file(tmp_path, capsys, content):
    data = tmp_path / "imgs"
    _image_tree(data)
    bad = data / "train" / "b" / "bad.jpg"
    if content == "truncated":
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(content)
    _refused(capsys, ["--dataset", "imagefolder", "--data-dir", str(data), "--model", "vgg11_bn", "--quiet",
                      "--out", str(tmp_path / "out")], str(bad))
    assert not list((tmp_path / "out").rglob("*.pt"))


def test_06_an_image_size_the_model_cannot_take_is_refused_up_front(tmp_path, capsys):
    _refused(capsys, [*TINY, "--out", str(tmp_path / "out"), "--image-size", "64"], "image_size")
    assert not (tmp_path / "out").exists()


def test_09_every_sweep_value_is_checked_before_the_first_variant(tmp_path, capsys):
    _refused(capsys, [*TINY, "--out", str(tmp_path / "out"), "--sweep", "criterion=l1,foo"], "foo")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["--momentum", "-1"], "momentum"), (["--momentum", "1.5"], "momentum"),
    (["--weight-decay", "-1"], "weight_decay"), (["--parity-tolerance", "-1"], "parity_tolerance"),
    (["--distill-temperature", "0"], "distill_temperature"),
    (["--distill", "--distill-features", "0"], "distill_features must be > 0"),
    (["--distill-features", "1"], "distill_features needs distill"),
    (["--distill-flip"], "distill_flip needs distill"),
    (["--cutout", "-1"], "cutout"), (["--baseline-cutout", "-2"], "baseline_cutout"),
    (["--image-size", "16", "--cutout", "16"], "smaller than image_size"),
    (["--sensitivity-fractions", "0.5,1.0"], "sensitivity_fractions"),
    (["--sensitivity-fractions", "0.5,x"], "sensitivity_fractions must be a comma-separated list of numbers"),
    (["--sensitivity-fractions", ","], "sensitivity_fractions must be a non-empty list"),
])
def test_10_out_of_range_numbers_are_refused(tmp_path, capsys, args, needle):
    _refused(capsys, [*TINY, "--out", str(tmp_path / "out"), *args], needle)
    assert not (tmp_path / "out").exists()


def test_11_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    _refused(capsys, [*TINY, "--out", str(tmp_path / "out")], "not a folder",
             untouched=[(tmp_path / "out", "a file")])


def test_12_checkpoint_messages_are_one_whole_line(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _refused(capsys, [*TINY, "--out", str(tmp_path / "o"), "--checkpoint", str(folder)], "is a folder")
    plain = tmp_path / "plain.pt"
    with open(plain, "wb") as f:  # a plain pickle of tensors (not torch.save's zip)
        pickle.dump({"w": torch.zeros(2)}, f)
    _refused(capsys, [*TINY, "--out", str(tmp_path / "o"), "--checkpoint", str(plain)], str(plain))
    junk = tmp_path / "junk.pt"
    with zipfile.ZipFile(junk, "w") as z:  # a zip that is not a torch archive: a long error from torch
        z.writestr("x" * 300 + "/data.pkl", b"\x80\x02}q\x00.")
    line = _refused(capsys, [*TINY, "--out", str(tmp_path / "o"), "--checkpoint", str(junk)], str(junk))
    assert not line.endswith(("...", " ")), line
    assert not (tmp_path / "o").exists()


def test_15_saved_state_dicts_are_byte_reproducible(tmp_path):
    from toolchain.util import atomic_torch_save

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    atomic_torch_save(state, tmp_path / "a" / "model.pt")
    atomic_torch_save(state, tmp_path / "b" / "model.pt")
    atomic_torch_save(state, tmp_path / "b" / "other.pt")
    a = (tmp_path / "a" / "model.pt").read_bytes()
    assert a == (tmp_path / "b" / "model.pt").read_bytes() == (tmp_path / "b" / "other.pt").read_bytes()
    assert b".tmp" not in a
    assert torch.equal(torch.load(tmp_path / "a" / "model.pt", weights_only=True)["w"], state["w"])


def test_16_find_prunable_layers_leaves_the_model_as_it_was():
    from tiny_models import Tiny

    from toolchain.stages.prune import find_prunable_layers

    model = Tiny().train()
    find_prunable_layers(model, torch.zeros(2, 3, 8, 8))
    assert all(m.training for m in model.modules())
    model.eval()
    find_prunable_layers(model, torch.zeros(2, 3, 8, 8))
    assert not any(m.training for m in model.modules())


def test_17_a_missing_cifar10_folder_is_not_created(tmp_path, capsys):
    _refused(capsys, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")],
             "cifar-10-python.tar.gz")
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_18_a_second_run_into_a_busy_out_says_who_holds_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        _refused(capsys, [*TINY, "--out", str(out)], str(holder.pid))
        assert not (out / ".cache").exists()
    finally:
        holder.kill()
        holder.wait()


def test_18_a_stale_lock_is_taken_over(tmp_path):
    from toolchain.util import out_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with out_lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_14_clean_removes_what_no_bundle_refers_to_and_leftovers(tmp_path, capsys):
    out = tmp_path / "out"
    for name in ("baseline-aaa", "rank-bbb", "rank-old"):
        (out / ".work" / name).mkdir(parents=True)
        (out / ".work" / name / "done.json").write_text("{}")
    (out / ".work" / "rank-bbb" / ".rankings.json.x1.tmp").write_text("half")
    (out / "b1").mkdir()
    (out / "b1" / "manifest.json").write_text(json.dumps({"tool": "build-edge", "stages": {
        "baseline": "baseline-aaa", "rank": "rank-bbb"}}))
    (out / ".b1.partial-123").mkdir()
    (out / ".b1.partial-123" / "model.onnx").write_text("half a bundle")
    (out / ".cache").mkdir()
    (out / ".cache" / "digits-1.pt").write_text("data")
    (out / "notes.txt").write_text("mine")
    code, stdout, err = _run(["clean", "--out", str(out), "--keep-cache"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / ".work").iterdir()) == ["baseline-aaa", "rank-bbb"]
    assert not (out / ".work" / "rank-bbb" / ".rankings.json.x1.tmp").exists()
    assert not (out / ".b1.partial-123").exists()
    assert (out / ".cache" / "digits-1.pt").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "b1" / "manifest.json").exists()
    assert "rank-old" in stdout
    code, _, err = _run(["clean", "--out", str(out)], capsys)
    assert code == 0 and not (out / ".cache").exists()
    code, _, err = _run(["clean", "--out", str(tmp_path / "nothing-here")], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("change,needle", [
    ({"latency_ms": 5}, "latency_ms"), ({"latency_ms": {"p50": "fast", "p90": 1.0, "p99": 2.0}}, "p50"),
    ({"latency_ms": {"p50": None, "p90": 1.0, "p99": 2.0}}, "p50"),
    ({"latency_ms": {"p50": [], "p90": 1.0, "p99": 2.0}}, "p50"), ({"batch": 0}, "batch"),
    ({"precision": "int4"}, "precision"), ("device", "device"),
])
def test_07_bench_edge_checks_the_result_schema(bundle, tmp_path, capsys, change, needle):  # noqa: F811
    from test_kit import run_bench

    from toolchain.cli import bench_main

    good = tmp_path / "good.json"
    proc = run_bench(bundle, "--backend", "onnxruntime", "--precision", "fp32", "--batch-sizes", "1", "--iters", "2",
                     "--warmup", "0", "--min-seconds", "0", "--out", str(good), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(good.read_text())
    if change == "device":
        result["device"] = "jetson"
    else:
        result["runs"][0].update(change)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(result))
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    code = bench_main([str(bundle), str(bad)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_04_the_exporter_writes_the_opset_it_is_asked_for(tmp_path, opset):
    import onnx
    from tiny_models import Tiny

    from toolchain.stages.export import check_parity, export_onnx

    model = Tiny().eval()
    info = export_onnx(model, (3, 8, 8), tmp_path / "m.onnx", opset=opset)
    proto = onnx.load(tmp_path / "m.onnx")
    assert info["opset"] == opset
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert check_parity(model, tmp_path / "m.onnx", torch.randn(5, 3, 8, 8), 1e-4) < 1e-4  # dynamic batch


def test_20_the_target_bounds_the_opset(tmp_path, capsys):
    from toolchain.config import build_config
    from toolchain.pipeline import preflight

    _refused(capsys, [*TINY, "--out", str(tmp_path / "out"), "--target", "jetson-nano", "--opset", "17"],
             "up to 13")
    assert not (tmp_path / "out").exists()
    base = {"dataset": "digits", "model": "vgg11_bn", "out": str(tmp_path / "o")}
    assert preflight(build_config({}, {**base, "target": "jetson-nano"})).opset == 13
    assert preflight(build_config({}, {**base, "target": "jetson-xavier-nx"})).opset == 17
    assert preflight(build_config({}, {**base, "target": "x86-cpu"})).opset == 18
    assert preflight(build_config({}, {**base, "target": "jetson-nano", "opset": 13})).opset == 13


def test_19_the_baseline_key_holds_the_momentum(tmp_path, monkeypatch):
    """Stop each run at its baseline stage and compare the keys: --momentum must change it."""
    from toolchain import pipeline
    from toolchain.stages.base import digest_of

    keys = []

    class Stop(Exception):
        pass

    def record(stage, inputs, ctx):
        keys.append(digest_of(stage.NAME, inputs))
        raise Stop

    monkeypatch.setattr(pipeline, "run_stage", record)
    for momentum in ("0.9", "0.8"):
        with pytest.raises(Stop):
            main([*TINY, "--out", str(tmp_path / "out"), "--momentum", momentum])
    assert keys[0] != keys[1]
    assert not (tmp_path / "out" / ".lock").exists()


def test_a_model_with_nothing_to_prune_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """Refused in preflight (it used to be found after the baseline was trained)."""
    from torch import nn

    from toolchain.models import MODELS

    class LinearOnly(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(x, 1))

    monkeypatch.setitem(MODELS._items, "linear_only", LinearOnly)
    at = TINY.index("--model") + 1
    args = [*TINY[:at], "linear_only", *TINY[at + 1:]]
    _refused(capsys, [*args, "--out", str(tmp_path / "out")], "has no prunable convolution")
    assert not (tmp_path / "out").exists()
