"""How many channels to keep: cutoffs on a CMI curve, and a global FLOPs/params budget.

Curve convention (every function here): ``curve[k]`` is the CMI that the channels left out
still carry about the labels when the first ``k`` channels of the greedy order are kept,
for ``k = 0 .. C``: ``curve[0]`` is the whole layer's (conditional) MI with the labels and
``curve[C] = 0`` (nothing left out). ``rank_layer`` returns ``curve[1 .. C-1]``;
``full_curve`` adds the two ends. Every cutoff returns a keep count in ``1 .. C``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolchain.errors import UserError

__all__ = [
    "Budget",
    "allocate_budget",
    "budget_cost",
    "full_curve",
    "knee_cutoff",
    "layer_costs",
    "parse_budget",
    "permutation_cutoff",
    "ratio_cutoff",
    "scree_candidates",
    "scree_cutoff",
    "scree_ratios",
    "xmeans",
    "xmeans_clusters",
    "xmeans_cutoff",
    "xmeans_cutoffs",
]


def full_curve(cmi_total: float, cmi: Sequence[float]) -> np.ndarray:
    """``[cmi_0 = total, cmi_1, ..., cmi_{C-1}, 0]`` as float64 (see the module docstring)."""
    return np.asarray([float(cmi_total), *map(float, cmi), 0.0], dtype=np.float64)


def _curve(curve: Sequence[float]) -> np.ndarray:
    c = np.asarray(curve, dtype=np.float64).ravel()
    if c.size < 2 or not np.all(np.isfinite(c)):
        raise ValueError("a cutoff needs a finite curve with at least 2 points (k = 0 and k = C)")
    return c


def _clamp(k: int, channels: int) -> int:
    return int(min(max(k, 1), channels))


def scree_ratios(curve: Sequence[float], tol: float = 1e-6) -> np.ndarray:
    """Scree ratios ``r_k = (c_{k-1} - c_k) / (c_k - c_{k+1})`` for the inner points, 0 elsewhere.

    Differences within ``tol`` times the curve's range count as 0 (the steps of a flat,
    saturated tail are float noise whose ratios would otherwise win), and ``r_k = 0`` where the
    denominator is 0 (docs/design/algorithms.md §2).
    """
    c = _curve(curve)
    d = c[:-1] - c[1:]  # d[k] = c_k - c_{k+1}
    scale = float(np.ptp(c)) or 1.0
    d = np.where(np.abs(d) <= tol * scale, 0.0, d)
    r = np.zeros_like(c)
    num, den = d[:-1], d[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        r[1:-1] = np.where(den != 0.0, num / np.where(den != 0.0, den, 1.0), 0.0)
    return r


def scree_candidates(curve: Sequence[float], top: int = 3, tol: float = 1e-6) -> list[int]:
    """Keep counts with the largest scree ratios, best first (ties: fewer channels first).

    Only elbows are candidates: points where the curve falls faster before than after
    (``r_k > 1``). Without any (a straight or flat curve) the answer is ``[C]`` (keep all).
    """
    r = scree_ratios(curve, tol)
    channels = len(r) - 1
    ks = [int(k) for k in np.argsort(-r, kind="stable") if r[k] > 1.0 + 1e-9][:max(top, 1)]
    return ks or [channels]


def scree_cutoff(curve: Sequence[float], tol: float = 1e-6) -> int:
    """The elbow of the curve by the scree test: the keep count with the largest ratio."""
    return scree_candidates(curve, 1, tol)[0]


def knee_cutoff(curve: Sequence[float]) -> int:
    """Kneedle-style knee: the point farthest from the chord ``(0, c_0) -- (C, c_C)``.

    Both axes are scaled to [0, 1] first. Ties go to the smaller keep count; a straight or flat
    curve gives ``C``.
    """
    c = _curve(curve)
    channels = len(c) - 1
    x = np.arange(channels + 1, dtype=np.float64) / channels
    span = float(np.ptp(c))
    if span == 0.0:
        return channels
    y = (c - c.min()) / span
    # distance of (x, y) to the line through the end points, signed towards the origin side
    x0, y0, x1, y1 = 0.0, y[0], 1.0, y[-1]
    dist = ((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) / math.hypot(x1 - x0, y1 - y0)
    if y0 < y1:  # increasing curve: flip so a convex bend is positive as for a falling curve
        dist = -dist
    k = int(np.argmax(dist))
    if dist[k] <= 1e-12:
        return channels
    return _clamp(k, channels)


def ratio_cutoff(channels: int, ratio: float) -> int:
    """A fixed keep ratio: ``round(ratio * C)``, at least 1."""
    if not 0 < ratio <= 1:
        raise UserError(f"keep_ratio must be in (0, 1], got {ratio}")
    return _clamp(int(round(ratio * channels)), channels)


def permutation_cutoff(p_values: Sequence[float], eta: float, channels: int) -> int:
    """The permutation stopping rule: keep the channels selected before the first ``p >= eta``."""
    for k, p in enumerate(p_values):
        if p >= eta:
            return _clamp(k, channels)
    return _clamp(len(p_values), channels)


# ---------------------------------------------------------------- X-means


def _bic(points: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> float:
    """BIC of a spherical-Gaussian k-means model (Pelleg & Moore, 2000); higher is better."""
    n, dim = points.shape
    k = centers.shape[0]
    if n <= k:
        return -math.inf
    sq = float(((points - centers[labels]) ** 2).sum())
    var = max(sq / (n - k), 1e-12)  # pooled ML variance per dimension * dim
    var_dim = var / dim
    loglik = 0.0
    for j in range(k):
        nj = int((labels == j).sum())
        if nj == 0:
            continue
        loglik += nj * math.log(nj / n) - nj * dim / 2 * math.log(2 * math.pi * var_dim) - (nj - 1) * dim / 2
    params = k * (dim + 1)  # centers, mixing weights (k-1) and one shared variance
    return loglik - params / 2 * math.log(n)


def _kmeans(points: np.ndarray, k: int, seed: int, init: np.ndarray | None = None):
    from sklearn.cluster import KMeans

    if init is not None:
        km = KMeans(n_clusters=k, init=init, n_init=1, random_state=seed)
    else:
        km = KMeans(n_clusters=k, n_init=4, random_state=seed)
    km.fit(points)
    return km.labels_, km.cluster_centers_


def xmeans(points: np.ndarray, kmax: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X-means (Pelleg and Moore, 2000) on ``points`` (n, dim): ``(labels, centers)``.

    Start with 2 k-means clusters, then repeatedly try to split every cluster in two and keep
    the splits whose BIC (spherical Gaussians) beats the parent's, re-running k-means from the
    new centres, until nothing splits or ``kmax`` clusters are reached. scikit-learn's
    ``KMeans`` does the clustering.
    """
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    if n < 4:
        return np.zeros(n, dtype=int), pts.mean(0, keepdims=True)
    labels, centers = _kmeans(pts, 2, seed)
    while len(centers) < min(kmax, n // 2):
        new_centers = []
        for j in range(len(centers)):
            member = pts[labels == j]
            if len(member) < 4:
                new_centers.append(centers[j])
                continue
            parent = _bic(member, np.zeros(len(member), dtype=int), member.mean(0, keepdims=True))
            sub_labels, sub_centers = _kmeans(member, 2, seed)
            child = _bic(member, sub_labels, sub_centers)
            if child > parent and len(new_centers) + 2 + (len(centers) - j - 1) <= kmax:
                new_centers.extend(sub_centers)
            else:
                new_centers.append(centers[j])
        if len(new_centers) == len(centers):
            break
        labels, centers = _kmeans(pts, len(new_centers), seed, init=np.asarray(new_centers))
    return labels, centers


def xmeans_clusters(curve: Sequence[float], kmax: int = 10, seed: int = 0) -> np.ndarray:
    """X-means cluster of every point ``(k, c_k)`` of a curve, clusters numbered by their first k.

    Both coordinates are scaled to [0, 1] first (otherwise the index dominates).
    """
    c = _curve(curve)
    channels = len(c) - 1
    span = float(np.ptp(c))
    if len(c) < 4 or span == 0.0:
        return np.zeros(len(c), dtype=int)
    x = np.arange(channels + 1, dtype=np.float64) / channels
    labels, _ = xmeans(np.stack([x, (c - c.min()) / span], axis=1), kmax, seed)
    firsts = {int(j): int(np.flatnonzero(labels == j).min()) for j in np.unique(labels)}
    rank = {j: r for r, j in enumerate(sorted(firsts, key=firsts.get))}
    return np.asarray([rank[int(j)] for j in labels])


def xmeans_cutoffs(curve: Sequence[float], kmax: int = 10, seed: int = 0) -> list[int]:
    """X-means cut points: the first keep count of each later cluster, ascending ([C] if one cluster)."""
    labels = xmeans_clusters(curve, kmax, seed)
    channels = len(labels) - 1
    cuts = sorted({_clamp(int(np.flatnonzero(labels == j).min()), channels) for j in np.unique(labels)[1:]})
    return cuts or [channels]


def xmeans_cutoff(curve: Sequence[float], kmax: int = 10, seed: int = 0) -> tuple[int, list[int]]:
    """One keep count from X-means, and all cut points (best first).

    X-means tends to split a long flat tail into several clusters, so the first cut point is
    not always the elbow. The cut chosen is the boundary between the two consecutive clusters
    (in k) whose mean CMI differs most: the sharpest drop of the curve at cluster resolution.
    """
    c = _curve(curve)
    labels = xmeans_clusters(c, kmax, seed)
    channels = len(c) - 1
    groups = sorted(np.unique(labels), key=lambda j: int(np.flatnonzero(labels == j).min()))
    if len(groups) < 2:
        return channels, [channels]
    firsts = [int(np.flatnonzero(labels == j).min()) for j in groups]
    means = [float(c[labels == j].mean()) for j in groups]
    jumps = [means[t] - means[t + 1] for t in range(len(groups) - 1)]
    ranked = sorted(range(len(jumps)), key=lambda t: (-jumps[t], t))
    cuts = []
    for t in ranked:
        k = _clamp(firsts[t + 1], channels)
        if k not in cuts:
            cuts.append(k)
    return cuts[0], cuts


# ---------------------------------------------------------------- global budget


@dataclass(frozen=True)
class Budget:
    kind: str  # "flops", "params", "channels" (filters) or "latency"
    fraction: float | None  # keep at most this fraction of the dense cost (latency: of the dense model's latency)
    ms: float | None = None  # a latency budget in milliseconds on the target (then fraction is None)

    def __str__(self) -> str:
        if self.ms is not None:
            return f"latency={self.ms:g}ms"
        return f"latency={self.fraction:g}x" if self.kind == "latency" else f"{self.kind}={self.fraction:g}"

    def latency_ms(self, dense_ms: float) -> float:
        """A latency budget in ms, given the dense model's latency on the target."""
        return float(self.ms) if self.ms is not None else float(self.fraction) * dense_ms


_BUDGET_HELP = ("budget must look like 'flops=0.4', 'params=0.2', 'channels=0.67' (a fraction in (0, 1]), "
                "'latency=0.5x' (of the dense model's latency on the target) or 'latency=12ms'")


def parse_budget(text: str | Budget | None) -> Budget | None:
    """``"flops=0.4"`` / ``"params=0.2"`` / ``"channels=0.67"`` / ``"latency=0.5x"`` / ``"latency=12ms"`` ->
    Budget (keep at most that much); None passes through."""
    if text is None or isinstance(text, Budget):
        return text
    m = re.fullmatch(r"\s*(flops|params|channels|latency)\s*=\s*([0-9.eE+-]+)\s*(x|ms)?\s*", str(text))
    try:
        value = float(m.group(2)) if m else math.nan
    except ValueError:
        value = math.nan
    if not m or not math.isfinite(value) or value <= 0:
        raise UserError(f"{_BUDGET_HELP}, got {text!r}")
    kind, unit = m.group(1), m.group(3)
    if kind == "latency":
        if unit is None:
            raise UserError(f"a latency budget needs a unit, 'x' (of the dense latency) or 'ms', got {text!r}")
        if unit == "ms":
            return Budget(kind, None, value)
    elif unit is not None:
        raise UserError(f"{_BUDGET_HELP}, got {text!r}")
    if value > 1:
        raise UserError(f"{_BUDGET_HELP}, got {text!r}")
    return Budget(kind, value)


Extra = tuple[float, int | None, int | None]  # (dense cost, out layer, input layer): see allocate_budget


def layer_costs(layers, kind: str) -> tuple[list[float], list[float], list[int | None]]:
    """Cost model of prunable layers (``PrunableLayer`` list in network order) for a budget.

    Returns ``(coupled, out_only, producer)``: a layer's cost is
    ``coupled * out_frac * in_frac + out_only * out_frac``, with ``out_frac = k / C`` and
    ``in_frac`` the kept fraction of its producer layer (``producer[i]``, None for a fixed
    input). FLOPs: the conv's dense FLOPs (``PrunableLayer.flops``). Params: conv weights
    (coupled) plus bias and BatchNorm affine (out only). Channels: one per output channel (out
    only), so the fraction is of all prunable filters (the papers' "1/3 of filters removed").
    The producer of layer i is the layer that lists it in ``consumers``; without consumer
    information, layer i-1 when its channel count matches layer i's input channels. Consumers
    that are not prunable layers (the classifier) are not counted.
    """
    if kind not in ("flops", "params", "channels"):
        raise ValueError(f"unknown budget kind {kind!r}")
    names = {layer.name: i for i, layer in enumerate(layers)}
    has_consumers = any(layer.consumers for layer in layers)
    producer: list[int | None] = [None] * len(layers)
    for j, layer in enumerate(layers):
        for consumer in layer.consumers:
            if consumer in names:
                producer[names[consumer]] = j
    if not has_consumers:
        for i in range(1, len(layers)):
            if getattr(layers[i].conv, "in_channels", None) == layers[i - 1].channels:
                producer[i] = i - 1
    coupled, out_only = [], []
    for layer in layers:
        if kind == "flops":
            coupled.append(float(layer.flops))
            out_only.append(0.0)
        elif kind == "channels":
            coupled.append(0.0)
            out_only.append(float(layer.channels))
        else:
            conv = layer.conv
            coupled.append(float(conv.weight.numel()))
            out_only.append(float(conv.bias.numel() if conv.bias is not None else 0)
                            + (2.0 * layer.channels if layer.bn_name else 0.0))
    return coupled, out_only, producer


def allocate_budget(curves: Sequence[Sequence[float]], channels: Sequence[int], coupled: Sequence[float],
                    out_only: Sequence[float], producer: Sequence[int | None], fraction: float,
                    min_keep: int = 1, step: int = 1, extra: Sequence[Extra] = ()) -> list[int]:
    """Keep counts for all layers together so the total cost is at most ``fraction`` of dense.

    Greedy: start from every channel kept; repeatedly drop the last kept channel (in greedy
    order) of the layer whose removal raises its CMI least per unit of cost saved,
    ``(c_{k-1} - c_k) / saving`` (the saving includes the layers it feeds, whose inputs
    shrink), ties to the larger saving, then to the lower layer index, until the budget is
    met. ``curves[i]`` follows the module's convention (length ``C_i + 1``). With ``step`` > 1
    channels go ``step`` at a time and counts stay multiples of ``step`` (a layer with fewer
    channels than ``step`` is left whole); ``min_keep`` is the floor per layer. ``extra``: further costs
    ``(dense, out, inp)`` scaling with the kept fractions of layers ``out`` and ``inp`` (None: 1), such
    as the other convs of a channel group (``CostModel.member_terms``).
    """
    n = len(channels)
    if not (len(curves) == len(coupled) == len(out_only) == len(producer) == n):
        raise ValueError("allocate_budget: one curve, cost and producer per layer")
    if not 0 < fraction <= 1:
        raise UserError(f"budget fraction must be in (0, 1], got {fraction}")
    cs = [np.asarray(c, dtype=np.float64).ravel() for c in curves]  # +inf marks counts not to go to
    if any(np.isnan(c).any() for c in cs):
        raise ValueError("allocate_budget: curves must not hold NaN")
    for c, ch in zip(cs, channels):
        if len(c) != ch + 1:
            raise ValueError("allocate_budget: curve i needs C_i + 1 points")
    consumers: list[list[int]] = [[] for _ in range(n)]
    for i, p in enumerate(producer):
        if p is not None:
            consumers[p].append(i)
    keep = [int(c) for c in channels]

    def drop(i: int) -> int:  # channels the next move of layer i removes (0: it cannot move)
        if step == 1:
            return 1 if keep[i] > min_keep else 0
        target = (keep[i] - 1) // step * step
        return keep[i] - target if target >= max(min_keep, step) else 0

    def in_frac(i: int) -> float:
        p = producer[i]
        return 1.0 if p is None else keep[p] / channels[p]

    def cost(i: int) -> float:
        out = keep[i] / channels[i]
        return coupled[i] * out * in_frac(i) + out_only[i] * out

    def frac(i: int | None) -> float:
        return 1.0 if i is None else keep[i] / channels[i]

    def extra_total() -> float:
        return sum(d * frac(o) * frac(p) for d, o, p in extra)

    def extra_saving(i: int, m: int) -> float:  # what dropping m channels of layer i saves of the extra costs
        after = (keep[i] - m) / channels[i]

        def f(j: int | None) -> float:
            return after if j == i else frac(j)

        return sum(d * (frac(o) * frac(p) - f(o) * f(p)) for d, o, p in extra if i in (o, p))

    dense = sum(coupled) + sum(out_only) + sum(d for d, _, _ in extra)
    total = sum(cost(i) for i in range(n)) + extra_total()
    target = fraction * dense * (1 + 1e-12)
    while total > target:
        best, best_key = None, None
        for i in range(n):
            m = drop(i)
            if m == 0:
                continue
            saving = m * (coupled[i] * in_frac(i) + out_only[i]) / channels[i]
            saving += m * sum(coupled[j] * (keep[j] / channels[j]) / channels[i] for j in consumers[i])
            saving += extra_saving(i, m) if extra else 0.0
            if saving <= 0:
                continue
            gain = cs[i][keep[i] - m] - cs[i][keep[i]]
            if not math.isfinite(gain):  # an unmeasured (infinite-damage) count: not a move
                continue
            key = (gain / saving, -saving, i)
            if best_key is None or key < best_key:
                best, best_key = i, key
        if best is None:
            raise UserError(f"budget {fraction:g} cannot be met with at least {min_keep} channel(s) per layer "
                            f"and no layer cut below what its sensitivity curve covers")
        keep[best] -= drop(best)
        total = sum(cost(i) for i in range(n)) + extra_total()
    return keep


def budget_cost(keep: Sequence[int], channels: Sequence[int], coupled: Sequence[float],
                out_only: Sequence[float], producer: Sequence[int | None], extra: Sequence[Extra] = ()) -> float:
    """Kept fraction of the dense cost for keep counts (same model as ``allocate_budget``)."""
    total = 0.0
    for i in range(len(keep)):
        p = producer[i]
        inf = 1.0 if p is None else keep[p] / channels[p]
        out = keep[i] / channels[i]
        total += coupled[i] * out * inf + out_only[i] * out

    def frac(i: int | None) -> float:
        return 1.0 if i is None else keep[i] / channels[i]

    total += sum(d * frac(o) * frac(p) for d, o, p in extra)
    return total / (sum(coupled) + sum(out_only) + sum(d for d, _, _ in extra))
