"""How much to cut where: keep counts for all layers together under a FLOPs or parameter budget.

A uniform ratio treats every layer alike, but layers differ a lot in what a cut costs: on the
shared VGG16 the late 512-channel blocks are highly redundant while the first blocks are not
(docs/design/algorithms.md §3: removing more from late blocks gave 87.2% at 37.7% of the FLOPs
against 85.1% at 36.1% for a uniform cut). The paper's CMI-curve allocation compares curves
that are not on a common scale and gave absurd allocations (7 of 64 channels in layer 0), so
the allocation here works for every criterion and measures what matters:

1. *Sensitivity*: each layer alone is cut to a few kept fractions (the criterion's own order
   decides which channels stay), its consumers are refitted as the prune stage would
   (``toolchain.compensation``), and the damage is measured as the KL divergence of the
   network's output from the dense output on held-out training images (no test data). Without
   compensation BN statistics are re-estimated instead.
2. *Allocation*: sensitivity between the measured fractions is interpolated (piecewise
   linear, made monotone; no layer goes below its smallest measured fraction), layers are
   assumed to add up, and channels are dropped greedily,
   ``round_to`` at a time, from the layer whose next drop costs the least sensitivity per unit
   of budget saved (``toolchain.ranking.cutoffs.allocate_budget``: its cost model counts a
   layer's FLOPs against both its own kept outputs and its producer's kept inputs), until the
   budget is met.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolchain.cost import CostModel
from toolchain.latency import LatencyTable
from toolchain.ranking.base import LayerRanking, PrunableLayer
from toolchain.ranking.cutoffs import Budget, Extra, allocate_budget, budget_cost, layer_costs
from toolchain.util import atomic_write_json

SENSITIVITY_FRACTIONS = (0.75, 0.5, 0.25, 0.1)  # kept fractions probed per layer


@torch.no_grad()
def _kl_from_dense(model: nn.Module, images: torch.Tensor, reference: torch.Tensor, batch: int = 128) -> float:
    model.eval()
    total = 0.0
    for a in range(0, len(images), batch):
        logp = F.log_softmax(model(images[a:a + batch]).double(), 1)
        ref = reference[a:a + batch]
        total += float((ref.exp() * (ref - logp)).sum())
    return total / len(images)


@torch.no_grad()
def layer_sensitivity(dense: nn.Module, layers: Sequence[PrunableLayer], rankings: dict[str, LayerRanking],
                      example: torch.Tensor, probe: torch.Tensor, fit: torch.Tensor, *, compensation: bool,
                      fractions: Sequence[float] = SENSITIVITY_FRACTIONS, seed: int = 0,
                      progress=None) -> dict[str, list[list[float]]]:
    """Per layer, ``[[kept_fraction, KL], ...]`` (1.0 -> 0 included) from cutting that layer alone."""
    from toolchain.compensation import compensate
    from toolchain.stages.prune import consumer_outputs, prune_model
    from toolchain.train.loop import recalibrate_batchnorm

    dense = dense.eval()
    reference = torch.cat([F.log_softmax(dense(probe[a:a + 128]).double(), 1) for a in range(0, len(probe), 128)])
    out: dict[str, list[list[float]]] = {}
    for layer in layers:
        points = [[1.0, 0.0]]
        dense_targets: dict = {}  # the cuts of one layer refit the same consumers towards the same dense outputs
        for frac in fractions:
            k = max(1, round(frac * layer.channels))
            kept = {layer.name: sorted(int(i) for i in rankings[layer.name].order[:k])}
            pruned, _ = prune_model(dense, example, kept)
            pruned.to(probe.device)
            if compensation:
                compensate(pruned, dense, fit, consumer_outputs(list(layers), kept), seed=seed, max_views=4,
                           dense_targets=dense_targets)
            else:
                batches = [(fit[a:a + 128], None) for a in range(0, len(fit), 128)]
                recalibrate_batchnorm(pruned, batches, fit.device, len(fit))
            points.append([k / layer.channels, _kl_from_dense(pruned, probe, reference)])
            if progress is not None:
                progress()
        out[layer.name] = points
    return out


def sensitivity_curve(points: Sequence[Sequence[float]], channels: int) -> np.ndarray:
    """Damage when keeping k = 0..C channels (length C + 1, non-increasing in k), interpolated; ``inf`` below
    the smallest kept count that was measured."""
    pts = sorted((float(f) * channels, float(v)) for f, v in points)
    ks = np.array([p[0] for p in pts])
    vs = np.array([p[1] for p in pts])
    # keeping fewer channels never hurts less: cumulative max from the dense end down
    vs = np.maximum.accumulate(vs[::-1])[::-1]
    grid = np.arange(channels + 1, dtype=np.float64)
    curve = np.interp(grid, ks, vs)
    # below the smallest probe nothing was measured: the allocator must not go there. Extrapolating the
    # last slope let a layer whose damage was flat from 25% to 10% kept fall to 1 of 512 channels on the
    # shared VGG16 (flops=0.2: 18.1% top-1 instead of 85%)
    curve[grid < ks[0] - 1e-9] = np.inf
    return curve


def allocate(layers: Sequence[PrunableLayer], sensitivity: dict[str, list[list[float]]], budget: Budget, *,
             round_to: int = 1, min_keep: int | None = None, members: Sequence[Extra] = ()
             ) -> tuple[dict[str, int], dict[str, Any]]:
    """Keep counts meeting ``budget`` from measured sensitivities (module docstring); ``members``: the costs
    of the groups' other convs (``CostModel.member_terms``), needed when any layer has members."""
    if any(layer.members for layer in layers) and not members:
        raise ValueError("allocate: the layers have group members; pass their costs (CostModel.member_terms)")
    channels = [layer.channels for layer in layers]
    curves = [sensitivity_curve(sensitivity[layer.name], layer.channels) for layer in layers]
    coupled, out_only, producer = layer_costs(list(layers), budget.kind)
    step = max(1, int(round_to))
    floor = min_keep if min_keep is not None else step
    keep = allocate_budget(curves, channels, coupled, out_only, producer, budget.fraction, min_keep=floor, step=step,
                           extra=members)
    counts = {layer.name: int(k) for layer, k in zip(layers, keep)}
    info = {"budget": str(budget), "cost": budget_cost(keep, channels, coupled, out_only, producer, members),
            "predicted_damage": float(sum(c[k] for c, k in zip(curves, keep))), "round_to": step}
    return counts, info


def meet_measured(solve: Callable[[float], tuple[dict[str, int], dict[str, Any]]],
                  measure: Callable[[dict[str, int]], float], budget_ms: float, *, rounds: int = 6,
                  tolerance: float = 0.03) -> tuple[dict[str, int], dict[str, Any]]:
    """Allocate against the table, measure the pruned model, and aim the table's budget until the measured latency
    is within `tolerance` of the budget: a table of convs timed alone predicts the network only roughly
    (``toolchain.latency.fit_weight_stream``). The aim moves by the measured ratio until one round measured under
    the budget and one over, then by bisection between the closest two. The answer is the round measured closest
    to the budget without going over it by more than the tolerance (else the fastest)."""
    target, tried = budget_ms, []
    for _ in range(rounds):
        counts, info = solve(target)
        measured = float(measure(counts))
        tried.append((counts, info, measured, target))
        if abs(measured / budget_ms - 1) <= tolerance:
            break
        under = [t for t in tried if t[2] < budget_ms]
        over = [t for t in tried if t[2] > budget_ms]
        if under and over:
            low, high = max(under, key=lambda t: t[3])[3], min(over, key=lambda t: t[3])[3]
            target = (low + high) / 2 if low < high else target * budget_ms / measured
        else:
            target *= budget_ms / measured
    fits = [t for t in tried if t[2] <= budget_ms * (1 + tolerance)]
    counts, info, measured, target = (max(fits, key=lambda t: t[2]) if fits else min(tried, key=lambda t: t[2]))
    return counts, {**info, "measured_ms": measured, "table_budget_ms": target, "budget_ms": budget_ms,
                    "rounds": [{"table_budget_ms": t, "predicted_ms": i["predicted_ms"], "measured_ms": m}
                               for _, i, m, t in tried]}


def allocate_for_budget(dense: nn.Module, layers: Sequence[PrunableLayer], rankings: dict[str, LayerRanking],
                        example: torch.Tensor, probe: torch.Tensor, fit: torch.Tensor, budget: Budget, *,
                        compensation: bool, round_to: int = 1, seed: int = 0,
                        cache: Path | None = None, latency: LatencyTable | None = None,
                        measure: Callable[[dict[str, int]], float] | None = None, fixed: Sequence[str] = ()
                        ) -> tuple[dict[str, int], dict[str, Any]]:
    """Measure the sensitivity (or read it from `cache`, a JSON file written by an earlier call with the same
    model, rankings, images and settings: it does not depend on the budget), then allocate under `budget`
    (a latency budget: with the knapsack over `latency`, the target's table, ``toolchain.knapsack``; with
    `measure`, counts -> the pruned model's measured ms on this host, the budget is met as measured,
    ``meet_measured``). The `fixed` layers (``--protect``) keep every channel: their sensitivity is read as
    unmeasured below all channels, so neither allocator cuts them and the budget is met by the other layers."""
    if budget.kind == "latency" and latency is None:
        raise ValueError("allocate_for_budget: a latency budget needs the target's latency table")
    t0 = time.perf_counter()
    cached = cache is not None and cache.is_file()
    if cached:
        sens = json.loads(cache.read_text())
    else:
        sens = layer_sensitivity(copy.deepcopy(dense), layers, rankings, example, probe, fit,
                                 compensation=compensation, seed=seed)
        if cache is not None:
            atomic_write_json(cache, sens)
    measured = sens  # every layer's, fixed ones included: the cache serves runs that protect other layers
    sens = {**sens, **{name: [[1.0, 0.0]] for name in fixed}}  # no count below all channels is allowed
    cost = CostModel.of(dense, tuple(example.shape[1:]), layers)
    if budget.kind == "latency":
        from toolchain.knapsack import allocate_latency
        from toolchain.latency import conv_terms

        terms = conv_terms(dense, tuple(example.shape[1:]), layers)
        budget_ms = budget.latency_ms(latency.dense_ms)

        def solve(target_ms: float) -> tuple[dict[str, int], dict[str, Any]]:
            return allocate_latency(layers, sens, latency, terms, target_ms, round_to=round_to, levels=latency.levels)

        counts, info = meet_measured(solve, measure, budget_ms) if measure else solve(budget_ms)
        info["budget"] = str(budget)
        model_cost = info["predicted_ms"] / latency.dense_ms
    else:
        counts, info = allocate(layers, sens, budget, round_to=round_to, members=cost.member_terms(budget.kind))
        # the budget is over the prunable groups' cost; the whole model's (as reported) from the same cost model
        model_cost = cost.fraction(budget.kind, counts)
    info.update(model_cost=model_cost, sensitivity=measured, sensitivity_cached=cached,
                seconds=round(time.perf_counter() - t0, 2))
    return counts, info
