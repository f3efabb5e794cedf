"""One readable training recipe (torchvision reference style): train_one_epoch, evaluate,
BN re-estimation, and a resumable epoch loop with a rich progress bar."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from toolchain.train import distributed as dist_utils
from toolchain.train.progress import progress_bar
from toolchain.util import atomic_torch_save

log = logging.getLogger("build_edge")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 is emulated and slower than fp32 (7x on an AVX2 EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, mode: str = "auto"):
    """Mixed precision: bf16 on CUDA GPUs that support it (else fp16 with a GradScaler); on the CPU
    bf16 where the CPU computes it natively. ``mode``: auto | bf16 | off."""
    if mode == "off":
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if mode == "bf16" or cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _needs_scaler(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()


@dataclass
class Recipe:
    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    nesterov: bool = True
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    amp: str = "auto"
    warmup_steps: int = 0
    ema_decay: float | None = None  # keep an exponential moving average of the weights and end on it
    distill_features: float | None = None  # weight of the feature term (FeatureMatch); needs a teacher
    distill_flip: bool = False  # the teacher's logits: the mean over the image and its mirror (teacher_logits)


def make_optimizer(model: nn.Module, recipe: Recipe, steps_per_epoch: int):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    total = max(1, recipe.epochs * steps_per_epoch)
    # linear warm-up (a fresh VGG diverges at full lr on its first steps), then cosine to zero
    warmup = min(recipe.warmup_steps, total // 4) if recipe.warmup_steps else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(step - warmup, total - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


def distillation_loss(student_logits, teacher_logits, labels, *, alpha: float, temperature: float,
                      label_smoothing: float) -> torch.Tensor:
    """(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T) (Hinton et al.)."""
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t
    return (1 - alpha) * hard + alpha * soft


def teacher_logits(teacher: nn.Module, x: torch.Tensor, *, flip: bool = False) -> torch.Tensor:
    """The teacher's logits for ``x``; with ``flip`` the mean over ``x`` and its horizontal mirror.

    Why: averaging the two views is a better teacher at the cost of one more forward pass (the shared VGG16-BN
    baseline: 89.29% -> 90.47% top-1 on the CIFAR-10 test split, benchmarks/bench_teacher_flip.py). The student
    did not gain from it (VGG16 at flops=0.2: 88.54% against 88.41% with the plain teacher, docs/STUDY.md), so it
    is off by default. The mirror goes first, so the plain pass is the last one FeatureMatch's hooks see."""
    if not flip:
        return teacher(x)
    mirrored = teacher(torch.flip(x, dims=(-1,)))
    return (teacher(x) + mirrored) / 2


class FeatureMatch:
    """Distillation at the kept channels: each pruned layer's output against the teacher's same layer, read at the
    channels the cut kept (``kept``: layer name -> kept output channels in the teacher's numbering).

    Why: the cut starts close to the dense network inside (compensation refits every consumer towards the dense
    outputs; with the flops=0.2 cut of VGG16 the conv outputs differ from the dense ones by up to 13% of their
    energy on 256 training images), while the logits alone leave the fine-tune free to drift from features it
    could keep. The term is the mean over layers of ``||s - t[:, kept]||^2 / ||t[:, kept]||^2``, so every layer
    weighs alike whatever its scale. Layers whose channels a residual group shares are matched at their owner only.

    Measured at flops=0.2 on VGG16 (weight 5, one seed): 0.4-0.8 pt ahead of the logits alone over the first five
    epochs, level from the sixth, 88.47% against 88.41% after 15 (docs/STUDY.md), so it is an option, off by
    default."""

    def __init__(self, student: nn.Module, teacher: nn.Module, kept: dict[str, list[int]]):
        smods, tmods = dict(student.named_modules()), dict(teacher.named_modules())
        missing = sorted(n for n in kept if n not in smods or n not in tmods)
        if missing:
            raise ValueError(f"feature distillation: layers {missing} are not in both models")
        # sorted: the cut keeps channels in dense order. The indices live where the teacher's outputs are (the
        # models are on their device by now), so no step copies them
        self.pairs = [(name, smods[name], tmods[name],
                       torch.tensor(sorted(k), dtype=torch.long, device=next(tmods[name].parameters()).device))
                      for name, k in kept.items()]
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}
        self._handles: list[Any] = []

    @contextlib.contextmanager
    def recording(self):
        """Hooks that keep the matched layers' outputs, for the length of the block (the checks run without)."""
        def keep(key):
            def hook(module, args, output):
                self.outputs[key] = output
            return hook
        for name, s, t, _ in self.pairs:
            self._handles += [s.register_forward_hook(keep(("student", name))),
                              t.register_forward_hook(keep(("teacher", name)))]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles, self.outputs = [], {}

    def loss(self) -> torch.Tensor:
        """The term for the last forward pass of both models (inside ``recording``)."""
        terms = []
        for name, _, _, idx in self.pairs:
            s = self.outputs[("student", name)].float()
            t = self.outputs[("teacher", name)].float().index_select(1, idx)
            terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
        return torch.stack(terms).mean()


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the weights and the BN statistics (buffers too, so the averaged
    weights come with statistics of the same mix): a copy of the weights after the first optimizer step, then
    ``ema = decay * ema + (1 - decay) * model`` after every later one (torch's ``AveragedModel``)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, device: torch.device, recipe: Recipe, *,
                    teacher: nn.Module | None = None, scaler=None, ema: AveragedModel | None = None,
                    features: FeatureMatch | None = None, desc: str = "train") -> dict[str, float]:
    """One pass over ``loader``; with ``features`` (and a teacher) the loss adds ``recipe.distill_features`` times
    the feature term."""
    features = features if teacher is not None else None  # the term reads the teacher's outputs
    model.train()
    total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    feature_total = torch.zeros((), device=device)
    recording = features.recording() if features is not None else contextlib.nullcontext()
    with progress_bar(len(loader), desc) as bar, recording:
        for x, y in loader:
            with autocast(device, recipe.amp):
                logits = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher_logits(teacher, x, flip=recipe.distill_flip)
                    loss = distillation_loss(logits.float(), t_logits.float(), y, alpha=recipe.distill_alpha,
                                             temperature=recipe.distill_temperature,
                                             label_smoothing=recipe.label_smoothing)
                    if features is not None:
                        feature_loss = features.loss()
                        loss = loss + recipe.distill_features * feature_loss
                        feature_total += feature_loss.detach() * len(y)
                else:
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(dist_utils.unwrap(model))
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            bar.advance(loss=float(loss.detach()), acc=float(correct) / seen)
    stats = dist_utils.all_reduce_sum(torch.stack([total_loss.float(), correct.float(),
                                                   torch.tensor(float(seen), device=device), feature_total.float()]))
    out = {"loss": float(stats[0] / stats[2]), "train_acc": float(stats[1] / stats[2])}
    if features is not None:
        out["feature_loss"] = float(stats[3] / stats[2])  # the unweighted term, its mean over the epoch
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: str = "off", desc: str = "eval") -> float:
    """Top-1 accuracy; fp32 unless ``amp`` asks for mixed precision (the per-epoch checks do)."""
    model.eval()
    correct, seen = 0, 0
    ctx = autocast(device, amp)
    with ctx, progress_bar(len(loader), desc) as bar:
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
            bar.advance(acc=correct / seen)
    return correct / max(1, seen)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, device: torch.device, max_images: int) -> int:
    """Reset BN running statistics and re-estimate them (cumulative average) on training images.

    Removing channels shifts every later layer's input distribution; without this the stale
    statistics make a pruned model look far worse than its ranking deserves (docs/design/algorithms.md §5).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or max_images <= 0:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for x, _ in loader:
        x = x[: max_images - seen]
        model(x)
        seen += len(x)
        if seen >= max_images:
            break
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()
    return seen


def fit(model: nn.Module, train_loader, test_loader, device: torch.device, recipe: Recipe, workdir: Path, *,
        teacher: nn.Module | None = None, features: FeatureMatch | None = None, desc: str = "finetune",
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Epoch loop with a checkpoint after every epoch; resumes from ``workdir/last.pt``. With
    ``recipe.ema_decay`` every check reads the raw weights (``test_acc``) and their average
    (``test_acc_ema``), and the model ends holding the average."""
    ckpt_path = workdir / "last.pt"
    opt, sched = make_optimizer(model, recipe, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if _needs_scaler(device) else None
    ema = make_ema(dist_utils.unwrap(model), recipe.ema_decay) if recipe.ema_decay else None
    history: list[dict[str, Any]] = []
    start = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        dist_utils.unwrap(model).load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start, history = ckpt["epoch"], list(ckpt["history"])
        log.info("%s: resuming after epoch %d of %d", desc, start, recipe.epochs)
    for epoch in range(start, recipe.epochs):
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = train_one_epoch(model, train_loader, opt, sched, device, recipe, teacher=teacher, scaler=scaler,
                                ema=ema, features=features, desc=f"{desc} {epoch + 1}/{recipe.epochs}")
        stats["test_acc"] = evaluate(model, test_loader, device, amp=recipe.amp,
                                     desc=f"eval {epoch + 1}/{recipe.epochs}")
        if ema is not None:
            stats["test_acc_ema"] = evaluate(ema.module, test_loader, device, amp=recipe.amp,
                                             desc=f"eval ema {epoch + 1}/{recipe.epochs}")
        stats.update(epoch=epoch + 1, secs=round(time.perf_counter() - t0, 2))
        history.append(stats)
        log.info("%s epoch %d/%d: loss %.4f%s train %.4f test %.4f%s (%.1fs)", desc, epoch + 1, recipe.epochs,
                 stats["loss"], f" (features {stats['feature_loss']:.4f})" if "feature_loss" in stats else "",
                 stats["train_acc"], stats["test_acc"],
                 f" ema {stats['test_acc_ema']:.4f}" if ema is not None else "", stats["secs"])
        if dist_utils.is_main():
            state = {"model": dist_utils.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history}
            if ema is not None:
                state["ema"] = ema.state_dict()
            atomic_torch_save(state, ckpt_path)
        if on_epoch is not None:
            on_epoch(stats)
    if ema is not None:
        dist_utils.unwrap(model).load_state_dict(ema.module.state_dict())
    return history
