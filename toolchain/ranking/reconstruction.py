"""Reconstruction criterion: keep the channels from which the next layer can be rebuilt best.

Once the prune stage refits every consumer by least squares (toolchain.compensation), the
question a ranking has to answer is no longer "which channels are strong" but "which set of
channels lets the consumer reproduce the dense output". Scoring channels one at a time (L1,
BN scale, activations) keeps correlated channels and loses to random selection on the shared
VGG16 (docs/design/algorithms.md §6). This criterion ranks a set, greedily:

    S = [];  repeat:  s = argmax_j  gain(j | S),  S += [s]

with ``gain(j | S)`` the drop in the consumer's least-squares reconstruction error when
channel j joins the kept inputs S: ``tr(B_j^T G_jj^-1 B_j)`` on the residual (Schur complement)
moments ``G = Cov(X | X_S)``, ``B = Cov(X, Y | X_S)``, where X are the consumer's input rows
(im2col patches: one group of k*k columns per channel; a linear layer's features: one group
of H*W columns per channel) and Y its dense pre-activation output. Each output channel o of Y
is weighted (option ``recon_weight``) by ``sqrt(E[(dL/dy_o)^2])``, the cross-entropy's gradient
(default ``loss``: the error then is the per-channel second-order estimate of the loss
increase, so it counts where the network's output is sensitive), by the BatchNorm scale
``|gamma| / sqrt(var + eps)`` (``bn``: as the next activation sees it) or not at all. Under a
Gaussian model the gain is the small-signal limit of ``I(Y; x_j | X_S)``, the CMI papers'
conditional information with the next layer's response as the target; it is also exactly
the objective the refit then minimises. Each step updates the residual moments by one
rank-(k*k) Schur step, so a 512-channel layer costs seconds. Late layers see 2x2 maps, so
the moments need augmented views (``augmented_view``).

``info["residual"]`` holds the relative error left after each greedy step (the curve the
budget allocator can read).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolchain.compensation import augmented_view, module_inputs, patch_rows, take_positions, views_needed
from toolchain.ranking import options as opt
from toolchain.ranking.base import CRITERIA, LayerRanking, RankContext

RIDGE = 1e-3  # relative to the mean variance of the inputs: keeps rank-deficient moments solvable
POSITIONS_PER_IMAGE = 64  # sampled output positions per image (all of them for smaller maps)
ROWS_PER_UNKNOWN = 2.0  # consumers of small maps also see augmented views until they have this many rows
MAX_VIEWS = 12
DEFAULT_WEIGHT = "loss"
DEFAULT_SEARCH = "forward"


class _Moments:
    """Centred moments of one consumer: G = X^T X, B = X^T Y (float64), over sampled rows."""

    def __init__(self, module: nn.Module, weight: torch.Tensor | None, seed: int):
        self.module, self.weight = module, weight
        self.g: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.sx = self.sy = None
        self.yy = 0.0
        self.rows = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        xp = patch_rows(self.module, x)
        yo = y.reshape(y.shape[0], y.shape[1], -1)
        length = xp.shape[-1]
        take = min(length, POSITIONS_PER_IMAGE)
        idx = torch.stack([torch.randperm(length, generator=self.gen)[:take] for _ in range(len(x))]).to(x.device)
        xr, yr = take_positions(xp, idx).double(), take_positions(yo, idx).double()
        if self.weight is not None:
            yr = yr * self.weight
        if self.g is None:
            self.g = torch.zeros(xr.shape[1], xr.shape[1], dtype=torch.float64, device=x.device)
            self.b = torch.zeros(xr.shape[1], yr.shape[1], dtype=torch.float64, device=x.device)
            self.sx, self.sy = xr.sum(0), yr.sum(0)
        else:
            self.sx += xr.sum(0)
            self.sy += yr.sum(0)
        self.g += xr.T @ xr
        self.b += xr.T @ yr
        self.yy += float((yr * yr).sum())
        self.rows += len(xr)

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        n = self.rows
        mx, my = self.sx / n, self.sy / n
        g = self.g - n * torch.outer(mx, mx)
        b = self.b - n * torch.outer(mx, my)
        total = self.yy - n * float((my * my).sum())
        return g, b, total


class _GroupSlots:
    """A matrix ``m`` (d, d) and ``v`` (d, out) over channel groups of ``gs`` columns, for greedy searches.

    Both searches score every live channel by the same block quadratic form, take one, and remove
    it from ``m`` and ``v`` by one Schur step; ``m`` and ``v`` are compacted to the live channels
    now and then, so a layer costs about a sixth of updating the full matrices every step.
    """

    def __init__(self, m: torch.Tensor, v: torch.Tensor, channels: int):
        self.m, self.v, self.gs = m, v, m.shape[0] // channels
        self.ids = list(range(channels))  # channel held in each group slot
        self.alive = torch.ones(channels, dtype=torch.bool)

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(live slots, ``tr(v_j^T m_jj^-1 v_j)`` per live slot)."""
        gs, slots = self.gs, len(self.ids)
        live = torch.nonzero(self.alive).flatten()
        if len(live) < 0.8 * slots:  # compact: drop the taken channels' rows and columns
            cols = (live[:, None] * gs + torch.arange(gs)).reshape(-1)
            self.m, self.v = self.m[cols][:, cols].contiguous(), self.v[cols].contiguous()
            self.ids = [self.ids[i] for i in live.tolist()]
            slots = len(self.ids)
            self.alive = torch.ones(slots, dtype=torch.bool)
            live = torch.arange(slots)
        diag = self.m.view(slots, gs, slots, gs)[live, :, live, :]  # (R, gs, gs) diagonal blocks
        vj = self.v.view(slots, gs, -1)[live]
        return live, (torch.linalg.solve(diag, vj) * vj).sum((1, 2))

    def take(self, slot: int) -> int:
        """Mark ``slot`` taken and remove it from ``m`` and ``v`` (Schur step); returns its channel."""
        self.alive[slot] = False
        sc = slice(slot * self.gs, (slot + 1) * self.gs)
        chol = torch.linalg.cholesky(self.m[sc, sc])
        u = torch.linalg.solve_triangular(chol, self.m[sc], upper=False)  # (gs, d): R^-T M[s, :]
        w = torch.linalg.solve_triangular(chol, self.v[sc], upper=False)  # (gs, out)
        self.m.addmm_(u.T, u, alpha=-1.0)
        self.v.addmm_(u.T, w, alpha=-1.0)
        return self.ids[slot]

    def remaining(self) -> list[int]:
        return [self.ids[int(i)] for i in torch.nonzero(self.alive).flatten()]


def _ridged(g: torch.Tensor, ridge: float) -> torch.Tensor:
    """A copy of ``g`` with ``ridge`` times its mean diagonal added to the diagonal."""
    g = g.clone()
    g.diagonal().add_(ridge * float(g.diagonal().mean().clamp_min(1e-12)))
    return g


def greedy_selection(g: torch.Tensor, b: torch.Tensor, total: float, channels: int, *,
                     ridge: float = RIDGE) -> tuple[list[int], list[float]]:
    """Greedy forward selection of channel groups for least-squares reconstruction.

    ``g``: (d, d) input covariance with d = channels * group, columns grouped by channel;
    ``b``: (d, out) input-output covariance; ``total``: the output's total variance. Returns the
    order (all channels) and the relative residual error after each step (``residual[k-1]``:
    with the first k channels kept; ``residual`` has ``channels`` entries and ends near 0).
    """
    slots = _GroupSlots(_ridged(g, ridge), b.clone(), channels)
    order: list[int] = []
    residual: list[float] = []
    left = total
    while len(order) < channels:
        live, gains = slots.scores()
        r = int(torch.argmax(gains))
        left -= float(gains[r])
        residual.append(max(left, 0.0) / max(total, 1e-300))
        if len(order) == channels - 1:
            order += slots.remaining()
            break
        order.append(slots.take(int(live[r])))
    return order, residual


def greedy_elimination(g: torch.Tensor, b: torch.Tensor, total: float, channels: int, *,
                       ridge: float = RIDGE) -> tuple[list[int], list[float]]:
    """Greedy backward elimination: start from every channel, drop the one whose loss costs least.

    Same inputs and outputs as ``greedy_selection`` (``order`` is the reverse of the removal
    order, so its first k channels are the k that survive). Removing group j from the kept set
    raises the residual by ``tr(beta_j^T P_jj^-1 beta_j)``, ``P`` the inverse of the kept inputs'
    moments and ``beta = P B`` the refit's coefficients; ``P`` and ``beta`` are then downdated by
    one Schur step. Each decision is made with the channels that will actually stay in view,
    which suits the usual cuts (a third to a half removed) better than growing the set from
    nothing: forward selection picks its first channels without knowing what will join them.
    """
    p = torch.cholesky_inverse(torch.linalg.cholesky(_ridged(g, ridge)))
    beta = p @ b
    left = total - float((b * beta).sum())  # residual with every channel kept
    slots = _GroupSlots(p, beta, channels)
    removed: list[int] = []
    residual = [0.0] * channels
    residual[channels - 1] = max(left, 0.0) / max(total, 1e-300)
    while len(removed) < channels - 1:
        live, costs = slots.scores()
        r = int(torch.argmin(costs))
        removed.append(slots.take(int(live[r])))
        left += float(costs[r])
        residual[channels - 1 - len(removed)] = max(left, 0.0) / max(total, 1e-300)
    return slots.remaining() + removed[::-1], residual


SEARCHES = {"forward": greedy_selection, "backward": greedy_elimination}


def _consumer_weight(model: nn.Module, layers, consumer: str) -> torch.Tensor | None:
    """Per-output-channel weight |gamma| / sqrt(var + eps) of the BN after ``consumer`` (None without one)."""
    modules = dict(model.named_modules())
    for layer in layers:
        if layer.name == consumer and layer.bn_name is not None:
            bn = modules[layer.bn_name]
            return (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).double()
    return None


def _loss_weights(model: nn.Module, names: list[str], images: torch.Tensor, labels: torch.Tensor,
                  batch: int = 64) -> dict[str, torch.Tensor]:
    """Per consumer and output channel ``sqrt(E[(dL/dy_o)^2])``, L the cross-entropy of the dense network.

    Weighting the reconstruction error of channel o by it makes the objective the diagonal
    (per channel) second-order estimate of the loss increase, ``E[sum_o (dL/dy_o)^2 e_o^2]``: the
    error counts where the network's output is sensitive to it.
    """
    import torch.nn.functional as F

    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def keep(name: str, out: torch.Tensor) -> None:
        def on_grad(g: torch.Tensor) -> None:
            g2 = g.detach().double().square()
            per = g2.sum(0).reshape(g2.shape[1], -1).sum(1)
            sums[name] = sums.get(name, 0) + per
            counts[name] = counts.get(name, 0) + g2[0].numel() // g2.shape[1] * g2.shape[0]
        out.register_hook(on_grad)

    hooks = [modules[n].register_forward_hook(lambda _m, _a, out, n=n: keep(n, out)) for n in names]
    params = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for a in range(0, len(images), batch):
                x = images[a:a + batch].clone().requires_grad_(True)
                F.cross_entropy(model(x), labels[a:a + batch], reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), params):
            p.requires_grad_(r)
    return {n: (sums[n] / counts[n]).sqrt() for n in names if n in sums}


WEIGHTS = ("loss", "bn", "none")


@dataclass(frozen=True)
class ReconOptions:
    weight: str = opt.option(DEFAULT_WEIGHT, "weight of each next-layer output channel's error: the loss "
                             "gradient, the BatchNorm scale, or none", key="recon_weight", choices=WEIGHTS)
    search: str = opt.option(DEFAULT_SEARCH, "forward grows the kept set, backward drops channels from the full "
                             "set", key="recon_search", choices=tuple(SEARCHES))


def parse_options(options: dict[str, Any] | None) -> ReconOptions:
    """The recon options from ``RankContext.options``; a one-line UserError for anything else."""
    return opt.parse(ReconOptions, options, criterion="recon")


# ranks on the base default of 256 images: on the shared VGG16 with compensation on 1024 images, 256 ranking
# images gave 87.1% at 40% removal and 82.7% at 60%, 1024 gave 87.1% and 82.2% in 2.5 more minutes
@CRITERIA.register("recon", options=ReconOptions)
@torch.no_grad()
def reconstruction_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """Greedy least-squares reconstruction of each layer's consumers (module docstring)."""
    o = parse_options(ctx.options)
    weighting, search = o.weight, o.search
    model = ctx.model.eval()
    modules = dict(model.named_modules())
    names = list(dict.fromkeys(c for layer in ctx.layers for c in layer.consumers))
    if weighting == "loss":
        weights = _loss_weights(model, names, ctx.images, ctx.labels)
    elif weighting == "bn":
        weights = {c: w for c in names if (w := _consumer_weight(model, ctx.layers, c)) is not None}
    else:
        weights = {}
    moments = {c: _Moments(modules[c], weights.get(c), ctx.seed) for c in names}
    inputs: dict[str, torch.Tensor] = {}
    probe = module_inputs(model, modules, list(moments), ctx.images[:1])
    views = {n: views_needed(len(ctx.images) * min(patch_rows(modules[n], x).shape[-1], POSITIONS_PER_IMAGE),
                             modules[n].weight[0].numel(), rows_per_unknown=ROWS_PER_UNKNOWN, max_views=MAX_VIEWS)
             for n, x in probe.items()}
    view = [0]

    def record(name: str, out: torch.Tensor) -> None:
        x = inputs.pop(name)
        if view[0] < views[name]:
            moments[name].add(x, out)

    hooks = []
    for name, mom in moments.items():
        hooks.append(mom.module.register_forward_pre_hook(lambda _m, a, n=name: inputs.__setitem__(n, a[0])))
        hooks.append(mom.module.register_forward_hook(lambda _m, _a, out, n=name: record(n, out)))
    try:
        for v in range(max(views.values(), default=0)):
            view[0] = v
            for a in range(0, len(ctx.images), 64):
                model(augmented_view(ctx.images[a:a + 64], v))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for layer in ctx.layers:
        t0 = time.perf_counter()
        g = b = None
        total = 0.0
        for c in layer.consumers:  # several consumers: their moments add up (one joint target)
            gc, bc, tc = moments[c].centred()
            if gc.shape[0] % layer.channels:
                continue
            if g is None:
                g, b, total = gc, bc, tc
            elif gc.shape == g.shape:
                g, b, total = g + gc, torch.cat([b, bc], 1), total + tc
        info: dict[str, Any] = {"weight": weighting, "search": search}
        if g is None:  # no consumer whose inputs follow the channels: fall back to filter norms
            scores = layer.conv.weight.detach().abs().flatten(1).sum(1).double().cpu()
            order = torch.sort(-scores, stable=True).indices.tolist()
            info["fallback"] = "l1"
        else:
            order, residual = SEARCHES[search](g, b, total, layer.channels)
            info["residual"] = residual
            scores = torch.empty(layer.channels, dtype=torch.float64)
            scores[torch.as_tensor(order)] = torch.arange(layer.channels, 0, -1, dtype=torch.float64)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        out[layer.name] = LayerRanking(order=list(order), scores=scores.tolist(), info=info)
    return out
