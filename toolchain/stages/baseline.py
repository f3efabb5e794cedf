"""Baseline stage: load a user's checkpoint (weights only, checked against the model) or train one.

Its ``data`` input is the identity of the run's images, so every later stage's key holds it through
this stage's digest.

A checkpoint whose head has other classes than the data (``--num-classes N``: an ImageNet checkpoint
brought to a 10-class image folder) is not a baseline for this data: the model is built with N
outputs so the checkpoint loads weights-only, its head is replaced by a fresh one for the data's
classes (``toolchain.models.replace_head``) and the model is trained from there with the baseline
recipe. The saved model is then the one ``create_model(model, num_classes=data classes)`` builds, so
every later stage and ``load_pruned_model`` rebuild it from the model string alone."""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from toolchain.data import Dataset, DataSpec, DeviceLoader
from toolchain.errors import UserError
from toolchain.models import create_model, replace_head
from toolchain.stages.base import OMIT_IF_NONE, StageContext
from toolchain.train import distributed as dist_utils
from toolchain.train.loop import Recipe, evaluate, fit
from toolchain.util import atomic_torch_save

NAME = "baseline"
ALL_RANKS = True  # training runs on every rank under torchrun


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, whole, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


# where training scripts keep the weights inside a checkpoint dict (torchvision's reference, timm, Lightning and
# hand-written loops), in the order tried: the first that holds a dict wins (timm's "state_dict" before its EMA)
STATE_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "ema", "state_dict_ema", "model_ema")
# prefixes wrappers add to every key: DistributedDataParallel/DataParallel, torch.compile, a Lightning module
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _without_wrapper_prefixes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                              ) -> dict[str, torch.Tensor]:
    """`state` with the wrapper prefixes that every one of its keys carries (and the model's keys do not)
    removed, outermost first."""
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def read_checkpoint(path: str | Path, model_name: str, num_classes: int) -> dict[str, torch.Tensor]:
    """A state dict from `path`, verified to load strictly into `model_name`; UserError otherwise."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"checkpoint {p} is a folder, not a state-dict file")
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        with warnings.catch_warnings():  # torch warns about legacy (plain pickle) files: the error below says it
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {p} is not weights-only loadable: it pickles code or objects other than "
                        f"tensors (refused for safety); save it with torch.save(model.state_dict(), path)") from None
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        raise UserError(f"checkpoint {p} could not be read: {type(e).__name__}: {_first_line(e)}") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next((obj[k] for k in STATE_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {p} is not a state dict (a mapping of parameter names to tensors), nor a "
                        f"dict holding one under {', '.join(STATE_KEYS)}")
    model = create_model(model_name, num_classes=num_classes)
    expected = model.state_dict()
    obj = _without_wrapper_prefixes(obj, expected)
    missing = [k for k in expected if k not in obj]
    unexpected = [k for k in obj if k not in expected]
    shapes = [k for k in expected if k in obj and obj[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: {tuple(obj[k].shape)} vs "
                         f"{tuple(expected[k].shape)})")
        raise UserError(f"checkpoint {p} does not match {model_name} with {num_classes} classes: "
                        + "; ".join(parts) + _head_hint(obj, expected, shapes, missing or unexpected, num_classes))
    return obj


def _head_hint(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], shapes: list[str],
               other_mismatch: list[str], num_classes: int) -> str:
    """When only the classifier's rows differ (a head for other classes), what to add to the command."""
    if other_mismatch or not shapes:
        return ""
    heads = {state[k].shape[0] for k in shapes}
    if (len(heads) != 1 or any(expected[k].shape[0] != num_classes or state[k].shape[1:] != expected[k].shape[1:]
                               for k in shapes)):
        return ""
    head = heads.pop()
    return (f"; its head has {head} classes: use --num-classes {head} to start from it and train a new head "
            "for the data's classes")


def model_with_new_head(model_name: str, state: dict[str, torch.Tensor], head_classes: int, num_classes: int
                        ) -> nn.Module:
    """`model_name` with the checkpoint `state` (a `head_classes`-way head) loaded and its head replaced by a fresh
    `num_classes`-way one; UserError unless that is the model ``create_model`` builds for `num_classes` (which
    every later stage and the bundle rebuild)."""
    model = create_model(model_name, num_classes=head_classes)
    model.load_state_dict(state)
    replace_head(model, model_name, head_classes=head_classes, num_classes=num_classes)
    got, want = model.state_dict(), create_model(model_name, num_classes=num_classes).state_dict()
    differ = [k for k in {**got, **want} if k not in got or k not in want or got[k].shape != want[k].shape]
    if differ:
        raise UserError(f"model {model_name}: with its {head_classes}-class head replaced it is not the model it "
                        f"builds for {num_classes} classes (e.g. {differ[0]}), so the pruned model could not be "
                        f"rebuilt; save the checkpoint with a {num_classes}-class head")
    return model


def train_baseline(data: Dataset, model_name: str, *, epochs: int, lr: float, batch_size: int, weight_decay: float,
                   label_smoothing: float, amp: str, device: torch.device, workdir: Path, seed: int,
                   momentum: float = 0.9, checkpoint: dict[str, torch.Tensor] | None = None,
                   head_classes: int | None = None, cutout: int = 0) -> nn.Module:
    """Train the dense model with the same recipe as fine-tuning (resumable): from scratch, or from `checkpoint`
    (a state dict with a `head_classes`-way head) with a new head for the data's classes."""
    torch.manual_seed(seed)
    if checkpoint is None:
        model = create_model(model_name, num_classes=data.num_classes)
    else:
        model = model_with_new_head(model_name, checkpoint, head_classes, data.num_classes)
    model = model.to(device, memory_format=torch.channels_last)
    train = DeviceLoader(data.train, data, batch_size, device, shuffle=True, augment=True, seed=seed,
                         cutout=cutout, channels_last=True, rank=dist_utils.rank(), world=dist_utils.world_size())
    test = DeviceLoader(data.test, data, 512, device, channels_last=True)
    recipe = Recipe(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    label_smoothing=label_smoothing, amp=amp,
                    warmup_steps=len(train))  # one epoch of warm-up from scratch
    fit(dist_utils.wrap(model, device), train, test, device, recipe, workdir, desc="baseline")
    return model


@dataclass(frozen=True)
class Training:
    """How the baseline is trained when no checkpoint is given, or a checkpoint's head is replaced."""

    epochs: int
    lr: float
    momentum: float
    batch_size: int
    weight_decay: float
    label_smoothing: float
    amp: str
    world: int  # processes under torchrun: the global batch is batch_size x world
    cutout: int | None = field(default=None, metadata=OMIT_IF_NONE)  # square side; None: off (keys from before)


@dataclass(frozen=True)
class Inputs:
    data: DataSpec
    model: str
    checkpoint: str | None = None  # a state-dict file; its content is checkpoint_sha256
    checkpoint_sha256: str | None = None
    training: Training | None = None  # None when the checkpoint is the baseline
    # the checkpoint's head size when it is not the data's (--num-classes): a new head is trained with `training`
    head_classes: int | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class Result:
    test_acc: float
    source: str  # the checkpoint's path, or "trained"


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    data = ctx.data
    if inputs.checkpoint is not None and inputs.head_classes is None:
        model = create_model(inputs.model, num_classes=data.num_classes)
        model.load_state_dict(read_checkpoint(inputs.checkpoint, inputs.model, data.num_classes))
        model.to(ctx.device)
    else:
        t = inputs.training
        start = (read_checkpoint(inputs.checkpoint, inputs.model, inputs.head_classes)
                 if inputs.checkpoint is not None else None)
        model = train_baseline(data, inputs.model, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                               momentum=t.momentum, weight_decay=t.weight_decay, label_smoothing=t.label_smoothing,
                               amp=t.amp, device=ctx.device, workdir=folder, seed=inputs.data.seed,
                               checkpoint=start, head_classes=inputs.head_classes, cutout=t.cutout or 0)
    acc = evaluate(model, DeviceLoader(data.test, data, 500, ctx.device), ctx.device, desc="eval dense")
    if dist_utils.is_main():
        atomic_torch_save(model.cpu().state_dict(), folder / "model.pt")
    source = inputs.checkpoint or "trained"
    if inputs.head_classes is not None:
        source = f"{inputs.checkpoint}, {inputs.head_classes}-class head replaced and trained"
    return Result(test_acc=acc, source=source)


def load_model(ctx: StageContext, digest: str, model: str) -> nn.Module:
    """The dense model a finished baseline stage saved, in eval mode on the CPU."""
    dense = create_model(model, num_classes=ctx.data.num_classes)
    state = torch.load(ctx.folder(NAME, digest) / "model.pt", map_location="cpu", weights_only=True)
    dense.load_state_dict(state)
    return dense.eval()


def source_model(ctx: StageContext, digest: str, model: str, *, at_init: bool, seed: int) -> nn.Module:
    """What is ranked and cut: the dense model, or (pruning at initialisation, MIPP --at-init) a freshly
    initialised one, the same for a given seed."""
    if not at_init:
        return load_model(ctx, digest, model)
    torch.manual_seed(seed)
    return create_model(model, num_classes=ctx.data.num_classes).eval()
