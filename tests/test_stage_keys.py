"""Which stages a config change re-runs: every Config field is varied and the stages whose key (the
digest of their inputs) changed are compared with what the field is read by.

The stages form a chain (each stage's inputs hold the digest of the one before it), so a change
re-runs the first stage that reads the field and everything after it.
"""

import dataclasses

import pytest
import torch

from toolchain.config import Config, build_config
from toolchain.models import create_model
from toolchain.pipeline import DELIVERY, TRAINING, preflight, stage_inputs
from toolchain.stages.base import digest_of

ORDER = [stage.NAME for stage in (*TRAINING, *DELIVERY)]
BASE = {"dataset": "digits", "model": "vgg11_bn", "image_size": 32}

# field -> (changed value, first stage that re-runs; None: no stage), for a baseline trained by the run
FIRST = {
    "target": ("x86-cpu", "quantize"), "out": ("elsewhere", None), "run_name": ("named", None),
    "seed": (1, "baseline"), "device": ("cpu", None), "dataset": ("imagefolder", "baseline"),
    "data_dir": ("some/dir", "baseline"), "normalization": ("imagenet", "baseline"),
    "train_subset": (100, "baseline"), "test_subset": (50, "baseline"), "image_size": (40, "baseline"),
    "batch_size": (64, "baseline"), "model": ("vgg13_bn", "baseline"), "checkpoint": ("CKPT", "baseline"),
    "num_classes": (10, None),  # the data's classes: the checkpoint's own head (with another, see below)
    "baseline_epochs": (3, "baseline"), "baseline_lr": (0.1, "baseline"), "baseline_cutout": (16, "baseline"),
    "criterion": ("l1", "rank"), "criterion_options": ({"recon_search": "backward"}, "rank"),
    "rank_samples": (64, "rank"), "keep_ratio": (0.3, "prune"), "keep": ({"features.0": 0.5}, "prune"),
    "protect": ("features.0", "prune"),
    "round_to": (8, "prune"), "budget": ("flops=0.4", "prune"), "latency_source": ("estimate", None),
    "sensitivity_fractions": ([0.9, 0.5, 0.2], None),  # without a budget nothing reads it (below: with one)
    "latency_levels": (8, None), "bn_recalibration": (100, "prune"),
    "fold": ("masked", "prune"), "compensation": ("none", "prune"), "compensation_samples": (64, "prune"),
    "finetune_epochs": (2, "finetune"), "lr": (0.5, "finetune"), "momentum": (0.8, "baseline"),
    "weight_decay": (1e-4, "baseline"), "label_smoothing": (0.0, "baseline"), "distill": (True, "finetune"),
    "distill_alpha": (0.9, "finetune"), "distill_temperature": (2.0, "finetune"),
    "cutout": (8, "finetune"), "ema_decay": (0.999, "finetune"),
    "distill_features": (1.0, "finetune"), "distill_flip": (True, "finetune"), "amp": ("off", "baseline"),
    "opset": (17, "export"), "parity_tolerance": (1e-2, "export"), "precision": ("fp16", "engine"),
    "calibration_samples": (64, "quantize"), "calibration_method": ("entropy", "quantize"),
    "bench_runs": (7, "bench"), "bench_batch_sizes": ([1, 4], "engine"),
}
# what a field needs set beside it to be valid (the base of its row)
NEEDS = {"distill_features": {"distill": True}, "distill_flip": {"distill": True}}
# with a checkpoint the baseline is the checkpoint: its training settings only reach the fine-tune
WITH_CHECKPOINT = {"baseline_epochs": None, "baseline_lr": None, "baseline_cutout": None, "batch_size": "finetune",
                   "momentum": "finetune",
                   "weight_decay": "finetune", "label_smoothing": "finetune", "amp": "finetune"}


def _digests(cfg: Config, pre=None) -> dict[str, str]:
    pre = pre or preflight(cfg)
    return {name: None if inputs is None else digest_of(name, inputs)  # None: a stage this config does not run
            for name, inputs in stage_inputs(cfg, pre).items()}


def _rerun(first: str | None, latency: bool = False) -> list[str]:
    """The stages from `first` on (the latency stage runs only with a latency budget)."""
    return [] if first is None else [n for n in ORDER[ORDER.index(first):] if latency or n != "latency"]


def _changed(base: dict, field: str, value, tmp_path) -> list[str]:
    before = build_config({}, base)
    after = build_config({}, {**base, field: value})
    pre_before = preflight(before)
    # preflight checks data folders and checkpoints; what it resolves from the target, the checkpoint and the
    # protected layers is re-resolved
    pre_after = (preflight(after) if field in ("target", "precision", "opset", "checkpoint", "num_classes", "protect")
                 else pre_before)
    a, b = _digests(before, pre_before), _digests(after, pre_after)
    return [name for name in ORDER if a[name] != b[name]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "vgg11.pt"
    torch.manual_seed(0)
    torch.save(create_model("vgg11_bn", num_classes=10).state_dict(), path)
    return str(path)


def _value(value, checkpoint):
    return checkpoint if value == "CKPT" else value


def test_every_config_field_is_in_the_table():
    assert sorted(FIRST) == sorted(f.name for f in dataclasses.fields(Config))


@pytest.mark.parametrize("field", sorted(FIRST))
def test_a_change_reruns_exactly_the_stages_that_read_it(field, checkpoint, tmp_path):
    value, first = FIRST[field]
    base = {**BASE, **NEEDS.get(field, {})}
    assert _changed(base, field, _value(value, checkpoint), tmp_path) == _rerun(first), field


@pytest.mark.parametrize("field", sorted(WITH_CHECKPOINT))
def test_with_a_checkpoint_training_settings_reach_only_the_finetune(field, checkpoint, tmp_path):
    value, _ = FIRST[field]
    base = {**BASE, "checkpoint": checkpoint}
    assert _changed(base, field, value, tmp_path) == _rerun(WITH_CHECKPOINT[field]), field


def test_the_same_target_name_with_other_hardware_reruns_the_bench(checkpoint):
    """A target profile edited in place (same name, other threads or memory) must not reuse old timings."""
    cfg = build_config({}, {**BASE, "checkpoint": checkpoint})
    pre = preflight(cfg)
    for change in ({"threads": 1}, {"memory_budget_mb": 64}):
        edited = dataclasses.replace(pre, target=dataclasses.replace(pre.target, **change))
        a, b = _digests(cfg, pre), _digests(cfg, edited)
        assert [name for name in ORDER if a[name] != b[name]] == ["bench"], change


def test_a_criterion_that_cuts_at_the_keep_ratio_is_ranked_again_when_it_changes():
    base = {**BASE, "criterion": "cmi", "criterion_options": {"cutoff": "ratio"}}
    assert _changed(base, "keep_ratio", 0.3, None) == _rerun("rank")


def test_without_compensation_its_images_still_key_the_prune():
    """A budget's sensitivity probes re-estimate BN on the compensation images even when nothing is refitted."""
    base = {**BASE, "compensation": "none", "budget": "flops=0.4"}
    assert _changed(base, "compensation_samples", 64, None) == _rerun("prune")


def test_a_latency_budget_measures_again_when_the_target_or_its_source_changes(checkpoint, tmp_path):
    """The latency table is keyed by the whole target profile: another target, or the same name with other
    hardware, or another table source, re-measures it (and re-prunes); a FLOPs budget runs no latency stage."""
    base = {**BASE, "checkpoint": checkpoint, "budget": "latency=0.5x", "target": "x86-cpu"}
    assert _digests(build_config({}, {**base, "budget": "flops=0.4"}))["latency"] is None
    assert _changed(base, "target", "jetson", tmp_path)[0] == "latency"
    assert _changed(base, "latency_source", "estimate", tmp_path) == _rerun("latency", latency=True)
    assert _changed(base, "latency_levels", 8, tmp_path) == _rerun("latency", latency=True)
    assert _changed(base, "budget", "latency=0.25x", tmp_path) == _rerun("prune")
    cfg = build_config({}, base)
    pre = preflight(cfg)
    edited = dataclasses.replace(pre, target=dataclasses.replace(pre.target, memory_bandwidth_gbs=7.0))
    a, b = _digests(cfg, pre), _digests(cfg, edited)
    assert [name for name in ORDER if a[name] != b[name]][0] == "latency"


def test_a_stage_input_added_later_keeps_the_old_keys_while_unset():
    from toolchain.stages import prune

    inputs = prune.Inputs("r", "b", "vgg11_bn", 0)
    assert "latency" not in dataclasses.asdict(inputs) or inputs.latency is None
    from toolchain.stages.base import key_of

    assert "latency" not in key_of(inputs) and "protect" not in key_of(inputs)
    assert key_of(dataclasses.replace(inputs, latency="d"))["latency"] == "d"
    assert key_of(dataclasses.replace(inputs, protect=["features.0"]))["protect"] == ["features.0"]
    from toolchain.stages import baseline

    assert "head_classes" not in key_of(baseline.Inputs(None, "vgg11_bn"))
    # in a nested input too: the baseline's training recipe without cutout keeps the key it had before cutout
    training = baseline.Training(1, 0.1, 0.9, 64, 5e-4, 0.1, "off", 1)
    assert "cutout" not in key_of(baseline.Inputs(None, "vgg11_bn", training=training))["training"]
    cut = dataclasses.replace(training, cutout=16)
    assert key_of(baseline.Inputs(None, "vgg11_bn", training=cut))["training"]["cutout"] == 16
    from toolchain.stages import finetune

    tuned = finetune.Inputs("p", "b", "vgg11_bn", 15, 0.01, 0.9, 5e-4, 0.1, True, 0.5, 4.0, 128, "auto", 1, 0, 2000, 16)
    assert "ema_decay" not in key_of(tuned)  # the fine-tunes run before the option keep their cached results
    assert key_of(dataclasses.replace(tuned, ema_decay=0.999))["ema_decay"] == 0.999
    assert "distill_features" not in key_of(tuned)
    assert key_of(dataclasses.replace(tuned, distill_features=1.0))["distill_features"] == 1.0
    assert "distill_flip" not in key_of(tuned)
    assert key_of(dataclasses.replace(tuned, distill_flip=True))["distill_flip"] is True


@pytest.fixture(scope="module")
def checkpoint_7_classes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt7") / "vgg11_7.pt"
    torch.manual_seed(0)
    torch.save(create_model("vgg11_bn", num_classes=7).state_dict(), path)
    return str(path)


def test_a_checkpoint_whose_head_is_replaced_trains_the_baseline(checkpoint, checkpoint_7_classes, tmp_path):
    """--num-classes other than the data's: the baseline is trained from the checkpoint with a new head, so the
    head size and the training recipe are in its key; the data's own count changes nothing."""
    base = {**BASE, "checkpoint": checkpoint_7_classes, "num_classes": 7}
    for field in ("baseline_epochs", "baseline_lr", "baseline_cutout", "batch_size", "momentum", "amp"):
        assert _changed(base, field, FIRST[field][0], tmp_path) == _rerun("baseline"), field
    cfg = build_config({}, base)
    pre = preflight(cfg)
    a, b = _digests(cfg, pre), _digests(dataclasses.replace(cfg, num_classes=5), pre)
    assert [name for name in ORDER if a[name] != b[name]] == _rerun("baseline")
    assert _changed({**BASE, "checkpoint": checkpoint}, "num_classes", 10, tmp_path) == []


def test_protection_is_in_the_prune_key_only_when_it_protects_a_layer():
    """Built-in models protect nothing by default (their cached prunes keep their keys); stem protects the
    first conv, here the same layer as naming it."""
    assert _changed(dict(BASE), "protect", "none", None) == []
    assert _changed(dict(BASE), "protect", "stem", None) == _rerun("prune")
    stem, named = (_digests(build_config({}, {**BASE, "protect": v})) for v in ("stem", "features.0"))
    assert stem == named


def test_a_budgets_sensitivity_grid_keys_the_prune_and_the_default_grid_is_the_old_key():
    base = {**BASE, "budget": "flops=0.4"}
    assert _changed(base, "sensitivity_fractions", [0.9, 0.5, 0.2], None) == _rerun("prune")
    assert _changed(base, "sensitivity_fractions", [0.75, 0.5, 0.25, 0.1], None) == []


def test_a_target_with_7_bit_int8_weights_requantizes_and_8_bits_keep_the_old_quantize_key(checkpoint):
    """x86-cpu's profile asks for 7-bit weights (its int8 kernels saturate with 8); other targets' keys hold no
    weight_bits, so their cached quantize stages stay valid; the same name edited to 8 bits re-quantizes."""
    from toolchain.stages.base import key_of

    cfg = build_config({}, {**BASE, "checkpoint": checkpoint, "target": "x86-cpu"})
    pre = preflight(cfg)
    assert stage_inputs(cfg, pre)["quantize"].weight_bits == 7
    eight = dataclasses.replace(pre, target=dataclasses.replace(pre.target, int8_weight_bits=8))
    assert "weight_bits" not in key_of(stage_inputs(cfg, eight)["quantize"])
    a, b = _digests(cfg, pre), _digests(cfg, eight)
    assert [name for name in ORDER if a[name] != b[name]] == ["quantize", "engine", "bench"]
    jetson = build_config({}, {**BASE, "checkpoint": checkpoint})
    assert "weight_bits" not in key_of(stage_inputs(jetson, preflight(jetson))["quantize"])
