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
    sigma: float | list[float]  # kernel width of the layer's channels (one per channel: adaptive)
    sigma_labels: float  # 0.0: the class-indicator kernel (adaptive)
    sigma_condition: list  # one width per conditioning map (adaptive: a list per map)
    entropy_labels: float  # S(Y)
    entropy_condition: float  # S(P) (0 when P is empty)
    entropy_all: float  # S(P u all channels)
    max_entropy: float  # ln N
    saturation_step: int | None  # first k with S(P u S_k) >= 0.99 ln N (None: never)
    tie_steps: int  # greedy steps decided by the lowest-index tie rule
    alpha: float
    gamma: float
    n: int
    kernel: str = "exact"
    seconds: float = 0.0

    @property
    def saturated(self) -> bool:
        """True when the selected set's joint entropy reaches 99% of ln N before the order ends."""
        return self.saturation_step is not None

    @property
    def widths(self) -> dict[str, Any]:
        return {"channels": self.sigma, "labels": self.sigma_labels, "condition": self.sigma_condition}

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
            "kernel": self.kernel,
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


KERNELS = ("exact", "adaptive")


def _packed(m: torch.Tensor, iu: torch.Tensor) -> torch.Tensor:
    return m[..., iu[0], iu[1]]


def _unpack(p: torch.Tensor, iu: torch.Tensor, n: int, diag: float) -> torch.Tensor:
    """Symmetric (N, N) matrix from its packed upper triangle (pairs i < j) and a constant diagonal."""
    g = torch.zeros(n, n, dtype=p.dtype, device=p.device)
    g[iu[0], iu[1]] = p
    g = g + g.T
    g.diagonal().fill_(diag)
    return g


def _channel_chunks(maps: torch.Tensor, device: torch.device):
    """Squared-distance matrices (c, N, N) of the channels of ``maps`` (N, C, d), in chunks."""
    n, c, d = maps.shape
    step = max(1, _CHUNK_ELEMS // max(n * max(d, n), 1))
    for a in range(0, c, step):
        yield a, squared_distances(maps[:, a:a + step].to(device).transpose(0, 1))


class _Exact:
    """The paper's kernels: Gaussian, widths ``gamma N^(-1/(4+d))``; a set's Gram is the Hadamard
    product of its channels' Grams (a running product), the labels' Gram a Gaussian on one-hot codes.

    alpha = 2 keeps the squared kernels packed (pairs i < j) and the running Gram G packed: every
    kernel has a unit diagonal, so G keeps its diagonal 1/N, and with w = 2 G_ij^2,
    ``||G o K_j||_F^2 = sum_i G_ii^2 + <w, K_j^2>`` for all candidates in one matrix product.
    """

    def __init__(self, x, cond, y, num_classes, alpha, gamma, dev):
        n, c, d = x.shape
        self.x, self.n, self.c, self.alpha, self.dev = x, n, c, alpha, dev
        self.ent = lambda a: renyi_entropy(a, alpha)
        self.sigma = paper_sigma(n, d, gamma)
        self.sigma_y = paper_sigma(n, num_classes, gamma)
        self.sigma_cond = [paper_sigma(n, m.shape[2], gamma) for m in cond]
        self.k_y = label_gram(y, num_classes, self.sigma_y, normalize=False)  # unit diagonal
        f64 = torch.float64
        self.e_p = torch.zeros(n, n, dtype=f64, device=dev)
        for m, sig in zip(cond, self.sigma_cond):
            for _, dist in _channel_chunks(m, dev):
                self.e_p += dist.sum(0) / (2.0 * sig * sig)
        self.fast = alpha == 2.0
        self.iu = iu = torch.triu_indices(n, n, offset=1, device=dev)
        self.e_all = torch.zeros(n, n, dtype=f64, device=dev)
        self.store = torch.empty((c, iu.shape[1]) if self.fast else (c, n, n), dtype=f64, device=dev)
        for a, dist in _channel_chunks(x, dev):
            e = dist / (2.0 * self.sigma * self.sigma)
            del dist
            self.e_all += e.sum(0)
            self.store[a:a + e.shape[0]] = torch.exp(-2.0 * _packed(e, iu)) if self.fast else torch.exp(-e)
            del e
        g = torch.exp(-self.e_p)
        g /= g.diagonal().sum()  # unit-trace Gram of P (all-ones / N when P is empty)
        ent, k_y = self.ent, self.k_y
        self.s_y = float(ent(k_y))
        self.s_p = float(ent(g))
        self.i_p = self.s_y + self.s_p - float(ent(g * k_y))
        full = torch.exp(-(self.e_all + self.e_p))
        self.s_all = float(ent(full))
        self.i_all = self.s_y + self.s_all - float(ent(full * k_y))
        del full
        if self.fast:
            self.gp = _packed(g, iu).contiguous()
            self.kyp = _packed(k_y, iu).contiguous()
            self.diag2 = float((g.diagonal() ** 2).sum())
            self.w = torch.empty(2, iu.shape[1], dtype=f64, device=dev)
        else:
            self.g = g
        self.secondary = None  # exact mode: ties go to the lowest index

    def widths(self) -> dict[str, Any]:
        return {"channels": self.sigma, "labels": self.sigma_y, "condition": list(self.sigma_cond)}

    def evaluate(self, left: int) -> tuple[torch.Tensor, torch.Tensor]:
        """S(P u S u {j}) and S(Y, P u S u {j}) for the candidates in rows [0, left), on the CPU."""
        if self.fast:
            w = self.w
            torch.mul(self.gp, self.gp, out=w[0])
            torch.mul(self.gp, self.kyp, out=w[1])
            w[1].square_()
            w.mul_(2.0)
            vals = self.store[:left] @ w.T
            vals += self.diag2
            vals = (-torch.log(vals)).cpu()
            return vals[:, 0], vals[:, 1]
        hs, hys = [], []
        chunk = max(1, _CHUNK_ELEMS // (self.n * self.n))
        for a in range(0, left, chunk):
            prod = self.g * self.store[a:min(a + chunk, left)]
            hs.append(self.ent(prod))
            hys.append(self.ent(prod * self.k_y))
        return torch.cat(hs).cpu(), torch.cat(hys).cpu()

    def add(self, r: int) -> None:
        if self.fast:
            self.gp *= self.store[r].sqrt()  # K_s = sqrt(K_s^2): no recomputation
        else:
            self.g = self.g * self.store[r]
            self.g /= self.g.diagonal().sum()

    def swap(self, r: int, last: int) -> None:
        self.store[[r, last]] = self.store[[last, r]]

    def permutation_p(self, ch: int, cmi_true: float, permutations: int, gen: torch.Generator) -> float:
        """Call before ``add``: the running Gram is still that of P u S without the channel."""
        e_s = squared_distances(self.x[:, ch].to(self.dev).unsqueeze(0))[0] / (2.0 * self.sigma * self.sigma)
        g_prev = _unpack(self.gp, self.iu, self.n, 1.0 / self.n) if self.fast else self.g
        k_rest = torch.exp(-(self.e_all + self.e_p - e_s))
        return _permutation_p(torch.exp(-e_s), lambda kp: g_prev * kp, lambda kp: k_rest * kp, self.k_y,
                              self.s_y, cmi_true, permutations, gen, self.ent)


class _Adaptive:
    """Data-adaptive kernels (ALGORITHMS.md section 5, point 2): no collapse as the set grows.

    Channel j: ``D~_j = D_j / median_{i<k} D_j`` (its width is the median heuristic,
    ``sigma_j = sqrt(median / 2)``); a set Z of channels (conditioning channels included) has the
    kernel ``exp(-mean_{c in Z} D~_c)``: running sums of normalised distances instead of running
    products, so the kernel of a growing set stays on the same scale. Labels: the class-indicator
    kernel (different classes are orthogonal). The chain rule holds as in the exact mode (the
    kernel of R u P u S is that of the whole layer). Ties are broken by the single-channel MI
    with the labels, then by index.
    """

    def __init__(self, x, cond, y, num_classes, alpha, gamma, dev, target=None):
        n, c, _ = x.shape
        self.x, self.n, self.c, self.alpha, self.dev = x, n, c, alpha, dev
        self.ent = lambda a: renyi_entropy(a, alpha)
        f64 = torch.float64
        self.fast = alpha == 2.0
        self.iu = iu = torch.triu_indices(n, n, offset=1, device=dev)
        if target is None:  # the labels: the class-indicator kernel
            self.k_y = (y[:, None] == y[None, :]).to(f64)
        else:  # a response (e.g. the next layer's): Gaussian on all of it, median width
            dist = squared_distances(target.reshape(n, -1).to(dev).unsqueeze(0))[0]
            self.k_y = torch.exp(-dist / self._normalise(dist.unsqueeze(0))[1].clamp_min(1e-300)[0])
        self.same = _packed(self.k_y, iu).square().contiguous()  # squared target kernel over pairs
        self.t_p = torch.zeros(n, n, dtype=f64, device=dev)
        self.n_p = 0
        self.sigma_cond = []
        for m in cond:
            sig = []
            for _, dist in _channel_chunks(m, dev):
                dt, med = self._normalise(dist)
                self.t_p += dt.sum(0)
                sig += med.div(2).sqrt().tolist()
            self.n_p += m.shape[1]
            self.sigma_cond.append(sig)
        self.t_all = torch.zeros(n, n, dtype=f64, device=dev)
        self.store = torch.empty((c, iu.shape[1]) if self.fast else (c, n, n), dtype=f64, device=dev)
        self.medians = torch.empty(c, dtype=f64)
        for a, dist in _channel_chunks(x, dev):
            dt, med = self._normalise(dist)
            del dist
            self.medians[a:a + len(med)] = med.cpu()
            self.t_all += dt.sum(0)
            self.store[a:a + dt.shape[0]] = _packed(dt, iu) if self.fast else dt
            del dt
        ent, k_y = self.ent, self.k_y
        self.s_y = float(ent(k_y))
        kz = self._kernel(self.t_p, self.n_p)
        self.s_p = float(ent(kz))
        self.i_p = self.s_y + self.s_p - float(ent(kz * k_y))
        full = self._kernel(self.t_all + self.t_p, c + self.n_p)
        self.s_all = float(ent(full))
        self.i_all = self.s_y + self.s_all - float(ent(full * k_y))
        del full, kz
        self.count = self.n_p
        if self.fast:
            self.tz = _packed(self.t_p, iu).contiguous()
            self.reduce = torch.stack([torch.ones_like(self.same), self.same], 1)  # all pairs, weighted by K_Y^2
        else:
            self.tz = self.t_p.clone()
        # tie-break: I(Y; channel j) alone, the same estimator
        saved = self.tz, self.count
        self.tz, self.count = torch.zeros_like(self.tz), 0
        h, hy = self.evaluate(c)
        self.tz, self.count = saved
        self.secondary = (self.s_y + h - hy).tolist()

    @staticmethod
    def _normalise(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = dist.shape[-1]
        iu = torch.triu_indices(n, n, offset=1, device=dist.device)
        pairs = _packed(dist, iu)
        med = pairs.median(dim=-1).values  # torch: the lower middle value for an even count
        med = torch.where(med > 0, med, pairs.mean(-1))  # mostly-duplicate channels: the mean
        scale = torch.where(med > 0, med, torch.ones_like(med))  # constant channel: distances stay 0
        return dist / scale[:, None, None], med

    def _kernel(self, t: torch.Tensor, count: int) -> torch.Tensor:
        return torch.exp(-t / count) if count else torch.ones_like(t)

    def widths(self) -> dict[str, Any]:
        return {"channels": self.medians.div(2).sqrt().tolist(), "labels": 0.0, "condition": self.sigma_cond}

    def evaluate(self, left: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, scale = self.n, -1.0 / (self.count + 1)
        if self.fast:
            # ||K||_F^2 = N + 2 sum_{i<k} K_ik^2 with K = exp(-(T_Z + D~_j) / (|Z| + 1)), over N^2
            chunk = max(1, _CHUNK_ELEMS // self.store.shape[1])
            out = []
            for a in range(0, left, chunk):
                buf = torch.add(self.store[a:min(a + chunk, left)], self.tz)
                buf.mul_(2.0 * scale).exp_()
                out.append(buf @ self.reduce)
            vals = torch.cat(out).mul_(2.0).add_(n).div_(n * n)
            vals = (-torch.log(vals)).cpu()
            return vals[:, 0], vals[:, 1]
        hs, hys = [], []
        chunk = max(1, _CHUNK_ELEMS // (n * n))
        for a in range(0, left, chunk):
            k = torch.exp((self.store[a:min(a + chunk, left)] + self.tz) * scale)
            hs.append(self.ent(k))
            hys.append(self.ent(k * self.k_y))
        return torch.cat(hs).cpu(), torch.cat(hys).cpu()

    def add(self, r: int) -> None:
        self.tz = self.tz + self.store[r]
        self.count += 1

    def swap(self, r: int, last: int) -> None:
        self.store[[r, last]] = self.store[[last, r]]

    def permutation_p(self, ch: int, cmi_true: float, permutations: int, gen: torch.Generator) -> float:
        dist = squared_distances(self.x[:, ch].to(self.dev).unsqueeze(0))
        dt_s = self._normalise(dist)[0][0]
        tz = _unpack(self.tz, self.iu, self.n, 0.0) if self.fast else self.tz
        rest = self.t_all + self.t_p - dt_s
        cz, call = self.count + 1, self.c + self.n_p
        return _permutation_p(dt_s, lambda dp: torch.exp(-(tz + dp) / cz), lambda dp: torch.exp(-(rest + dp) / call),
                              self.k_y, self.s_y, cmi_true, permutations, gen, self.ent)


@torch.no_grad()
def rank_layer(features, labels, *, num_classes=10, alpha=1.01, gamma=5.0, condition=(), stop=None,
               permutations=100, eta=0.05, seed=0, device=None, kernel="exact", target=None) -> CMIRanking:
    """Rank the C channels of one layer by greedy CMI selection (ALGORITHMS.md section 2).

    ``features``: (N, C, H, W) post-BN-ReLU maps (tensor or array); ``labels``: (N,) ints in
    ``[0, num_classes)``; ``condition``: maps (N, Ci, Hi, Wi) of previously pruned layers (their
    kept channels), every channel of which joins the conditioning set P. ``kernel="exact"``
    (default): the paper's Gaussian widths ``gamma * N^(-1/(4+d))`` (d = H*W, K for the labels)
    and Hadamard products; ties in the greedy argmax (within ``TIE_TOL`` nats) go to the lowest
    channel index. ``kernel="adaptive"``: median-heuristic widths, a non-collapsing set kernel
    and ties broken by single-channel MI (see ``_Adaptive``; ``gamma`` is unused). With
    ``stop="permutation"`` every step is tested with ``permutations`` row permutations of the
    added channel until the first step with ``p >= eta``; ``selected`` is then the number of
    channels before it, and the greedy order is completed without further tests. Runs on
    ``device`` (default: the features' device); float64 throughout. ``target`` (adaptive
    kernel only): maps (N, ...) to preserve instead of the labels, e.g. the next layer's
    response (a Gaussian kernel with the median width on the whole response).
    """
    t0 = time.perf_counter()
    x = _as_maps(features, "features")
    n, c, _ = x.shape
    if n < 2:
        raise UserError(f"rank_layer needs at least 2 samples, got {n}")
    num_classes = _check_int("num_classes", num_classes, 1)
    alpha = _check_number("alpha", alpha, 0.0)
    gamma = _check_number("gamma", gamma, 0.0)
    if stop not in (None, "permutation"):
        raise UserError(f"stop must be None or 'permutation', got {stop!r}")
    if kernel not in KERNELS:
        raise UserError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
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

    if target is not None and kernel != "adaptive":
        raise UserError("a target other than the labels needs kernel='adaptive' (cmi: --preserve next with "
                        "--kernel adaptive)")
    if kernel == "exact":
        st = _Exact(x, cond, y, num_classes, alpha, gamma, dev)
    else:
        st = _Adaptive(x, cond, y, num_classes, alpha, gamma, dev,
                       target=None if target is None else _as_maps(target, "target", n))
    gen = torch.Generator().manual_seed(int(seed))
    rows = list(range(c))  # rows[r] = channel held in row r of the store; rows[:left] are candidates
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
    secondary = st.secondary

    for k in range(1, c):
        h, hy = st.evaluate(left)
        m = st.s_y + h - hy
        best = float(m.max())
        tied = torch.nonzero(m >= best - TIE_TOL).flatten().tolist()
        if len(tied) == 1:
            r = tied[0]
        elif secondary is None:
            r = min(tied, key=lambda t: rows[t])
        else:
            r = min(tied, key=lambda t: (-secondary[rows[t]], rows[t]))
        tie_steps += len(tied) > 1
        s = rows[r]
        joint_k = float(h[r])
        order.append(s)
        mi.append(float(m[r]))
        joint.append(joint_k)
        cmi.append(st.i_all - float(m[r]))
        if saturation_step is None and joint_k >= (1.0 - SATURATION_TOL) * ceiling:
            saturation_step = k
        if p_values is not None and selected is None:
            p = st.permutation_p(s, cmi[-1], permutations, gen)
            p_values.append(p)
            if p >= eta:
                selected = k - 1
        st.add(r)
        last = left - 1  # move the chosen row behind the candidates
        if r != last:
            st.swap(r, last)
            rows[r], rows[last] = rows[last], rows[r]
        left -= 1
    order.append(rows[0])
    if p_values is not None and selected is None:
        selected = c - 1 if c > 1 else 1

    wd = st.widths()
    return CMIRanking(
        order=order, cmi=cmi, cmi_total=st.i_all - st.i_p, mi=mi, joint_entropy=joint, p_values=p_values,
        selected=selected, sigma=wd["channels"], sigma_labels=wd["labels"], sigma_condition=wd["condition"],
        entropy_labels=st.s_y, entropy_condition=st.s_p, entropy_all=st.s_all, max_entropy=ceiling,
        saturation_step=saturation_step, tie_steps=int(tie_steps), alpha=alpha, gamma=gamma, n=n,
        kernel=kernel, seconds=time.perf_counter() - t0)


def _permutation_p(x_s: torch.Tensor, make_z, make_f, k_y: torch.Tensor, s_y: float, cmi_true: float,
                   permutations: int, gen: torch.Generator, ent) -> float:
    """Fraction of row permutations of the added channel whose CMI is <= the true CMI.

    ``x_s``: the channel's (N, N) matrix (kernel or normalised distances); ``make_z(x_perm)`` and
    ``make_f(x_perm)`` build the kernels of P u S u {s'} and of P u (all channels but s) u {s'}
    for a batch of permuted copies. With the channel permuted,
    ``cmi = I(Y; rest u s') - I(Y; P u S u s')``.
    """
    n = x_s.shape[0]
    perms = torch.argsort(torch.rand(permutations, n, generator=gen), dim=1).to(x_s.device)
    chunk = max(1, _CHUNK_ELEMS // (4 * n * n))
    below = 0
    for a in range(0, permutations, chunk):
        pi = perms[a:a + chunk]
        xp = x_s[pi[:, :, None], pi[:, None, :]]
        z = make_z(xp)
        f = make_f(xp)
        i_z = s_y + ent(z) - ent(z * k_y)
        i_f = s_y + ent(f) - ent(f * k_y)
        below += int(((i_f - i_z) <= cmi_true + TIE_TOL).sum())
    return below / permutations


# ---------------------------------------------------------------- the criterion

FORMULATIONS = ("per-layer", "compact", "full")
ORDERS = ("forward", "bidirectional")
CUTOFFS = ("scree", "xmeans", "permutation", "knee", "ratio")
PRESERVES = ("labels", "next")
_KEYS = ("formulation", "order", "cutoff", "budget", "alpha", "gamma", "permutations", "eta", "samples",
         "keep_ratio", "kernel", "preserve")


@dataclass(frozen=True)
class CMIOptions:
    """Defaults: the best CMI variant measured one-shot with compensation on the shared VGG16
    (docs/QUALITY.md): adaptive kernels preserving the next layer's response, cut at the run's
    keep ratio (or budget). ``kernel="exact"`` (which preserves the labels unless told otherwise)
    with a paper cutoff (scree, xmeans, permutation) is the paper-faithful mode."""

    formulation: str = "per-layer"
    order: str = "forward"
    cutoff: str = "ratio"
    budget: Budget | None = None
    alpha: float = 2.0
    gamma: float = 5.0
    permutations: int = 100
    eta: float = 0.05
    keep_ratio: float | None = None
    kernel: str = "adaptive"
    preserve: str = "next"  # what the selection preserves: the labels, or the next layer's response


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
        kernel=_choice("kernel", get("kernel"), KERNELS),
        # the exact (paper) kernel preserves the labels unless told otherwise; next needs the adaptive one
        preserve=_choice("preserve", opts.get("preserve") or ("labels" if get("kernel") == "exact" else d.preserve),
                         PRESERVES),
    )


@dataclass
class _Done:
    result: CMIRanking
    keep: int
    cutoff_info: dict[str, Any]
    condition: list[str] = field(default_factory=list)


class _Engine:
    direction_workers = 2  # threads for the two directions of the bidirectional order (1: one after the other)

    def __init__(self, ctx: RankContext, opts: CMIOptions):
        self.ctx, self.opts = ctx, opts
        self.capture = FeatureCapture(ctx.model, ctx.layers, ctx.images, device=ctx.device)
        self.stop = "permutation" if opts.cutoff == "permutation" and opts.budget is None else None

    def rank(self, i: int, condition: Sequence[torch.Tensor], upcoming: Sequence[int]) -> CMIRanking:
        feats = self.capture.get(i, upcoming)
        o = self.opts
        target = self.response(i) if o.preserve == "next" else None
        res = rank_layer(feats, self.ctx.labels, num_classes=self.ctx.num_classes, alpha=o.alpha, gamma=o.gamma,
                         condition=condition, stop=self.stop, permutations=o.permutations, eta=o.eta,
                         seed=self.ctx.seed + i, device=self.ctx.device, kernel=o.kernel, target=target)
        return res

    @torch.no_grad()
    def response(self, i: int) -> torch.Tensor:
        """The dense output of layer i's first consumer (the next conv's pre-activation, or logits)."""
        modules = dict(self.ctx.model.named_modules())
        consumer = modules[self.ctx.layers[i].consumers[0]]
        got: list[torch.Tensor] = []
        h = consumer.register_forward_hook(lambda _m, _a, out: got.append(out.detach().float()))
        try:
            for a in range(0, len(self.ctx.images), 64):
                self.ctx.model(self.ctx.images[a:a + 64])
        finally:
            h.remove()
        return torch.cat(got).reshape(len(self.ctx.images), -1)

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
        if o.cutoff == "ratio":  # the option, else the run's --keep-ratio
            ratio = o.keep_ratio if o.keep_ratio is not None else self.ctx.keep_ratio
            if ratio is None:
                raise UserError("cmi cutoff=ratio needs a keep ratio (option keep_ratio or --keep-ratio)")
            return ratio_cutoff(channels, float(ratio)), {"keep_ratio": ratio}
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
            with ThreadPoolExecutor(max_workers=self.direction_workers, thread_name_prefix="cmi-bidir") as pool:
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

    Formulations: per-layer (P empty), compact (P = the kept maps of the previously pruned
    layer), full (P = the kept maps of all previously pruned layers). Orders: forward (network
    order), bidirectional (rank all per-layer, cut, seed = the layer with the highest pruned
    fraction, then walk towards the input and towards the output in two threads; with "full"
    each direction conditions on the seed and the layers of its own side). With a budget the keep
    counts come from a per-layer pass (allocated together), and the conditioned pass uses them.

    Options: formulation (per-layer | compact | full), order (forward | bidirectional), cutoff
    (scree | xmeans | permutation | knee | ratio), budget ("flops=0.4" / "params=0.2": keep at
    most that fraction of the prunable convs, overrides the cutoff), alpha (2.0), gamma (5.0),
    permutations (100), eta (0.05), keep_ratio (for cutoff=ratio), kernel (exact: the paper's
    widths and ties to the lowest index; adaptive: median widths, ties by single-channel MI),
    samples (applied by the caller; ignored here).
    """
    return _Engine(ctx, parse_options(ctx.options)).run()


cmi_criterion.option_names = _KEYS  # type: ignore[attr-defined]
cmi_criterion.parse_options = parse_options  # type: ignore[attr-defined]
cmi_criterion.reads_keep_ratio = True  # type: ignore[attr-defined]  (cutoff "ratio": part of the rank key)
