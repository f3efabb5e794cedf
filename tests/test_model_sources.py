"""Models from torchvision, timm and an import path; checkpoints as training scripts save them.

The model string alone must rebuild the model in a fresh process (the bundle records it), and a
checkpoint must load weights-only whatever dict and prefixes wrap it."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from toolchain.errors import UserError
from toolchain.models import create_model, default_normalization
from toolchain.stages.baseline import read_checkpoint
from toolchain.stages.prune import find_prunable_layers, prune_model

ROOT = Path(__file__).resolve().parents[1]

USER_MODULE = textwrap.dedent("""
    from torch import nn

    def small(num_classes=10):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def fixed_head():
        return small(5)

    def not_a_model(num_classes=10):
        return "resnet"

    def broken(num_classes=10):
        raise ValueError("no such width")
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_models", None)


def test_torchvision_models_take_the_class_count_and_are_torchvisions():
    model = create_model("torchvision:resnet18", num_classes=7)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 7 and model.conv1.weight.shape == (64, 3, 7, 7)  # the ImageNet stem
    with pytest.raises(UserError, match="unknown torchvision model 'resnet7'"):
        create_model("torchvision:resnet7")


def test_an_import_path_calls_the_factory_with_the_class_count_where_it_takes_one(user_module):
    assert create_model("my_models:small", num_classes=3)[-1].out_features == 3
    assert create_model("my_models:fixed_head", num_classes=3)[-1].out_features == 5  # the model's own head
    for name, needle in [("my_models:nothing", "no callable 'nothing'"), ("no_such_module:f", "cannot import"),
                         ("my_models:not_a_model", "not a torch nn.Module"), ("my_models:broken", "no such width"),
                         (":small", "expected SOURCE:NAME"), ("vgg7", "unknown model 'vgg7'")]:
        with pytest.raises(UserError, match=needle) as e:
            create_model(name)
        assert "\n" not in str(e.value)


def test_timm_is_optional(monkeypatch):
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install timm"):
            create_model("timm:resnet18")
        return
    assert create_model("timm:resnet18", num_classes=4).get_classifier().out_features == 4
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install timm"):
        create_model("timm:resnet18")


def test_imagenet_models_default_to_imagenet_normalization():
    assert default_normalization("torchvision:mobilenet_v2") == "imagenet"
    assert default_normalization("timm:efficientnet_b0") == "imagenet"
    assert default_normalization("vgg16_bn") == "auto" and default_normalization("my_models:small") == "auto"


def test_a_torchvision_imagenet_checkpoint_loads_however_it_is_wrapped(tmp_path):
    """resnet18's ImageNet layout (7x7 stem, 1000 classes) used to fail against the CIFAR-stem resnet18."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    wrapped = {
        "plain": state,
        "ddp in a training checkpoint": {"epoch": 90, "model": {f"module.{k}": v for k, v in state.items()}},
        "timm": {"state_dict": state, "state_dict_ema": {k: v + 1 for k, v in state.items()}, "epoch": 3},
        "ema": {"ema": state, "optimizer": {"lr": torch.tensor(0.1)}},
        "model_state": {"model_state": state},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}},
        "compiled under ddp": {f"module._orig_mod.{k}": v for k, v in state.items()},
    }
    for label, obj in wrapped.items():
        path = tmp_path / f"{label}.pt"
        torch.save(obj, path)
        loaded = read_checkpoint(path, "torchvision:resnet18", 1000)
        assert loaded.keys() == state.keys(), label
        assert all(torch.equal(loaded[k], state[k]) for k in state), label
    with pytest.raises(UserError, match=r"does not match torchvision:resnet18 with 10 classes.*fc\.weight") as e:
        read_checkpoint(tmp_path / "plain.pt", "torchvision:resnet18", 10)
    assert "\n" not in str(e.value)


def test_the_head_is_replaced_where_the_model_keeps_it():
    """torchvision keeps it as the last Linear, in a Sequential or as an attribute; timm models reset it; the
    result is the model the name builds for the new classes (what later stages and the bundle rebuild)."""
    from toolchain.models import replace_head
    from toolchain.stages.baseline import model_with_new_head

    for name, head in [("torchvision:mobilenet_v2", "classifier.1"), ("torchvision:resnet18", "fc")]:
        torch.manual_seed(0)
        state = create_model(name, num_classes=1000).state_dict()
        model = model_with_new_head(name, state, 1000, 3)
        assert dict(model.named_modules())[head].out_features == 3, name
        want = create_model(name, num_classes=3).state_dict()
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in want.items()}
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if not k.startswith(head))

    class TimmLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 1000)

        def reset_classifier(self, num_classes):
            self.head = nn.Linear(4, num_classes)

    assert replace_head(TimmLike(), "timm:x", head_classes=1000, num_classes=3).head.out_features == 3
    with pytest.raises(UserError, match="model tv:squeeze: no classifier to replace") as e:
        replace_head(nn.Sequential(nn.Conv2d(3, 1000, 1)), "tv:squeeze", head_classes=1000, num_classes=3)
    assert "\n" not in str(e.value)


def test_a_head_that_does_not_give_the_models_own_layout_is_refused(user_module):
    """A factory whose head is not only its last Linear: replacing it would not give what the model string
    rebuilds for the data's classes, so the bundle could not be loaded; refused up front."""
    from toolchain.stages.baseline import model_with_new_head

    (user_module / "two_heads.py").write_text(textwrap.dedent("""
        from torch import nn

        def two(num_classes=10):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes), nn.Linear(num_classes, num_classes))
    """))
    state = create_model("two_heads:two", num_classes=7).state_dict()
    with pytest.raises(UserError, match="is not the model it builds for 3 classes"):
        model_with_new_head("two_heads:two", state, 7, 3)
    sys.modules.pop("two_heads", None)


def test_a_prefix_the_model_itself_has_is_kept(tmp_path):
    class Wrapper(nn.Module):  # every key of this model starts with "model."
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(2, 2)

    from toolchain.stages.baseline import _without_wrapper_prefixes

    state = Wrapper().state_dict()
    assert _without_wrapper_prefixes(dict(state), state).keys() == state.keys()
    assert _without_wrapper_prefixes({f"module.{k}": v for k, v in state.items()}, state).keys() == state.keys()


@pytest.mark.parametrize("name", ["torchvision:resnet18", "my_models:small"])
def test_a_pruned_model_rebuilds_from_its_name_in_a_fresh_process(name, user_module, tmp_path):
    """What load_pruned_model reads (architecture.json with the model string, model.pt) is enough."""
    torch.manual_seed(0)
    dense = create_model(name, num_classes=10).eval()
    example = torch.zeros(2, 3, 32, 32)
    layers = find_prunable_layers(dense, example)
    assert layers
    kept = {layer.name: list(range(0, layer.channels, 2)) for layer in layers}
    pruned, record = prune_model(dense, example, kept)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "architecture.json").write_text(json.dumps({"model": name, "num_classes": 10,
                                                          "input_shape": [3, 32, 32], **record.to_json()}))
    torch.save(pruned.state_dict(), bundle / "model.pt")
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = pruned.eval()(x)
    code = ("import sys, torch; from toolchain.stages.bundle import load_pruned_model; "
            "m = load_pruned_model(sys.argv[1]); torch.save(m(torch.load(sys.argv[2])).detach(), sys.argv[3])")
    env_path = f"{ROOT}:{user_module}"
    subprocess.run([sys.executable, "-c", code, str(bundle), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5)


def test_the_half_width_vgg_has_half_the_channels_and_a_quarter_of_the_flops():
    from toolchain.cost import count_flops_params

    full, half = create_model("vgg11_bn"), create_model("vgg11_bn_half")
    widths = [[m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] for net in (full, half)]
    assert widths[1] == [w // 2 for w in widths[0]] and half.classifier.in_features == 256
    ratio = count_flops_params(half, (3, 32, 32))[0] / count_flops_params(full, (3, 32, 32))[0]
    assert 0.25 <= ratio < 0.26  # every conv but the first (3 input channels) costs a quarter


def _digits_imagefolder(root: Path, classes: int = 3, train: int = 8, test: int = 4) -> None:
    """A small ImageFolder tree of real images (scikit-learn's digits, offline), as a user would bring."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        images = digits.images[digits.target == c][:train + test]
        for i, img in enumerate(images):
            split = "train" if i < train else "test"
            folder = root / split / f"digit{c}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (img / 16.0 * 255).astype("uint8")
            Image.fromarray(pixels).convert("RGB").resize((32, 32)).save(folder / f"{i}.png")


def test_a_torchvision_mobilenet_on_an_imagefolder_gives_a_valid_bundle(tmp_path, capsys):
    """End to end with a torchvision model: trained, ranked, pruned in groups and refitted, fine-tuned,
    exported (the ONNX parity check must pass or the run fails), quantized, benchmarked. L1 ranks, to keep it
    short: the default criterion on groups is covered by the budget test's allocation and test_compensation."""
    from toolchain.cli import main
    from toolchain.stages.bundle import load_pruned_model
    from toolchain.util import sha256_file

    _digits_imagefolder(tmp_path / "data")
    out = tmp_path / "runs"
    code = main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                 "--model", "torchvision:mobilenet_v2", "--image-size", "32", "--baseline-epochs", "1",
                 "--finetune-epochs", "1", "--batch-size", "12",
                 "--criterion", "l1", "--keep-ratio", "0.5", "--compensation-samples", "12",
                 "--bn-recalibration", "24", "--calibration-samples", "8", "--bench-runs", "5",
                 "--bench-batch-sizes", "1", "--out", str(out), "--run-name", "mnv2", "--quiet",
                 "--opset", "17"])  # the TorchScript exporter: the dynamo one takes 30 s on mobilenet_v2 here
    assert code == 0, capsys.readouterr().err
    bundle = out / "mnv2"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256_file(bundle / rel) == digest, rel
    assert manifest["config"]["model"] == "torchvision:mobilenet_v2"
    assert manifest["data"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet, as torchvision trains
    arch = json.loads((bundle / "architecture.json").read_text())
    assert arch["protected"] == ["features.0.0"]  # the stem, kept whole by default (--protect auto)
    assert arch["kept_counts"]["features.0.0"] == arch["channels"]["features.0.0"] == 32
    assert all(k < arch["channels"][n] for n, k in arch["kept_counts"].items() if n != "features.0.0")
    model = load_pruned_model(bundle)
    assert isinstance(model, torchvision.models.MobileNetV2)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_an_imagenet_checkpoint_gets_a_new_head_and_is_trained_for_the_data(tmp_path, capsys):
    """--num-classes 1000: a torchvision ImageNet checkpoint brought to a 3-class image folder loads into the
    1000-class model, gets a 3-class head and is trained from there; the bundle holds the 3-class model and loads
    in a fresh process. Without the flag the run stops before any work, naming the head."""
    from toolchain.cli import main
    from toolchain.util import sha256_file

    _digits_imagefolder(tmp_path / "data")
    torch.manual_seed(123)  # not the run's seed: a model trained from scratch would not start from these weights
    state = torchvision.models.resnet18().state_dict()  # the ImageNet layout: 7x7 stem, 1000 classes
    torch.save({"model": state, "epoch": 90}, tmp_path / "imagenet.pt")
    out = tmp_path / "runs"
    argv = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--model", "torchvision:resnet18",
            "--checkpoint", str(tmp_path / "imagenet.pt"), "--image-size", "32", "--baseline-epochs", "1",
            "--finetune-epochs", "1", "--batch-size", "12", "--criterion", "l1", "--keep-ratio", "0.5",
            "--compensation", "none", "--bn-recalibration", "24", "--calibration-samples", "8",
            "--bench-runs", "5", "--bench-batch-sizes", "1", "--out", str(out), "--run-name", "r18", "--quiet",
            "--opset", "17"]  # no refit: 100 s of resnet18 forward passes here; the mobilenet run above refits
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "fc.weight: (1000, 512) vs (3, 512)" in err[0] and "--num-classes 1000" in err[0], err
    assert not out.exists()

    code = main([*argv, "--num-classes", "1000"])
    assert code == 0, capsys.readouterr().err
    bundle = out / "r18"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256_file(bundle / rel) == digest, rel
    assert manifest["config"]["num_classes"] == 1000 and manifest["data"]["classes"] == ["digit0", "digit1", "digit2"]
    arch = json.loads((bundle / "architecture.json").read_text())
    assert arch["num_classes"] == 3 and arch["protected"] == []  # resnet18's stem is a residual stream: cut
    baseline = out / ".work" / manifest["stages"]["baseline"]
    assert "1000-class head replaced and trained" in json.loads((baseline / "done.json").read_text())["source"]
    dense = torch.load(baseline / "model.pt", weights_only=True)
    assert dense["fc.weight"].shape == (3, 512)
    assert not torch.equal(dense["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])  # trained
    moved = (dense["layer4.1.conv2.weight"] - state["layer4.1.conv2.weight"]).norm()
    assert moved < 0.2 * state["layer4.1.conv2.weight"].norm()  # from the checkpoint's weights (a new init: 1.4)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from toolchain.stages.bundle import load_pruned_model; "
            "m = load_pruned_model(sys.argv[1]); assert type(m).__name__ == 'ResNet' and m.fc.out_features == 3; "
            "torch.save(m(torch.load(sys.argv[2])).detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(bundle), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert torch.load(tmp_path / "y.pt").shape == (2, 3)


def test_cmis_own_budget_over_channel_groups_is_refused_before_any_work(tmp_path, capsys):
    """Its allocation reads the CMI curves with one producer per layer; a residual stream has many writers
    (the pipeline's --budget counts them)."""
    from toolchain.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("criterion: cmi\ncriterion_options:\n  budget: flops=0.4\n")
    code = main(["--dataset", "digits", "--model", "torchvision:resnet18", "--config", str(config),
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "does not allocate over channel groups" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_budget_counts_every_conv_of_a_group():
    """The allocator's cost is the cost model's over the groups' convs, members included, and meets the budget."""
    from toolchain.allocation import allocate
    from toolchain.cost import CostModel
    from toolchain.ranking.cutoffs import parse_budget

    model = create_model("torchvision:resnet18", num_classes=10).eval()
    layers = find_prunable_layers(model, torch.zeros(2, 3, 32, 32))
    cost = CostModel.of(model, (3, 32, 32), layers)
    gen = torch.Generator().manual_seed(0)
    sensitivity = {layer.name: [[f, float(torch.rand(1, generator=gen)) * (1 - f)] for f in (1.0, 0.5, 0.25, 0.1)]
                   for layer in layers}
    with pytest.raises(ValueError, match="member"):
        allocate(layers, sensitivity, parse_budget("flops=0.4"))
    counts, info = allocate(layers, sensitivity, parse_budget("flops=0.4"), members=cost.member_terms("flops"))
    group_modules = {m for layer in layers for m in (layer.name, *layer.members)}
    frac = {layer.name: counts[layer.name] / layer.channels for layer in layers}
    terms = [t for t in cost.terms["flops"] if t.module in group_modules]
    kept = sum(t.dense * frac.get(t.out, 1.0) * frac.get(t.inp, 1.0) for t in terms)
    assert info["cost"] == pytest.approx(kept / sum(t.dense for t in terms), rel=1e-9)
    assert 0.39 < info["cost"] <= 0.4 + 1e-9
    assert cost.fraction("flops", counts) < 0.45  # the whole model: the classifier and stem input are fixed
