"""Distillation at the kept channels (``--distill-features``): the term against its closed form on a cut made by the
package's own surgery, the loss the fine-tune adds with it, and the stage's wiring from the prune record. Also the
mirror-averaged teacher (``--distill-flip``): its logits, and the loss the fine-tune takes from them."""

import pytest
import torch
from torch import nn

from toolchain.data import load_dataset
from toolchain.stages.finetune import finetune
from toolchain.stages.prune import prune_model
from toolchain.train.loop import (
    FeatureMatch,
    Recipe,
    distillation_loss,
    make_optimizer,
    teacher_logits,
    train_one_epoch,
)

KEPT = {"0": [0, 2, 3], "3": [1, 4]}  # out of 5 and 6 channels


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():  # statistics and affine parameters away from their defaults
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def _student(teacher: nn.Module) -> nn.Module:
    student, _ = prune_model(teacher, torch.zeros(2, 2, 6, 6), KEPT)
    return student.eval()


def _closed_form(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    terms = []
    for name, upto in (("0", 1), ("3", 4)):  # the conv outputs: the first `upto` modules of each Sequential
        s, t = student[:upto](x), teacher[:upto](x)[:, KEPT[name]]
        terms.append(((s - t) ** 2).sum() / (t ** 2).sum())
    return sum(terms) / len(terms)


def test_the_term_is_the_relative_error_at_the_kept_channels():
    teacher = _teacher()
    student = _student(teacher)
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    match = FeatureMatch(student, teacher, KEPT)
    with torch.no_grad(), match.recording():
        student(x), teacher(x)
        untouched = match.loss()
        s0 = match.outputs[("student", "0")]
        t0 = match.outputs[("teacher", "0")]
    # the first conv's inputs are whole, so the cut reproduces the kept channels exactly: a wrong index map
    # (dense numbering read as the student's) would not
    torch.testing.assert_close(s0, t0[:, KEPT["0"]])
    torch.testing.assert_close(untouched, _closed_form(student, teacher, x))
    assert untouched > 0  # the second conv lost 2 of its 5 inputs
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with torch.no_grad(), match.recording():
        student(x), teacher(x)
        moved = match.loss()
    torch.testing.assert_close(moved, _closed_form(student, teacher, x))
    assert moved > untouched
    # the hooks are gone after the block: the checks between epochs record nothing
    assert not any(m._forward_hooks for m in (*student.modules(), *teacher.modules()))
    student(x)
    assert match.outputs == {}


def test_a_layer_missing_from_either_model_is_refused():
    teacher = _teacher()
    with pytest.raises(ValueError, match=r"\['9'\]"):
        FeatureMatch(_student(teacher), teacher, {**KEPT, "9": [0]})


class _Batches:
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(2)
        self.batches = [(torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
                        for _ in range(n)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_the_fine_tune_adds_the_weighted_term_to_the_distillation_loss():
    """At lr 0 the weights stay put, so the epoch's mean loss has a closed form (BN reads batch statistics)."""
    teacher = _teacher()
    batches = _Batches(3)
    weight = 0.7
    recipe = Recipe(epochs=1, lr=0.0, amp="off", distill_features=weight)
    student = _student(teacher)
    opt, sched = make_optimizer(student, recipe, len(batches))
    stats = train_one_epoch(student, batches, opt, sched, torch.device("cpu"), recipe, teacher=teacher,
                            features=FeatureMatch(student, teacher, KEPT))
    student.train()
    with torch.no_grad():
        kd = torch.stack([distillation_loss(student(x), teacher(x), y, alpha=recipe.distill_alpha,
                                            temperature=recipe.distill_temperature,
                                            label_smoothing=recipe.label_smoothing) for x, y in batches.batches])
        feat = torch.stack([_closed_form(student, teacher, x) for x, _ in batches.batches])
    assert stats["feature_loss"] == pytest.approx(float(feat.mean()), rel=1e-5)
    assert stats["loss"] == pytest.approx(float((kd + weight * feat).mean()), rel=1e-5)
    plain = train_one_epoch(student, batches, opt, sched, torch.device("cpu"), recipe, teacher=teacher)
    assert "feature_loss" not in plain and plain["loss"] == pytest.approx(float(kd.mean()), rel=1e-5)


def test_the_stage_matches_the_features_the_prune_record_names(tmp_path):
    from toolchain.models import create_model

    data = load_dataset("digits", None, cache_dir=tmp_path / "cache", train_subset=64, test_subset=32)
    torch.manual_seed(0)
    dense = create_model("vgg11_bn_half", num_classes=10).eval()
    kept = {"features.0": [0, 1, 5, 7], "features.4": list(range(0, 64, 2))}

    def cut() -> nn.Module:
        return prune_model(dense, torch.zeros(2, *data.input_shape), kept)[0]

    recipe = Recipe(epochs=1, lr=0.01, amp="off", distill_features=1.0)
    _, history = finetune(cut(), data, recipe, torch.device("cpu"), tmp_path / "ft", batch_size=16, seed=0,
                          teacher=dense, bn_images=32, kept=kept)
    assert history[0]["feature_loss"] > 0
    _, without = finetune(cut(), data, Recipe(epochs=1, lr=0.01, amp="off"),
                          torch.device("cpu"), tmp_path / "ft-plain", batch_size=16, seed=0, teacher=dense,
                          bn_images=32, kept=kept)
    assert "feature_loss" not in without[0]  # kept channels alone, without a weight, add nothing


def test_the_mirrored_teacher_averages_both_views_and_leaves_the_plain_pass_to_the_hooks():
    teacher = _teacher()
    student = _student(teacher)
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        both = (teacher(x) + teacher(x[..., torch.arange(5, -1, -1)])) / 2  # the mirror, indexed by hand
        plain = teacher(x)
        assert torch.allclose(teacher_logits(teacher, x), plain)
        assert not torch.allclose(both, plain, atol=1e-3)  # a random image is not its own mirror
        features = FeatureMatch(student, teacher, KEPT)
        with features.recording():
            assert torch.allclose(teacher_logits(teacher, x, flip=True), both, atol=1e-6)
            student(x)
            term = features.loss()
    assert float(term) == pytest.approx(float(_closed_form(student, teacher, x)), rel=1e-5)


def test_the_fine_tune_distils_from_the_mirror_averaged_logits():
    """At lr 0 the weights stay put: the epoch's mean loss is KD against the two views' mean logits."""
    teacher = _teacher()
    batches = _Batches(3)
    # soft targets alone at T 1: the two teachers then differ most in the loss
    recipe = Recipe(epochs=1, lr=0.0, amp="off", distill_flip=True, distill_alpha=1.0, distill_temperature=1.0)
    student = _student(teacher)
    opt, sched = make_optimizer(student, recipe, len(batches))
    stats = train_one_epoch(student, batches, opt, sched, torch.device("cpu"), recipe, teacher=teacher)
    student.train()

    def kd(target) -> float:
        with torch.no_grad():
            return float(torch.stack([distillation_loss(student(x), target(x), y, alpha=recipe.distill_alpha,
                                                        temperature=recipe.distill_temperature,
                                                        label_smoothing=recipe.label_smoothing)
                                      for x, y in batches.batches]).mean())

    mirrored = kd(lambda x: (teacher(x) + teacher(torch.flip(x, dims=(3,)))) / 2)
    assert stats["loss"] == pytest.approx(mirrored, rel=1e-5)
    assert abs(mirrored - kd(teacher)) > 100 * 1e-5 * mirrored  # the plain teacher's loss is another number
