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
   network's output from the dense output on held-out training images (no test data).
2. *Allocation*: sensitivity between the measured fractions is interpolated (piecewise
   linear, made monotone; no layer goes below its smallest measured fraction), layers are
   assumed to add up, and channels are dropped greedily,
   ``round_to`` at a time, from the layer whose next drop costs the least sensitivity per unit
   of budget saved (``toolchain.ranking.cutoffs.allocate_budget``: its cost model counts a
   layer's FLOPs against both its own kept outputs and its producer's kept inputs), until the
   budget is met. Between probed fractions the curve is a straight line, so the allocation mostly stops
   on them: probing 10 fractions instead of 4 (``--sensitivity-fractions``) lifted recon's one-shot
   top-1 at flops=0.4 from 88.1% to 88.4% on the shared VGG16 (docs/QUALITY.md), not the fine-tuned
   top-1 (89.4% against 89.6%, docs/STUDY.md), so the default grid stays.
3. *Without compensation* (BN statistics re-estimated instead of the refit) the damage of several
   cut layers compounds instead of adding up: measured one layer at a time, all 14 allocations of
   the shared VGG16 (5 criteria, flops=0.4 and 0.2) sent conv9 to 10% kept and lost to a uniform
   cut (recon 56.5% at 40% of the FLOPs against 62.7% for a uniform cut at 36%). So without
   compensation each layer is probed with every other layer held at the uniform cut that meets
   the same budget (``sensitivity_context``), and the curves are read around that point: 10 of 16
   allocations (those 14 and MIPP's two) then beat the uniform cut at the same FLOPs, by up to 9
   points, and 6 still lose (docs/QUALITY.md). A NetAdapt-style joint search (every step measuring
   each layer's proposed cut together with the cuts made so far) did no better and was not kept:
   the KL on 256 probe images ranks cuts this damaged (20-75% top-1) poorly.
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
Points = dict[str, list[list[float]]]  # per layer, [[kept_fraction, damage], ...]


@torch.no_grad()
def _kl_from_dense(model: nn.Module, images: torch.Tensor, reference: torch.Tensor, batch: int = 128) -> float:
    model.eval()
    total = 0.0
    for a in range(0, len(images), batch):
        logp = F.log_softmax(model(images[a:a + batch]).double(), 1)
        ref = reference[a:a + batch]
        total += float((ref.exp() * (ref - logp)).sum())
    return total / len(images)


def damage_meter(dense: nn.Module, layers: Sequence[PrunableLayer], rankings: dict[str, LayerRanking],
                 example: torch.Tensor, probe: torch.Tensor, fit: torch.Tensor, *, compensation: bool, seed: int = 0,
                 progress=None) -> Callable[..., float]:
    """``damage(counts, dense_targets={})``: the KL divergence of the network cut to `counts` (the criterion's
    order decides which channels stay; missing layers whole) from the dense output on `probe`, after the
    consumers were refitted on `fit` (compensation) or BN statistics re-estimated on it."""
    from toolchain.compensation import compensate
    from toolchain.stages.prune import consumer_outputs, prune_model
    from toolchain.train.loop import recalibrate_batchnorm

    dense = dense.eval()
    with torch.no_grad():
        reference = torch.cat([F.log_softmax(dense(probe[a:a + 128]).double(), 1)
                               for a in range(0, len(probe), 128)])

    @torch.no_grad()
    def damage(counts: dict[str, int], dense_targets: dict | None = None) -> float:
        kept = {name: sorted(int(i) for i in rankings[name].order[:k]) for name, k in counts.items()}
        pruned, _ = prune_model(dense, example, kept)
        pruned.to(probe.device)
        if compensation:
            compensate(pruned, dense, fit, consumer_outputs(list(layers), kept), seed=seed, max_views=4,
                       dense_targets={} if dense_targets is None else dense_targets)
        else:
            batches = [(fit[a:a + 128], None) for a in range(0, len(fit), 128)]
            recalibrate_batchnorm(pruned, batches, fit.device, len(fit))
        if progress is not None:
            progress()
        return _kl_from_dense(pruned, probe, reference)

    return damage


def uniform_counts(layers: Sequence[PrunableLayer], budget: Budget, *, members: Sequence[Extra] = (),
                   fixed: Sequence[str] = (), round_to: int = 1) -> dict[str, int]:
    """Keep counts of the largest single ratio (every layer but the `fixed` ones, which stay whole) whose cost
    is within `budget` (a flops, params or channels budget; the allocator's cost model, ``budget_cost``); where
    no ratio is, the smallest cut (the allocator then reports the budget as out of reach). Counts are
    multiples of `round_to` (a layer with fewer channels is left whole)."""
    channels = [layer.channels for layer in layers]
    coupled, out_only, producer = layer_costs(list(layers), budget.kind)
    step = max(1, int(round_to))

    def counts(ratio: float) -> list[int]:
        return [c if layer.name in fixed or c < step else max(step, step * round(ratio * c / step))
                for layer, c in zip(layers, channels)]

    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if budget_cost(counts(mid), channels, coupled, out_only, producer, members) <= budget.fraction:
            low = mid
        else:
            high = mid
    return {layer.name: k for layer, k in zip(layers, counts(low))}


def sensitivity_context(layers: Sequence[PrunableLayer], budget: Budget, cost: CostModel, *,
                        latency: LatencyTable | None = None, fixed: Sequence[str] = ()) -> dict[str, int]:
    """The uniform cut that `budget` allows, around which sensitivity without compensation is measured. A latency
    budget's is the uniform cut at the same fraction of the FLOPs (the dense latency from the target's table)."""
    if budget.kind == "latency":
        if latency is None:
            raise ValueError("sensitivity_context: a latency budget needs the target's latency table")
        budget = Budget("flops", min(1.0, budget.latency_ms(latency.dense_ms) / latency.dense_ms))
    return uniform_counts(layers, budget, members=cost.member_terms(budget.kind), fixed=fixed)


def probed_count(fraction: float, channels: int) -> int:
    """The kept count a sensitivity fraction probes (at least one channel)."""
    return max(1, round(fraction * channels))


def probed_counts(channels: int, fractions: Sequence[float], context_count: int | None) -> list[int]:
    """A layer's kept counts on its sensitivity curve, in order: whole, its context count (when the context cuts
    it), then each fraction's; each once."""
    at_context = [context_count] if context_count is not None and context_count < channels else []
    return list(dict.fromkeys([channels, *at_context, *(probed_count(f, channels) for f in fractions)]))


def _by_count(points: Sequence[Sequence[float]], channels: int) -> dict[int, list[float]]:
    return {round(f * channels): [f, v] for f, v in points}


@torch.no_grad()
def layer_sensitivity(dense: nn.Module, layers: Sequence[PrunableLayer], rankings: dict[str, LayerRanking],
                      example: torch.Tensor, probe: torch.Tensor, fit: torch.Tensor, *, compensation: bool,
                      fractions: Sequence[float] = SENSITIVITY_FRACTIONS, seed: int = 0,
                      context: dict[str, int] | None = None, known: Points | None = None,
                      progress=None) -> Points:
    """Per layer, ``[[kept_fraction, KL], ...]`` (1.0 included) from cutting that layer to each fraction.

    Without `context` the layer is cut alone (1.0 -> 0). With it (keep counts per layer, ``uniform_counts``)
    every other layer is cut to its context count at the same time, and the curve holds the layer whole
    (1.0), at each fraction and at its own context count (the all-context model, measured once). Points of
    `known` (an earlier call's answer, same settings) are taken as they are, so a finer grid measures only
    the kept counts the earlier one did not."""
    damage = damage_meter(dense, layers, rankings, example, probe, fit, compensation=compensation, seed=seed,
                          progress=progress)
    channels = {layer.name: layer.channels for layer in layers}
    others = {name: k for name, k in (context or {}).items() if k < channels[name]}  # the layers the context cuts
    at_context: float | None = None
    out: Points = {}
    for layer in layers:
        c = layer.channels
        have = _by_count((known or {}).get(layer.name, []), c)
        rest = {name: k for name, k in others.items() if name != layer.name}
        dense_targets: dict = {}  # the cuts of one layer refit the same consumers towards the same dense outputs
        points = []
        for k in probed_counts(c, fractions, others.get(layer.name)):
            if k in have:
                points.append(have[k])
            elif k == c:
                points.append([1.0, damage(rest, dense_targets) if rest else 0.0])
            elif k == others.get(layer.name):
                if at_context is None:
                    at_context = damage(others, {})
                points.append([k / c, at_context])
            else:
                points.append([k / c, damage({**rest, layer.name: k}, dense_targets)])
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


def sensitivity_points(layers: Sequence[PrunableLayer], stored: Points, fractions: Sequence[float],
                       context: dict[str, int] | None) -> Points | None:
    """From `stored` (a cache file's points), each layer's points at the kept counts `layer_sensitivity` would
    measure with `fractions` and `context`, in its order; None when any is missing."""
    out: Points = {}
    for layer in layers:
        have = _by_count(stored.get(layer.name, []), layer.channels)
        counts = probed_counts(layer.channels, fractions, (context or {}).get(layer.name))
        if any(k not in have for k in counts):
            return None
        out[layer.name] = [have[k] for k in counts]
    return out


def merge_points(stored: Points, new: Points) -> Points:
    """The union of two sets of measured points per layer (by kept count; `new` wins), most channels first."""
    out = {}
    for name in dict.fromkeys([*stored, *new]):
        by_fraction = {round(f, 9): [f, v] for f, v in [*stored.get(name, []), *new.get(name, [])]}
        out[name] = sorted(by_fraction.values(), key=lambda p: -p[0])
    return out


def allocate_for_budget(dense: nn.Module, layers: Sequence[PrunableLayer], rankings: dict[str, LayerRanking],
                        example: torch.Tensor, probe: torch.Tensor, fit: torch.Tensor, budget: Budget, *,
                        compensation: bool, round_to: int = 1, seed: int = 0,
                        cache: Path | None = None, latency: LatencyTable | None = None,
                        measure: Callable[[dict[str, int]], float] | None = None, fixed: Sequence[str] = (),
                        fractions: Sequence[float] = SENSITIVITY_FRACTIONS) -> tuple[dict[str, int], dict[str, Any]]:
    """Measure the sensitivity (or read it from `cache`, a JSON file written by an earlier call with the same
    model, rankings, images and settings; with compensation it does not depend on the budget, without it is
    measured around the budget's uniform cut, ``sensitivity_context``), then allocate under `budget`. A latency
    budget is allocated with the knapsack over `latency`, the target's table (``toolchain.knapsack``; with
    `measure`, counts -> the pruned model's measured ms on this host, the budget is met as measured,
    ``meet_measured``). The `fixed` layers (``--protect``) keep every channel: their sensitivity is read as
    unmeasured below all channels, so neither allocator cuts them and the budget is met by the other layers.
    `fractions`: the kept fractions probed per layer (``--sensitivity-fractions``)."""
    if budget.kind == "latency" and latency is None:
        raise ValueError("allocate_for_budget: a latency budget needs the target's latency table")
    t0 = time.perf_counter()
    cost = CostModel.of(dense, tuple(example.shape[1:]), layers)
    context = None if compensation else sensitivity_context(layers, budget, cost, latency=latency, fixed=fixed)
    # the cache holds every point measured with these settings, whatever grid asked for it; a run reads the
    # points of its own grid (the same as measuring them afresh) and measures only those missing
    stored = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    wanted = sensitivity_points(layers, stored, fractions, context)
    cached = wanted is not None
    if cached:
        sens = wanted
    else:
        sens = layer_sensitivity(copy.deepcopy(dense), layers, rankings, example, probe, fit, compensation=compensation,
                                 fractions=fractions, seed=seed, context=context, known=stored)
        if cache is not None:
            atomic_write_json(cache, merge_points(stored, sens))
    measured = sens  # every layer's, fixed ones included: the cache serves runs that protect other layers
    sens = {**sens, **{name: [[1.0, 0.0]] for name in fixed}}  # no count below all channels is allowed
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
    info.update(model_cost=model_cost, sensitivity=measured, sensitivity_cached=cached, sensitivity_context=context,
                seconds=round(time.perf_counter() - t0, 2))
    return counts, info
