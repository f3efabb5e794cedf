"""One cost model of a CNN whose prunable convs keep some of their channels: FLOPs, parameters, filters.

The budget allocator, the study's FLOPs matching and the figures a run reports all read this model,
so "40% of the FLOPs" means one thing. Every cost is linear in the kept fractions: a conv or linear
layer costs ``dense * out_frac * in_frac``, where ``out_frac`` is the kept fraction of the group whose
channels it outputs (its own, or its group's for a member; 1 for other layers) and ``in_frac`` that
of the group it consumes (1 for a fixed input; a depthwise conv follows its own channels only); a
group's biases and BatchNorms cost ``dense * out_frac``, the rest nothing or a constant. FLOPs
are counted as ``torch.utils.flop_counter`` counts them (2 per multiply-accumulate of convs and
linear layers); ``total`` equals ``count_flops_params`` of the pruned model (tests/test_cost.py
checks it on pruned VGG, ResNet and MobileNet models).

A budget (``--budget flops=0.4``) is a fraction of the *prunable* groups' cost, ``budget_terms`` and
``member_terms``: that is what the allocator can change. ``fraction`` is of the whole model's cost, as reported
(``flops_ratio``); on VGG16 the two differ by the classifier's share, under 0.01%.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from toolchain.ranking.base import PrunableLayer
from toolchain.ranking.cutoffs import layer_costs

KINDS = ("flops", "params", "channels")


@dataclass(frozen=True)
class Term:
    """A cost that scales with the kept fraction of ``out`` (a prunable layer) and of ``inp`` (its producer)."""

    dense: float
    out: str | None = None  # None: does not scale with an output fraction
    inp: str | None = None  # None: does not scale with an input fraction
    module: str = ""  # the module it is the cost of ("": what the flop counter counts beyond modules)


@dataclass(frozen=True)
class CostModel:
    layers: tuple[PrunableLayer, ...]  # network order
    terms: dict[str, tuple[Term, ...]]  # kind -> every cost of the model
    dense_total: dict[str, float]

    @classmethod
    def of(cls, model: nn.Module, input_shape: Sequence[int], layers: Sequence[PrunableLayer]) -> CostModel:
        """The model of `model` (dense) at one image of `input_shape`, for the prunable `layers`."""
        group = {conv: layer.name for layer in layers for conv in (layer.name, *layer.members)}
        producer = {c: layer.name for layer in layers for c in layer.consumers}
        bn_of = {bn: layer.name for layer in layers for bn in (layer.bn_name, *layer.member_bns) if bn}
        flops = _module_flops(model, input_shape)
        terms: dict[str, list[Term]] = {kind: [] for kind in KINDS}
        for name, module in model.named_modules():
            out, inp = group.get(name), producer.get(name)
            if _is_depthwise(module):  # one filter per channel: its cost follows its own channels only
                inp = None
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if name in flops:
                    terms["flops"].append(Term(flops[name], out, inp, name))
                terms["params"].append(Term(float(module.weight.numel()), out, inp, name))
                if module.bias is not None:
                    terms["params"].append(Term(float(module.bias.numel()), out, None, name))
            elif name in bn_of:  # the BN of a prunable conv shrinks with it
                terms["params"] += [Term(float(p.numel()), bn_of[name], None, name)
                                    for p in module.parameters(recurse=False)]
            else:
                terms["params"] += [Term(float(p.numel()), None, None, name) for p in module.parameters(recurse=False)]
        terms["channels"] = [Term(float(layer.channels), layer.name, None, layer.name) for layer in layers]
        flops_total, params_total = count_flops_params(model, input_shape)
        # what the flop counter counts beyond convs and linears (other matmuls) stays as a constant
        rest = flops_total - sum(t.dense for t in terms["flops"])
        if rest:
            terms["flops"].append(Term(rest))
        frozen = {kind: tuple(ts) for kind, ts in terms.items()}
        return cls(tuple(layers), frozen, {"flops": float(flops_total), "params": float(params_total),
                                           "channels": float(sum(layer.channels for layer in layers))})

    def _fractions(self, counts: dict[str, int]) -> dict[str, float]:
        return {layer.name: counts.get(layer.name, layer.channels) / layer.channels for layer in self.layers}

    def total(self, kind: str, counts: dict[str, int]) -> float:
        """The cost (FLOPs of one image, parameters or filters) of the model pruned to `counts` (missing
        layers: whole)."""
        frac = self._fractions(counts)
        return sum(t.dense * (frac[t.out] if t.out else 1.0) * (frac[t.inp] if t.inp else 1.0)
                   for t in self.terms[kind])

    def fraction(self, kind: str, counts: dict[str, int]) -> float:
        """Pruned / dense cost of the whole model: the reported ``flops_ratio`` and ``params_ratio``."""
        return self.total(kind, counts) / self.dense_total[kind]

    def budget_terms(self, kind: str) -> tuple[list[float], list[float], list[int | None]]:
        """``(coupled, out_only, producer)`` per prunable layer: the allocator's linear model
        (``ranking.cutoffs.layer_costs``, ``allocate_budget``), the part of ``terms`` a cut changes that
        belongs to the prunable layers' first convs and their BatchNorms; ``member_terms`` is the rest."""
        return layer_costs(list(self.layers), kind)

    def member_terms(self, kind: str) -> list[tuple[float, int | None, int | None]]:
        """``(dense, out layer index, input layer index)`` of the groups' other members (their convs and
        BatchNorms): what a budget counts beyond ``budget_terms`` (``allocate_budget``'s ``extra``)."""
        index = {layer.name: i for i, layer in enumerate(self.layers)}
        members = {m for layer in self.layers for m in (*layer.members, *layer.member_bns)}
        return [(t.dense, index.get(t.out), index.get(t.inp)) for t in self.terms[kind] if t.module in members]


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def count_flops_params(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """(FLOPs of one image, parameter count) as measured on a model; FLOPs from torch.utils.flop_counter
    (2 per multiply-accumulate)."""
    p = next(model.parameters())
    x = torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops()), sum(q.numel() for q in model.parameters())


def layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    """FLOPs of one call of a conv (any dimension, grouped) or linear layer that produced `output`:
    2 x output elements x inputs each one reads, as ``torch.utils.flop_counter`` counts them. The
    cost model and the roofline estimate (``toolchain.roofline``) both count with it."""
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    return 2 * output.numel() * module.weight[0].numel()  # conv: (C_in / groups) x kernel per output


def _module_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """Dense FLOPs of every Conv2d and Linear for one image (2 per multiply-accumulate, as the flop counter)."""
    names = {m: n for n, m in model.named_modules()}
    flops: dict[str, float] = {}

    def hook(mod, _inp, out):
        flops[names[mod]] = flops.get(names[mod], 0.0) + float(layer_flops(mod, out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    p = next(model.parameters())
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return flops
