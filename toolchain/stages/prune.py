"""Prune stage (how to prune): find prunable convs and remove channels for real.

Torch-Pruning's dependency graph decides which layers change together. A conv's output channels
are prunable here with everything that outputs the same channels: its BatchNorm, a depthwise
conv it feeds (MobileNet, EfficientNet) and the convs whose outputs are added to it (a ResNet's
residual stream: the stem or a downsample with the last conv of every block); the group is
named after its first conv in execution order and cut as one. The consumers' matching inputs
go with it. Not prunable: channels a linear layer outputs (the classifier) or that a member
numbers differently (a concatenation). Protected layers (``--protect``, ``toolchain.protect``: by
default the stem of torchvision, timm and import-path models) are prunable but keep every channel.

Plain removal is the default: the channel, its BN entries and the consumers' matching inputs
go, nothing else changes. The reference for a cut is the dense model, and the compensation
refit (toolchain.compensation) is what brings the pruned model back towards it.

``fold=True`` (``--fold masked``) instead reproduces *masking* exactly (zeroing the filter's
weights and bias). A masked channel still emits a constant (its BN shift through the
activation); folding puts that constant into the consumer's bias for positions whose receptive
field lies inside the map and, where zero padding makes the border positions see less of it,
into a fixed per-position ``border_bias`` buffer. Measured on the shared VGG16 (L1, 40%
removed, BN re-estimated): 37.7% folded vs 51.1% plain, because the border offsets are
position-dependent and BN re-estimation cannot remove them; the border map also ties the model
to one input size. It is kept for whoever needs pruned == masked.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from toolchain.allocation import SENSITIVITY_FRACTIONS, allocate_for_budget
from toolchain.compensation import compensate
from toolchain.cost import count_flops_params
from toolchain.data import DeviceLoader, balanced_indices
from toolchain.models import create_model
from toolchain.ranking.base import LayerRanking, PrunableLayer
from toolchain.ranking.cutoffs import parse_budget
from toolchain.stages import baseline, rank
from toolchain.stages import latency as latency_stage
from toolchain.stages.base import OMIT_IF_NONE, StageContext
from toolchain.train.loop import evaluate, recalibrate_batchnorm
from toolchain.util import atomic_torch_save, atomic_write_json, stable_hash

NAME = "prune"


class BorderBiasConv2d(nn.Conv2d):
    """A Conv2d plus a constant (C_out, H, W) map: the folded border effect of removed inputs."""

    border_bias: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.border_bias


@dataclass
class PruneRecord:
    """Everything needed to rebuild the pruned architecture from the dense one (replayable)."""

    kept: dict[str, list[int]]  # layer -> kept output channel indices (dense numbering), sorted
    channels: dict[str, int]  # layer -> dense channel count
    bias_added: list[str] = field(default_factory=list)  # consumers that had no bias before folding
    border_bias: dict[str, list[int]] = field(default_factory=dict)  # consumer -> buffer shape

    def to_json(self) -> dict[str, Any]:
        return {"kept": self.kept, "channels": self.channels, "bias_added": self.bias_added,
                "border_bias": self.border_bias,
                "kept_counts": {k: len(v) for k, v in self.kept.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PruneRecord:
        return cls({k: list(v) for k, v in d["kept"].items()}, dict(d["channels"]), list(d["bias_added"]),
                   {k: list(v) for k, v in d["border_bias"].items()})


def _plain(idxs) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


def _build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def find_prunable_layers(model: nn.Module, example: torch.Tensor,
                         graph: tp.DependencyGraph | None = None) -> list[PrunableLayer]:
    """Prunable convs in network order, with their BN, consumers and dense FLOPs."""
    names = {m: n for n, m in model.named_modules()}
    shapes: dict[str, tuple[int, int]] = {}
    order: list[str] = []

    def hook(mod, _inp, out):
        if names[mod] not in shapes:
            order.append(names[mod])
        shapes[names[mod]] = tuple(out.shape[-2:])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    modes = {m: m.training for m in model.modules()}  # the caller's train/eval state, restored below
    try:
        with torch.no_grad():
            model.eval()(example[:1])
        graph = graph or _build_graph(model, example)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    modules = dict(model.named_modules())
    layers = []
    cut: set[str] = set()  # convs already cut as members of an earlier group
    for name in order:  # execution order
        conv = modules[name]
        if conv.groups != 1 or name in cut:
            continue
        group = _channel_group(graph, conv, names)
        if group is None:
            continue
        bn_name, consumers, members, member_bns, residual = group
        cut.update(members)
        ho, wo = shapes[name]
        kh, kw = conv.kernel_size
        flops = 2.0 * conv.out_channels * ho * wo * conv.in_channels * kh * kw
        layers.append(PrunableLayer(name=name, conv=conv, bn_name=bn_name, channels=conv.out_channels,
                                    flops=flops, out_hw=(ho, wo), consumers=consumers, members=members,
                                    member_bns=member_bns, residual=residual))
    return layers


def _channel_group(graph: tp.DependencyGraph, conv: nn.Conv2d, names: dict[nn.Module, str]
                   ) -> tuple[str | None, list[str], list[str], list[str], bool] | None:
    """(its BN, consumers, members, members' BNs, whether other convs' outputs are added to them) of the channels
    `conv` outputs, or None when they cannot be cut here: a linear layer's outputs are among them (the
    classifier), a member numbers them differently (a concatenation), or nothing consumes them."""
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    bns, consumers, members = [], [], []
    residual = False
    for dep, _ in group.items:
        target = dep.target.module
        if isinstance(target, tp.ops._ElementWiseOp) and len(dep.target.inputs) > 1:
            residual = residual or str(target._grad_fn).startswith(("Add", "Sub"))  # two streams summed (not x + 3)
        if target is conv or not isinstance(target, nn.Module):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            if isinstance(target, nn.modules.batchnorm._BatchNorm):
                bns.append(target)
            elif isinstance(target, nn.Conv2d) and target.out_channels == conv.out_channels:
                members.append(names[target])  # a depthwise conv it feeds, or a conv added to it
            elif isinstance(target, (nn.Conv2d, nn.Linear)):
                return None
        elif graph.is_in_channel_pruning_fn(dep.handler) and isinstance(target, (nn.Conv2d, nn.Linear)):
            consumers.append(names[target])
    if not consumers:
        return None
    # its own BN is the one its output feeds (the first found when the graph does not say)
    own = next((bn for bn in bns if any(n.module is conv for n in graph.module2node[bn].inputs)), None)
    own = own or (bns[0] if bns else None)
    return (names[own] if own is not None else None, consumers, members,
            [names[bn] for bn in bns if bn is not own], residual)


def group_owners(layers: list[PrunableLayer]) -> dict[str, str]:
    """Every conv whose outputs a layer's cut removes (the layer itself and its members) -> the layer's name."""
    return {conv: layer.name for layer in layers for conv in (layer.name, *layer.members)}


def resolve_keep_counts(layers: list[PrunableLayer], rankings: dict[str, LayerRanking], *, keep_ratio: float,
                        per_layer: dict[str, float], round_to: int = 1, protected: Sequence[str] = ()
                        ) -> dict[str, int]:
    """Kept channels per layer: all of a protected layer's (``--protect``), else the per-layer map, else the
    criterion's own count, else the ratio."""
    from toolchain.errors import UserError

    valid = {layer.name for layer in layers}
    unknown = sorted(set(per_layer) - valid)
    if unknown:
        raise UserError(f"keep: unknown layer(s) {', '.join(unknown)}; prunable layers: {', '.join(sorted(valid))}")
    counts = {}
    for layer in layers:
        c = layer.channels
        if layer.name in protected:
            counts[layer.name] = c
            continue
        if layer.name in per_layer:
            v = per_layer[layer.name]
            k = round(v * c) if v <= 1 else int(v)
        elif rankings[layer.name].keep is not None:
            k = int(rankings[layer.name].keep)
        else:
            k = round(keep_ratio * c)
        if round_to > 1:
            k = -(-k // round_to) * round_to
        counts[layer.name] = max(1, min(c, k))
    return counts


def kept_indices(rankings: dict[str, LayerRanking], counts: dict[str, int]) -> dict[str, list[int]]:
    return {name: sorted(int(i) for i in rankings[name].order[:k]) for name, k in counts.items()}


def mask_model(model: nn.Module, kept: dict[str, list[int]], members: dict[str, list[str]] | None = None
               ) -> nn.Module:
    """A copy of the dense model with every removed filter's weights and bias set to zero: the layer's own and
    those of its `members` (``PrunableLayer.members`` by layer name), which output the same channels."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name, keep in kept.items():
            for conv in (modules[m] for m in (name, *(members or {}).get(name, ()))):
                drop = sorted(set(range(conv.out_channels)) - set(keep))
                conv.weight[drop] = 0
                if conv.bias is not None:
                    conv.bias[drop] = 0
    return masked


def consumer_outputs(layers: list[PrunableLayer], kept: dict[str, list[int]]) -> dict[str, list[int] | None]:
    """Consumers whose inputs shrink -> the dense output channels they keep (None: all)."""
    owner = group_owners(layers)
    out: dict[str, list[int] | None] = {}
    for layer in layers:
        if layer.name in kept and len(kept[layer.name]) < layer.channels:
            for consumer in layer.consumers:  # a consumer may itself be cut as a member of another group
                group = owner.get(consumer)
                out[consumer] = sorted(kept[group]) if group in kept else None
    return out


def prune_model(model: nn.Module, example: torch.Tensor, kept: dict[str, list[int]], *,
                fold: bool = False) -> tuple[nn.Module, PruneRecord]:
    """Remove the channels not in `kept` (a deep copy is pruned; `model` is untouched).

    With ``fold`` the constants that removed channels fed forward are folded into the consumers
    (computed from a forward pass of the masked model in eval mode), so that
    ``pruned(x) == mask_model(model, kept)(x)`` for every x.
    """
    model = copy.deepcopy(model).eval()
    graph = _build_graph(model, example)  # one trace serves finding the layers and pruning them
    layers = {layer.name: layer for layer in find_prunable_layers(model, example, graph)}
    missing = sorted(set(kept) - set(layers))
    if missing:
        raise ValueError(f"not prunable layers: {missing}")
    removed = {n: sorted(set(range(layers[n].channels)) - set(k)) for n, k in kept.items()}
    names = {m: n for n, m in model.named_modules()}
    # consumer -> input indices (in its own input numbering) that disappear
    consumer_inputs: dict[str, list[int]] = {}
    groups = []
    for name, drop in removed.items():
        if not drop:
            continue
        group = graph.get_pruning_group(layers[name].conv, tp.prune_conv_out_channels, idxs=drop)
        for dep, idxs in group.items:
            target = dep.target.module
            if (graph.is_in_channel_pruning_fn(dep.handler) and isinstance(target, (nn.Conv2d, nn.Linear))
                    and names[target] not in layers[name].members):  # a depthwise member is cut, not refed
                consumer_inputs.setdefault(names[target], []).extend(_plain(idxs))
        groups.append(group)

    members = {n: layers[n].members for n in kept}
    corrections = _fold_corrections(model, example, kept, consumer_inputs, members) if fold else {}
    owner = group_owners(list(layers.values()))
    for group in groups:
        group.prune()

    record = PruneRecord(kept={n: sorted(k) for n, k in kept.items()},
                         channels={n: layers[n].channels for n in kept})
    modules = dict(model.named_modules())
    for cname, (bias, border) in corrections.items():
        consumer = modules[cname]
        out_keep = torch.tensor(kept.get(owner.get(cname, cname), range(bias.numel())), dtype=torch.long)
        bias = bias[out_keep].to(consumer.weight.dtype)
        with torch.no_grad():
            if consumer.bias is None:
                consumer.bias = nn.Parameter(bias.clone())
                record.bias_added.append(cname)
            else:
                consumer.bias += bias
        if border is not None:
            _attach_border(consumer, border[out_keep].to(consumer.weight.dtype))
            record.border_bias[cname] = list(consumer.border_bias.shape)
    return model, record


def _attach_border(conv: nn.Module, border: torch.Tensor) -> None:
    conv.__class__ = BorderBiasConv2d
    conv.register_buffer("border_bias", border.detach().clone())


@torch.no_grad()
def _fold_corrections(model: nn.Module, example: torch.Tensor, kept: dict[str, list[int]],
                      consumer_inputs: dict[str, list[int]], members: dict[str, list[str]]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per consumer: (bias increment for all its outputs, border map or None)."""
    masked = mask_model(model, kept, members).eval()
    modules = dict(masked.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[c].register_forward_pre_hook(lambda m, args, c=c: captured.__setitem__(c, args[0].detach()))
               for c in consumer_inputs]
    try:
        with torch.no_grad():
            masked(example)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for cname, idxs in consumer_inputs.items():
        consumer, x = modules[cname], captured[cname].double()
        idx = torch.tensor(sorted(set(idxs)), dtype=torch.long)
        values = x[:, idx]
        const = values.reshape(len(x), len(idx), -1)[0, :, 0]  # one value per removed input
        spread = (values - const.view(1, -1, *([1] * (values.dim() - 2)))).abs().max()
        if spread > 1e-5 * (1 + const.abs().max()):
            raise RuntimeError(f"inputs of {cname} from removed channels are not constant; cannot fold")
        if isinstance(consumer, nn.Linear):
            bias = consumer.weight.double()[:, idx] @ const
            out[cname] = (bias, None)
            continue
        x_removed = torch.zeros_like(x[:1])
        x_removed[:, idx] = values[:1]
        full = F.conv2d(x_removed, consumer.weight.double(), None, consumer.stride, consumer.padding,
                        consumer.dilation, consumer.groups)[0]  # what the removed inputs add, per position
        interior = torch.einsum("ockl,c->o", consumer.weight.double()[:, idx], const)
        border = full - interior.view(-1, 1, 1)
        has_border = border.abs().max() > 1e-12 * (1 + interior.abs().max())
        out[cname] = (interior, border if has_border else None)
    return out


def build_pruned(dense: nn.Module, example: torch.Tensor, record: PruneRecord) -> nn.Module:
    """Replay a PruneRecord on a dense model to get the pruned architecture (weights to be loaded)."""
    model, _ = prune_model(dense, example, record.kept, fold=False)
    modules = dict(model.named_modules())
    for cname in record.bias_added:
        m = modules[cname]
        m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype))
    for cname, shape in record.border_bias.items():
        _attach_border(modules[cname], torch.zeros(shape, dtype=modules[cname].weight.dtype))
    return model


# -- the stage ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    rank: str  # digest
    baseline: str  # digest
    model: str
    seed: int
    keep_ratio: float = 0.5
    keep: dict[str, float] = field(default_factory=dict)  # per-layer ratio (<= 1) or count (> 1)
    round_to: int = 1
    budget: str | None = None  # "flops=0.4": counts from the measured sensitivity instead of keep_ratio
    bn_images: int = 2000  # training images for the BN re-estimation
    fold: str = "none"
    compensation: str = "lstsq"  # "none" when pruning at init: there is no trained network to match
    compensation_samples: int = 2048  # also the images a budget's sensitivity probes re-estimate BN on
    at_init: bool = False
    latency: str | None = field(default=None, metadata=OMIT_IF_NONE)  # the latency stage's digest (latency budget)
    # layers kept whole (--protect, resolved in preflight); None when there are none, so earlier keys stay
    protect: list[str] | None = field(default=None, metadata=OMIT_IF_NONE)
    # a budget's sensitivity grid (--sensitivity-fractions); None for the default, so earlier keys stay
    sensitivity_fractions: list[float] | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class Result:
    flops_dense: int
    flops_pruned: int
    params_dense: int
    params_pruned: int
    acc_pruned: float  # removed, nothing else
    acc_pruned_bn_recalibrated: float
    acc_oneshot: float  # what fine-tuning starts from: compensated (when on) and BN re-estimated
    bn_images: int
    kept_counts: dict[str, int]
    channels_removed: int
    channels_dense: int
    allocation: dict[str, Any] | None = None  # with a budget
    compensation: dict[str, Any] | None = None
    sensitivity: str | None = None  # the folder of the cached sensitivity (a budget's), under .work


def sensitivity_folder(ctx: StageContext, inputs: Inputs) -> Path:
    """A budget's allocation measures every layer's sensitivity first. With compensation that does not depend
    on the budget, so runs at other budgets (a study's flops=0.4 and 0.2) share it: a plain cached file keyed
    by what it reads (the prune stage runs on one rank only, so it needs no stage of its own). Without
    compensation it is measured around the budget's uniform cut (``toolchain.allocation``), which the
    budget and the protected layers decide."""
    key = {"stage": "sensitivity", "rank": inputs.rank, "compensation": inputs.compensation,
           "compensation_samples": inputs.compensation_samples, "seed": inputs.seed}
    if inputs.compensation == "none":
        key.update(context=inputs.budget, protect=sorted(inputs.protect or ()), latency=inputs.latency)
    return ctx.root / ("sensitivity-" + stable_hash(key))


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    data, device, seed = ctx.data, ctx.device, inputs.seed
    example = torch.zeros(2, *data.input_shape)
    source = baseline.source_model(ctx, inputs.baseline, inputs.model, at_init=inputs.at_init, seed=seed)
    dense = baseline.load_model(ctx, inputs.baseline, inputs.model) if inputs.at_init else source
    layers = find_prunable_layers(dense, example)
    rankings = rank.load_rankings(ctx.folder(rank.NAME, inputs.rank))
    compensating = inputs.compensation != "none"
    test_loader = DeviceLoader(data.test, data, 500, device)
    fit_images = data.normalize(data.train.images[balanced_indices(data.train.labels, inputs.compensation_samples,
                                                                   seed + 2)].to(device))
    extra: dict[str, Any] = {}
    if inputs.budget:
        probe = data.normalize(data.train.images[balanced_indices(data.train.labels, 256, seed + 3)].to(device))
        sensitivity = sensitivity_folder(ctx, inputs)
        table = latency_stage.load_table(ctx, inputs.latency) if inputs.latency else None
        counts, extra["allocation"] = allocate_for_budget(
            source.to(device), layers, rankings, example.to(device), probe, fit_images[:128],
            parse_budget(inputs.budget), compensation=compensating, round_to=inputs.round_to, seed=seed,
            cache=sensitivity / "sensitivity.json", latency=table,
            measure=_host_measure(table, source, example, rankings, data.input_shape), fixed=inputs.protect or (),
            fractions=tuple(inputs.sensitivity_fractions or SENSITIVITY_FRACTIONS))
        extra["sensitivity"] = sensitivity.name
        source.cpu()
    else:
        counts = resolve_keep_counts(layers, rankings, keep_ratio=inputs.keep_ratio, per_layer=inputs.keep,
                                     round_to=inputs.round_to, protected=inputs.protect or ())
    kept = kept_indices(rankings, counts)
    pruned, record = prune_model(source, example, kept, fold=inputs.fold == "masked")
    flops_d, params_d = count_flops_params(dense, data.input_shape)
    flops_p, params_p = count_flops_params(pruned, data.input_shape)
    acc_raw = evaluate(pruned.to(device), test_loader, device, desc="eval pruned")

    def recalibrate(model: nn.Module) -> int:
        probe = DeviceLoader(data.train, data, 256, device, shuffle=True, seed=seed + 1)
        return recalibrate_batchnorm(model, probe, device, inputs.bn_images)

    uncompensated = copy.deepcopy(pruned) if compensating else pruned
    recalibrated = recalibrate(uncompensated)
    acc_bn = evaluate(uncompensated, test_loader, device, desc="eval pruned+bn")
    acc_oneshot = acc_bn
    if compensating:
        report = compensate(pruned, source.to(device), fit_images, consumer_outputs(layers, kept), seed=seed)
        record.bias_added = sorted(set(record.bias_added) | set(report.bias_added))
        recalibrate(pruned)
        acc_oneshot = evaluate(pruned, test_loader, device, desc="eval compensated")
        extra["compensation"] = report.to_json()
    atomic_torch_save(pruned.cpu().state_dict(), folder / "pruned.pt")
    atomic_write_json(folder / "architecture.json", {"model": inputs.model, "num_classes": data.num_classes,
                                                     "input_shape": list(data.input_shape), **record.to_json(),
                                                     "protected": list(inputs.protect or [])})
    return Result(flops_dense=flops_d, flops_pruned=flops_p, params_dense=params_d, params_pruned=params_p,
                  acc_pruned=acc_raw, acc_pruned_bn_recalibrated=acc_bn, acc_oneshot=acc_oneshot,
                  bn_images=recalibrated, kept_counts=counts,
                  channels_removed=sum(layer.channels - counts[layer.name] for layer in layers),
                  channels_dense=sum(layer.channels for layer in layers), **extra)


def _host_measure(table, source: nn.Module, example: torch.Tensor, rankings: dict[str, LayerRanking],
                  input_shape) -> Any:
    """counts -> measured ms of the model pruned to them, when the table was measured on this host (a latency budget
    is then met as measured, ``allocation.meet_measured``); None otherwise (an estimate or a device table)."""
    if table is None or table.kind != "measured":
        return None
    from toolchain.latency import TorchTimer, measure_model
    from toolchain.stages.export import fold_batchnorm

    def measure(counts: dict[str, int]) -> float:
        pruned, _ = prune_model(copy.deepcopy(source).cpu(), example.cpu(), kept_indices(rankings, counts))
        if table.backend == "torch":
            timer = TorchTimer("cuda" if torch.cuda.is_available() else "cpu", table.precision, table.batch)
            return timer.time_module(fold_batchnorm(pruned.float()), (table.batch, *input_shape))
        return measure_model(pruned, tuple(input_shape), table.backend, table.threads, table.batch)

    return measure


def load_record(ctx: StageContext, digest: str) -> PruneRecord:
    """What a finished prune stage removed: the kept channels of every cut layer and the surgery's extras."""
    return PruneRecord.from_json(json.loads((ctx.folder(NAME, digest) / "architecture.json").read_text()))


def load_pruned(ctx: StageContext, digest: str, model: str, weights: Path | None = None) -> nn.Module:
    """The pruned architecture a finished prune stage recorded, with its weights (or `weights`), in eval mode."""
    folder = ctx.folder(NAME, digest)
    record = load_record(ctx, digest)
    pruned = build_pruned(create_model(model, num_classes=ctx.data.num_classes),
                          torch.zeros(2, *ctx.data.input_shape), record)
    pruned.load_state_dict(torch.load(weights or folder / "pruned.pt", map_location="cpu", weights_only=True))
    return pruned.eval()
