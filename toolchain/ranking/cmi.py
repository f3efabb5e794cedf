"""CMI ranking (Vu-Van et al., 2024): greedy channel selection by matrix-based Renyi (conditional) MI.

``rank_layer`` ranks the channels of one layer (ALGORITHMS.md section 2); the ``cmi`` criterion
(registered in ``CRITERIA`` on import) runs it over a network with the per-layer, compact or
full formulation, the forward or bidirectional order, and a cutoff or a global budget.

How one layer is ranked (all Grams Gaussian, so a set's Gram is ``exp(-sum of its exponents)``):

- per channel j the exponent matrix ``E_j = D_j / (2 sigma^2)`` (``D_j`` squared distances,
  float64) and its kernel ``K_j = exp(-E_j)`` (diagonal 1);
- the conditioning set P and the selection S are one running Hadamard product ``G`` (unit
  trace), updated by one element-wise multiply per step;
- step k evaluates every remaining candidate in one batch: ``m_j = I(Y; P u S u {j})``.
  For alpha = 2 that is one matrix product, because
  ``||G o K_j||_F^2 = <G^2, K_j^2>``: the squared kernels of all channels are stored once as
  rows (upper triangle) and each step multiplies them with ``G^2`` and ``(G o K_Y)^2``. For
  other alpha the products ``G o K_j`` go through batched float64 eigenvalues;
- ``cmi_k = I(Y; R | P u S)`` by the chain rule ``I(Y; R u P u S) - I(Y; P u S)``: the first
  term is the same for every step (R u S is the whole layer), the second is the winning
  candidate's ``m``, so the curve costs nothing extra and equals the 4-entropy formula
  ``S(R,Z) + S(Y,Z) - S(Y,R,Z) - S(Z)`` (same entropies, regrouped).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from toolchain.errors import UserError
from toolchain.info.renyi import label_gram, paper_sigma, renyi_entropy, squared_distances
from toolchain.ranking.base import CRITERIA, LayerRanking, RankContext
from toolchain.ranking.capture import FeatureCapture
from toolchain.ranking.cutoffs import (
    Budget,
    allocate_budget,
    full_curve,
    knee_cutoff,
    layer_costs,
    parse_budget,
    permutation_cutoff,
    ratio_cutoff,
    scree_candidates,
    xmeans_cutoff,
)

__all__ = ["CMIOptions", "CMIRanking", "cmi_criterion", "parse_options", "rank_layer"]

TIE_TOL = 1e-10  # nats: candidates within this of the best MI count as tied (lowest index wins)
SATURATION_TOL = 0.01  # an entropy within 1% of ln N is saturated (ALGORITHMS.md section 5)
_CHUNK_ELEMS = 1 << 23  # float64 elements per temporary chunk (64 MiB)


@dataclass
class CMIRanking:
    """Result of ``rank_layer`` for one layer of C channels."""

    order: list[int]  # all C channel indices, most informative first (greedy order)
    cmi: list[float]  # C-1 values: I(Y; R | P u S_k) after the k-th greedy addition
    cmi_total: float  # I(Y; layer | P): the CMI before any selection (k = 0)
    mi: list[float]  # C-1 values: I(Y; P u S_k)
    joint_entropy: list[float]  # C-1 values: S(P u S_k)
    p_values: list[float] | None  # permutation p-value of each tested step (stop="permutation")
    selected: int | None  # channels kept by the permutation stop (None without it)
    sigma: float  # kernel width of the layer's channels
    sigma_labels: float
    sigma_condition: list[float]  # one width per conditioning map
    entropy_labels: float  # S(Y)
    entropy_condition: float  # S(P) (0 when P is empty)
    entropy_all: float  # S(P u all channels)
    max_entropy: float  # ln N
    saturation_step: int | None  # first k with S(P u S_k) >= 0.99 ln N (None: never)
    tie_steps: int  # greedy steps decided by the lowest-index tie rule
    alpha: float
    gamma: float
    n: int
    seconds: float = 0.0

    @property
    def saturated(self) -> bool:
        """True when the selected set's joint entropy reaches 99% of ln N before the order ends."""
        return self.saturation_step is not None

    @property
    def widths(self) -> dict[str, Any]:
        return {"channels": self.sigma, "labels": self.sigma_labels, "condition": list(self.sigma_condition)}

    def to_info(self) -> dict[str, Any]:
        """JSON-able summary (for ``LayerRanking.info``)."""
        return {
            "cmi": [float(v) for v in self.cmi],
            "cmi_total": float(self.cmi_total),
            "mi": [float(v) for v in self.mi],
            "joint_entropy": [float(v) for v in self.joint_entropy],
            "p_values": None if self.p_values is None else [float(p) for p in self.p_values],
            "selected": self.selected,
            "widths": self.widths,
            "kernel": "paper",
            "entropy_labels": float(self.entropy_labels),
            "entropy_condition": float(self.entropy_condition),
            "entropy_all": float(self.entropy_all),
            "max_entropy": float(self.max_entropy),
            "saturated": self.saturated,
            "saturation_step": self.saturation_step,
            "tie_steps": int(self.tie_steps),
            "alpha": float(self.alpha),
            "gamma": float(self.gamma),
            "samples": int(self.n),
            "seconds": round(float(self.seconds), 4),
        }


def _as_maps(x: Any, name: str, n: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim < 2:
        raise UserError(f"{name} must have shape (N, C, ...), got {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise UserError(f"{name} has {t.shape[0]} samples, expected {n}")
    if not t.is_floating_point() or t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _check_number(name: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    ok = (v > lo if lo_open else v >= lo) and v <= hi and math.isfinite(v)
    if not ok or isinstance(value, bool):
        bound = f"{'>' if lo_open else '>='} {lo:g}" + ("" if hi == math.inf else f" and <= {hi:g}")
        raise UserError(f"{name} must be {bound}, got {value!r}")
    return v


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool):
        raise UserError(f"{name} must be an integer >= {lo}, got {value!r}")
    try:
        v = int(value)
        if v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an integer >= {lo}, got {value!r}") from None
    if v < lo:
        raise UserError(f"{name} must be an integer >= {lo}, got {value!r}")
    return v


def _sum_exponents(maps: torch.Tensor, sigma: float, device: torch.device, out: torch.Tensor) -> None:
    """``out += sum_c D_c / (2 sigma^2)`` over the channels of ``maps`` (N, C, d), chunked."""
    n, c, d = maps.shape
    step = max(1, _CHUNK_ELEMS // max(n * max(d, n), 1))
    for a in range(0, c, step):
        chunk = maps[:, a:a + step].to(device).transpose(0, 1)
        out += squared_distances(chunk).sum(0) / (2.0 * sigma * sigma)


@torch.no_grad()
def rank_layer(features, labels, *, num_classes=10, alpha=1.01, gamma=5.0, condition=(), stop=None,
               permutations=100, eta=0.05, seed=0, device=None) -> CMIRanking:
    """Rank the C channels of one layer by greedy CMI selection (ALGORITHMS.md section 2).

    ``features``: (N, C, H, W) post-BN-ReLU maps (tensor or array); ``labels``: (N,) ints in
    ``[0, num_classes)``; ``condition``: maps (N, Ci, Hi, Wi) of previously pruned layers (their
    kept channels), every channel of which joins the conditioning set P. Kernel widths are the
    paper's, ``gamma * N^(-1/(4+d))`` (d = H*W, K for the labels). Ties in the greedy argmax
    (within ``TIE_TOL`` nats) go to the lowest channel index. With ``stop="permutation"`` every
    step is tested with ``permutations`` row permutations of the added channel until the first
    step with ``p >= eta``; ``selected`` is then the number of channels before it, and the
    greedy order is completed without further tests. Runs on ``device`` (default: the
    features' device); float64 throughout.
    """
    t0 = time.perf_counter()
    x = _as_maps(features, "features")
    n, c, d = x.shape
    if n < 2:
        raise UserError(f"rank_layer needs at least 2 samples, got {n}")
    num_classes = _check_int("num_classes", num_classes, 1)
    alpha = _check_number("alpha", alpha, 0.0)
    gamma = _check_number("gamma", gamma, 0.0)
    if stop not in (None, "permutation"):
        raise UserError(f"stop must be None or 'permutation', got {stop!r}")
    if stop == "permutation":
        permutations = _check_int("permutations", permutations, 1)
        eta = _check_number("eta", eta, 0.0, 1.0)
    dev = torch.device(device) if device is not None else x.device
    y = torch.as_tensor(labels).reshape(-1).to(dev)
    if y.shape[0] != n:
        raise UserError(f"labels has {y.shape[0]} entries, features {n} samples")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise UserError("labels must be integers")
    y = y.long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    cond = [_as_maps(m, f"condition[{i}]", n) for i, m in enumerate(condition)]

    f64 = torch.float64
    ent = lambda a: renyi_entropy(a, alpha)  # noqa: E731 (normalises to unit trace itself)
    sigma = paper_sigma(n, d, gamma)
    sigma_y = paper_sigma(n, num_classes, gamma)
    sigma_cond = [paper_sigma(n, m.shape[2], gamma) for m in cond]
    k_y = label_gram(y, num_classes, sigma_y, normalize=False)  # diagonal 1

    e_p = torch.zeros(n, n, dtype=f64, device=dev)
    for m, s in zip(cond, sigma_cond):
        _sum_exponents(m, s, dev, e_p)

    # per-channel kernels: squared off-diagonal upper triangles (alpha = 2) or full kernels
    fast = alpha == 2.0
    iu = torch.triu_indices(n, n, offset=1, device=dev)  # pairs i < j
    e_all = torch.zeros(n, n, dtype=f64, device=dev)
    store = torch.empty((c, iu.shape[1]) if fast else (c, n, n), dtype=f64, device=dev)
    step = max(1, _CHUNK_ELEMS // max(n * max(d, n), 1))
    for a in range(0, c, step):
        e = squared_distances(x[:, a:a + step].to(dev).transpose(0, 1)) / (2.0 * sigma * sigma)
        e_all += e.sum(0)
        if fast:
            store[a:a + e.shape[0]] = torch.exp(-2.0 * e[:, iu[0], iu[1]])
        else:
            store[a:a + e.shape[0]] = torch.exp(-e)
        del e

    def channel_exponent(ch: int) -> torch.Tensor:
        return squared_distances(x[:, ch].to(dev).unsqueeze(0))[0] / (2.0 * sigma * sigma)

    s_y = float(ent(k_y))
    g = torch.exp(-e_p)
    g /= g.diagonal().sum()  # unit-trace running Gram of P u S (all-ones / N when P is empty)
    s_p = float(ent(g))
    i_p = s_y + s_p - float(ent(g * k_y))
    full = torch.exp(-(e_all + e_p))
    s_all = float(ent(full))
    i_all = s_y + s_all - float(ent(full * k_y))
    del full
    if fast:
        # Every kernel has a unit diagonal, so G keeps its diagonal 1/N (trace 1) under Hadamard
        # products: only its packed off-diagonal part changes. With w = 2 G_ij^2 over pairs i < j,
        # ||G o K_j||_F^2 = sum_i G_ii^2 + <w, K_j^2>, for all candidates in one matrix product.
        gp = g[iu[0], iu[1]].contiguous()
        kyp = k_y[iu[0], iu[1]].contiguous()
        diag2 = float((g.diagonal() ** 2).sum())
        w = torch.empty(2, iu.shape[1], dtype=f64, device=dev)
        del g

    gen = torch.Generator().manual_seed(int(seed))
    rows = list(range(c))  # rows[r] = channel held in row r of `store`; rows[:left] are candidates
    left = c
    order: list[int] = []
    cmi: list[float] = []
    mi: list[float] = []
    joint: list[float] = []
    p_values: list[float] | None = [] if stop == "permutation" else None
    selected: int | None = None
    tie_steps = 0
    saturation_step = None
    ceiling = math.log(n)

    for k in range(1, c):
        if fast:
            torch.mul(gp, gp, out=w[0])
            torch.mul(gp, kyp, out=w[1])
            w[1].square_()
            w.mul_(2.0)
            vals = store[:left] @ w.T  # ||G o K_j||^2 - diag2 and ||G o K_Y o K_j||^2 - diag2
            vals += diag2
            vals = (-torch.log(vals)).cpu()
            h, hy = vals[:, 0], vals[:, 1]
        else:
            hs, hys = [], []
            chunk = max(1, _CHUNK_ELEMS // (n * n))
            for a in range(0, left, chunk):
                prod = g * store[a:min(a + chunk, left)]
                hs.append(ent(prod))
                hys.append(ent(prod * k_y))
            h, hy = torch.cat(hs).cpu(), torch.cat(hys).cpu()
        m = s_y + h - hy
        best = float(m.max())
        tied = torch.nonzero(m >= best - TIE_TOL).flatten().tolist()
        r = min(tied, key=lambda t: rows[t]) if len(tied) > 1 else tied[0]
        tie_steps += len(tied) > 1
        s = rows[r]
        joint_k = float(h[r])
        order.append(s)
        mi.append(float(m[r]))
        joint.append(joint_k)
        cmi.append(i_all - float(m[r]))
        if saturation_step is None and joint_k >= (1.0 - SATURATION_TOL) * ceiling:
            saturation_step = k

        if p_values is not None and selected is None:
            e_s = channel_exponent(s)
            g_prev = _unpack(gp, iu, n) if fast else g
            p = _permutation_p(g_prev, torch.exp(-e_s), torch.exp(-(e_all + e_p - e_s)), k_y, s_y, cmi[-1],
                               permutations, gen, ent)
            p_values.append(p)
            if p >= eta:
                selected = k - 1
        if fast:
            gp *= store[r].sqrt()  # K_s = sqrt(K_s^2): no recomputation
        else:
            g = g * store[r]
            g /= g.diagonal().sum()
        # move the chosen row behind the candidates
        last = left - 1
        if r != last:
            store[[r, last]] = store[[last, r]]
            rows[r], rows[last] = rows[last], rows[r]
        left -= 1
    order.append(rows[0])
    if p_values is not None and selected is None:
        selected = c - 1 if c > 1 else 1

    return CMIRanking(
        order=order, cmi=cmi, cmi_total=i_all - i_p, mi=mi, joint_entropy=joint, p_values=p_values,
        selected=selected, sigma=sigma, sigma_labels=sigma_y, sigma_condition=sigma_cond, entropy_labels=s_y,
        entropy_condition=s_p, entropy_all=s_all, max_entropy=ceiling, saturation_step=saturation_step,
        tie_steps=int(tie_steps), alpha=alpha, gamma=gamma, n=n, seconds=time.perf_counter() - t0)


def _unpack(gp: torch.Tensor, iu: torch.Tensor, n: int) -> torch.Tensor:
    """Full unit-trace Gram from its packed off-diagonal upper triangle (diagonal 1/N)."""
    g = torch.zeros(n, n, dtype=gp.dtype, device=gp.device)
    g[iu[0], iu[1]] = gp
    g = g + g.T
    g.diagonal().fill_(1.0 / n)
    return g


def _permutation_p(g_prev: torch.Tensor, k_s: torch.Tensor, k_rest: torch.Tensor, k_y: torch.Tensor, s_y: float,
                   cmi_true: float, permutations: int, gen: torch.Generator, ent) -> float:
    """Fraction of row permutations of the added channel whose CMI is <= the true CMI.

    ``g_prev``: Gram of P u S before the channel; ``k_rest``: kernel of P u (all channels but it).
    With the channel permuted, ``cmi = I(Y; rest u s') - I(Y; P u S u s')``.
    """
    n = k_s.shape[0]
    perms = torch.argsort(torch.rand(permutations, n, generator=gen), dim=1).to(k_s.device)
    chunk = max(1, _CHUNK_ELEMS // (4 * n * n))
    below = 0
    for a in range(0, permutations, chunk):
        pi = perms[a:a + chunk]
        kp = k_s[pi[:, :, None], pi[:, None, :]]
        z = g_prev * kp
        f = k_rest * kp
        i_z = s_y + ent(z) - ent(z * k_y)
        i_f = s_y + ent(f) - ent(f * k_y)
        below += int(((i_f - i_z) <= cmi_true + TIE_TOL).sum())
    return below / permutations


# ---------------------------------------------------------------- the criterion

FORMULATIONS = ("per-layer", "compact", "full")
ORDERS = ("forward", "bidirectional")
CUTOFFS = ("scree", "xmeans", "permutation", "knee", "ratio")
_KEYS = ("formulation", "order", "cutoff", "budget", "alpha", "gamma", "permutations", "eta", "samples",
         "keep_ratio")


@dataclass(frozen=True)
class CMIOptions:
    formulation: str = "per-layer"
    order: str = "forward"
    cutoff: str = "scree"
    budget: Budget | None = None
    alpha: float = 2.0
    gamma: float = 5.0
    permutations: int = 100
    eta: float = 0.05
    keep_ratio: float | None = None


def _choice(name: str, value: Any, valid: Sequence[str]) -> str:
    if value not in valid:
        raise UserError(f"cmi option {name} must be one of {', '.join(valid)}; got {value!r}")
    return value


def parse_options(options: Mapping[str, Any] | None) -> CMIOptions:
    """Validate ``RankContext.options`` for the cmi criterion; bad values raise a one-line UserError."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(_KEYS))
    if unknown:
        raise UserError(f"unknown cmi option(s) {', '.join(unknown)}; valid: {', '.join(_KEYS)}")
    d = CMIOptions()
    get = lambda key: d.__dict__[key] if opts.get(key) is None else opts[key]  # noqa: E731
    cutoff = _choice("cutoff", get("cutoff"), CUTOFFS)
    keep_ratio = opts.get("keep_ratio")
    if keep_ratio is not None:
        keep_ratio = _check_number("cmi option keep_ratio", keep_ratio, 0.0, 1.0)
    if cutoff == "ratio" and keep_ratio is None:
        raise UserError("cmi option cutoff=ratio needs keep_ratio (a fraction in (0, 1])")
    return CMIOptions(
        formulation=_choice("formulation", get("formulation"), FORMULATIONS),
        order=_choice("order", get("order"), ORDERS),
        cutoff=cutoff,
        budget=parse_budget(opts.get("budget")),
        alpha=_check_number("cmi option alpha", get("alpha"), 0.0),
        gamma=_check_number("cmi option gamma", get("gamma"), 0.0),
        permutations=_check_int("cmi option permutations", get("permutations"), 1),
        eta=_check_number("cmi option eta", get("eta"), 0.0, 1.0),
        keep_ratio=keep_ratio,
    )


@dataclass
class _Done:
    result: CMIRanking
    keep: int
    cutoff_info: dict[str, Any]
    condition: list[str] = field(default_factory=list)
    kept_maps: torch.Tensor | None = None


class _Engine:
    def __init__(self, ctx: RankContext, opts: CMIOptions):
        self.ctx, self.opts = ctx, opts
        self.capture = FeatureCapture(ctx.model, ctx.layers, ctx.images, device=ctx.device)
        self.stop = "permutation" if opts.cutoff == "permutation" and opts.budget is None else None

    def rank(self, i: int, condition: Sequence[torch.Tensor], upcoming: Sequence[int]) -> CMIRanking:
        feats = self.capture.get(i, upcoming)
        o = self.opts
        res = rank_layer(feats, self.ctx.labels, num_classes=self.ctx.num_classes, alpha=o.alpha, gamma=o.gamma,
                         condition=condition, stop=self.stop, permutations=o.permutations, eta=o.eta,
                         seed=self.ctx.seed + i, device=self.ctx.device)
        return res

    def kept_maps(self, i: int, order: list[int], keep: int, upcoming: Sequence[int]) -> torch.Tensor:
        feats = self.capture.get(i, upcoming)
        return feats[:, torch.as_tensor(order[:keep], device=feats.device)].clone()

    def cutoff(self, i: int, res: CMIRanking) -> tuple[int, dict[str, Any]]:
        channels = len(res.order)
        curve = full_curve(res.cmi_total, res.cmi)
        o = self.opts
        if o.cutoff == "scree":
            cands = scree_candidates(curve, top=3)
            return cands[0], {"candidates": cands}
        if o.cutoff == "xmeans":
            k, cuts = xmeans_cutoff(curve, seed=self.ctx.seed)
            return k, {"candidates": cuts}
        if o.cutoff == "knee":
            return knee_cutoff(curve), {}
        if o.cutoff == "ratio":
            return ratio_cutoff(channels, float(o.keep_ratio)), {}
        return permutation_cutoff(res.p_values or [], o.eta, channels), {}

    def per_layer_pass(self) -> list[CMIRanking]:
        n_layers = len(self.ctx.layers)
        out = []
        for i in range(n_layers):
            out.append(self.rank(i, (), range(i + 1, n_layers)))
            self.capture.release(i)
        return out

    def budget_counts(self, results: Sequence[CMIRanking]) -> list[int]:
        layers = self.ctx.layers
        coupled, out_only, producer = layer_costs(layers, self.opts.budget.kind)
        curves = [full_curve(r.cmi_total, r.cmi) for r in results]
        return allocate_budget(curves, [layer.channels for layer in layers], coupled, out_only, producer,
                               self.opts.budget.fraction)

    def walk(self, path: Sequence[int], start: list[torch.Tensor], start_names: list[str],
             fixed: Sequence[int] | None) -> dict[int, _Done]:
        """Rank the layers of ``path`` in turn, each conditioned on the previously pruned ones."""
        prev_maps, prev_names = list(start), list(start_names)
        done: dict[int, _Done] = {}
        for pos, i in enumerate(path):
            if self.opts.formulation == "compact":
                cond, names = prev_maps[-1:], prev_names[-1:]
            else:
                cond, names = prev_maps, prev_names
            upcoming = path[pos + 1:]
            res = self.rank(i, cond, upcoming)
            if fixed is not None:
                keep, info = int(fixed[i]), {"from": "budget"}
            else:
                keep, info = self.cutoff(i, res)
            maps = self.kept_maps(i, res.order, keep, upcoming)
            self.capture.release(i)
            done[i] = _Done(res, keep, info, list(names))
            if self.opts.formulation == "compact":
                prev_maps, prev_names = [maps], [self.ctx.layers[i].name]
            else:
                prev_maps.append(maps)
                prev_names.append(self.ctx.layers[i].name)
        return done

    def run(self) -> dict[str, LayerRanking]:
        o, layers = self.opts, self.ctx.layers
        n_layers = len(layers)
        extra: dict[str, Any] = {"formulation": o.formulation, "order": o.order,
                                 "cutoff": None if o.budget else o.cutoff,
                                 "budget": None if o.budget is None else str(o.budget)}
        done: dict[int, _Done] = {}
        if o.formulation == "per-layer":
            results = self.per_layer_pass()
            counts = self.budget_counts(results) if o.budget else None
            for i, res in enumerate(results):
                keep, info = (counts[i], {"from": "budget"}) if counts else self.cutoff(i, res)
                done[i] = _Done(res, keep, info)
            if o.order == "bidirectional":
                extra["note"] = "per-layer formulation: the order does not change the rankings"
        elif o.order == "forward":
            fixed = self.budget_counts(self.per_layer_pass()) if o.budget else None
            done = self.walk(range(n_layers), [], [], fixed)
        else:
            first = self.per_layer_pass()
            if o.budget:
                counts = self.budget_counts(first)
                first_info = [{"from": "budget"}] * n_layers
            else:
                cut = [self.cutoff(i, r) for i, r in enumerate(first)]
                counts, first_info = [k for k, _ in cut], [inf for _, inf in cut]
            fractions = [1.0 - counts[i] / layers[i].channels for i in range(n_layers)]
            seed = int(np.argmax(fractions))  # first maximum: ties to the lower layer index
            extra["seed_layer"] = layers[seed].name
            fixed = counts if o.budget else None
            done[seed] = _Done(first[seed], counts[seed], first_info[seed])
            seed_maps = self.kept_maps(seed, first[seed].order, counts[seed], ())
            self.capture.release(seed)
            paths = [list(range(seed - 1, -1, -1)), list(range(seed + 1, n_layers))]
            # the two directions are independent once the seed is fixed: two threads, one per
            # direction (torch kernels release the GIL, captures share one lock-protected hook set)
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cmi-bidir") as pool:
                futures = [pool.submit(self.walk, p, [seed_maps], [layers[seed].name], fixed) for p in paths if p]
                for fut in futures:
                    done.update(fut.result())
        out = {}
        for i, layer in enumerate(layers):
            item = done[i]
            res = item.result
            channels = len(res.order)
            scores = [0.0] * channels
            for pos, ch in enumerate(res.order):
                scores[ch] = float(channels - pos)
            info = res.to_info()
            info.update(extra)
            info.update(keep=int(item.keep), cutoff_info=item.cutoff_info, conditioned_on=item.condition)
            out[layer.name] = LayerRanking(order=list(res.order), scores=scores, keep=int(item.keep), info=info)
        return out


@CRITERIA.register("cmi")
def cmi_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """Conditional mutual information ranking (Vu-Van et al., 2024); options in ``ctx.options``.

    Options: formulation (per-layer | compact | full), order (forward | bidirectional), cutoff
    (scree | xmeans | permutation | knee | ratio), budget ("flops=0.4" / "params=0.2": keep at
    most that fraction of the prunable convs, overrides the cutoff), alpha (2.0), gamma (5.0),
    permutations (100), eta (0.05), keep_ratio (for cutoff=ratio), samples (applied by the
    caller; ignored here).
    """
    return _Engine(ctx, parse_options(ctx.options)).run()
