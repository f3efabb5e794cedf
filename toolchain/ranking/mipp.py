"""MIPP, mutual-information-preserving pruning (Westphal, Hailes, Musolesi, 2024; ALGORITHMS.md section 4).

``select_layer`` chooses the kept channels of one layer so that the MI between the layer and the
next (already pruned) layer is preserved; the ``mipp`` criterion (registered in ``CRITERIA`` on
import) walks the network from the output back to the input.

Selection rule (transfer entropy redundancy criterion with MI ordering): every channel starts
kept; channels are visited from the least to the most informative about ``x_next`` (their own
MI with it, ties to the lower index) and a channel is removed at once when removing it from the
*current* kept set does not lower ``I(X_kept; x_next)`` at the given confidence. Every decision
yields one number, the channel's *evidence*: a channel is kept exactly when its evidence is
> 0 (except that the last kept channel of a layer is never removed: ``forced``).

Estimators (``estimator=``):

- ``renyi`` (fast, default): matrix-based Renyi MI (ALGORITHMS.md section 1, functions of
  ``toolchain.info.renyi``) with Gaussian kernels. A channel set's Gram is the Hadamard product of
  its channels' kernels, i.e. ``exp(-sum of the channels' exponents)``, so the leave-one-out Gram
  ("product of all but i", what prefix/suffix products give) is ``exp(-(E_kept - E_i))``: the
  division by ``K_i`` is done in the exponent domain, which never divides by a near-zero Gram
  entry. ``E_kept`` is updated by one subtraction after each removal (and recomputed from
  scratch every ``_RESUM_EVERY`` removals against drift). With alpha = 2 every entropy is a
  Frobenius norm over the N(N-1)/2 sample pairs.

  Significance (our choice; the paper gives none for this estimator): a *permutation test*.
  The observed drop ``d = I(X_kept; Y) - I(X_kept \\ {i}; Y)`` is compared with the drops
  obtained when channel i's samples are permuted (``P`` row permutations of its Gram, the
  channel made independent of everything else while keeping its marginal). With
  ``p = (1 + #{null >= d}) / (P + 1)`` the channel is kept when ``d > DROP_TOL`` and
  ``p <= 1 - confidence``; equivalently its evidence ``d - max(crit, DROP_TOL)`` is > 0, with
  ``crit`` the matching order statistic of the null drops. ``P = max(19, ceil(2 / (1 -
  confidence)) - 1)`` (39 at 0.95, 199 at 0.99), permutations seeded and shared by the layer's
  channels. When ``d <= DROP_TOL`` (1e-9 nats) removing the channel does not lower the MI at
  all: it is removed without a test and its evidence is ``d - DROP_TOL``. The permutation null
  matters because this estimator is biased upwards: adding an unrelated channel also raises
  the matrix-based MI, so ``d > 0`` alone says little.

  Kernels (``kernel=``, one fixed width per layer so that a set's Gram is always the product of
  its channels' kernels): ``"median"`` (default): ``K = exp(-D / m)`` with m the median of the
  *whole layer's* summed squared distances (over a fixed subset of ``MEDIAN_PAIRS`` pairs; the
  mean where the median is 0), and the same rule for ``x_next``; or ``"paper"``: the CMI
  engine's widths ``gamma * N^(-1/(4+d))`` (d = H*W of one channel; for ``x_next`` d = H*W of
  its channels, or its width for a 2-D ``x_next`` such as logits). ``gamma`` only acts on the
  paper kernel. Measured on the shared VGG16-BN baseline (benchmarks/bench_mipp.py): with the
  paper widths every layer but the last three is saturated (ALGORITHMS.md section 5), every
  drop looks like noise and the layers collapse to a handful of channels (10% accuracy); the
  median kernel is scale-free (it also behaves on a freshly initialised network, whose
  activation scales are arbitrary). The visit order uses single-channel MIs, each channel with
  its own median width under the median kernel.

  Periodic exact re-sums aside, nothing is recomputed from scratch: per candidate one
  leave-one-out MI and, when its drop is positive, ``P`` permuted ones (O(P N^2) for alpha 2;
  other alphas go through batched float64 eigenvalues, ``toolchain.info.renyi.renyi_entropy``).

- ``mlp`` (the paper's): MI is measured by how well a small MLP (one hidden layer of
  ``MLP_HIDDEN`` ReLU units, Adam, full batch, MSE, L1 on the input weights and L2 on the
  output weights) predicts ``x_next`` from the kept channels. The layer's maps and ``x_next``
  are average-pooled to at most 2x2 (1x1 where ``C * 4`` would exceed ``MLP_MAX_INPUTS``),
  every feature standardised (constant features become 0), and ``x_next`` reduced to its
  first ``MLP_MAX_OUTPUTS`` principal components. ``repeats`` MLPs (own seed, own random 75/25 train/validation
  split of the N samples) are trained on the kept set (``MLP_BASE_STEPS``). For a candidate
  each is retrained briefly (``MLP_RETRAIN_STEPS``) with the channel masked, and, as the
  control, retrained the same number of steps without masking. Before retraining, the masked
  channel's input weights are moved onto the kept features that linearly predict it (ridge
  regression from the kept features' precision matrix, downdated after each removal): a copy of
  a kept channel is then masked at no cost, where 30 plain Adam steps do not re-route it; the rise is the difference of
  the two validation losses. Kept when the rise is significant: a one-sided paired t-test
  over the repeats at ``confidence`` whose lower confidence bound of the mean rise
  ``mean - t_{conf, R-1} * sd / sqrt(R)`` must exceed a margin; the excess is the evidence.
  The margin is the control's improvement over its retraining round (``base loss - control
  loss``, floored at 0 per repeat, averaged over the repeats) plus ``MLP_RISE_TOL`` times the
  control loss. Why the improvement: the base may still be converging, and masking changes how
  fast a retraining round converges, the same way in every repeat, so the t-test cannot tell that
  lag from lost information. With two copies of a channel, the control's two copies get the same
  gradient, so that input moves twice as fast as the one re-routed copy of the masked run: the
  masked run lags by a small but consistent rise (about 1e-4 on a validation loss of 0.07 on the
  six-channel test case), which passed the test against ``MLP_RISE_TOL`` alone, so both copies
  were kept. The lag is bounded by the control's improvement (the masked run starts from the
  base's loss after an exact re-routing), and the margin falls back to ``MLP_RISE_TOL`` once the
  validation loss stops improving (or rises: overfitting). A removal makes the retrained masked
  MLPs (and their validation losses) the new base. Candidates are evaluated in speculative
  batches (all repeats of several candidates as one batched MLP): results after the first
  removal of a batch are discarded and recomputed. The visit order uses the single-channel
  matrix-based MI (the renyi path) for both estimators.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from toolchain.errors import UserError
from toolchain.info.renyi import paper_sigma, renyi_entropy, squared_distances
from toolchain.ranking.base import CRITERIA, LayerRanking, RankContext
from toolchain.ranking.capture import FeatureCapture

__all__ = ["MIPPOptions", "MIPPSelection", "mipp_criterion", "parse_options", "permutation_count", "select_layer"]

ESTIMATORS = ("renyi", "mlp")
KERNELS = ("paper", "median")
DROP_TOL = 1e-9  # nats: an MI drop at or below this is "does not lower the MI"
SATURATION_TOL = 0.01  # an entropy within 1% of ln N is saturated (ALGORITHMS.md section 5)
MIN_PERMUTATIONS = 19
_RESUM_EVERY = 32  # removals between exact recomputations of the kept set's distance sum
_CHUNK_ELEMS = 1 << 22  # float64 elements per temporary chunk (32 MiB)

MEDIAN_PAIRS = 8192  # the median kernel's width comes from the median over this many sample pairs

MLP_HIDDEN = 16
MLP_BASE_STEPS = 200
MLP_RETRAIN_STEPS = 30
MLP_LR = 1e-2
MLP_L1 = 1e-3  # L1 on the input weights: regularises without favouring duplicated inputs (L2 would)
MLP_L2 = 1e-2  # L2 on the output weights
MLP_RIDGE = 1e-3  # ridge of the linear re-routing (standardised features)
MLP_VAL_FRACTION = 0.25
MLP_MAX_INPUTS = 1024  # pooled features of the layer (and of x_next) kept below this
MLP_MAX_OUTPUTS = 64  # x_next's pooled features are reduced to this many principal components
MLP_RISE_TOL = 1e-6  # relative: rises below this fraction of the control loss are 0
MLP_MAX_BATCH = 16  # candidates per speculative batch


# ---------------------------------------------------------------- validation


def _number(name: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = True,
            hi_open: bool = False) -> float:
    bad = isinstance(value, bool)
    try:
        v = float(value)
    except (TypeError, ValueError):
        bad, v = True, math.nan
    if not bad:
        bad = not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
    if bad:
        lo_s = f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi == math.inf else f" and {'<' if hi_open else '<='} {hi:g}"
        raise UserError(f"{name} must be a number {lo_s}{hi_s}, got {value!r}")
    return v


def _integer(name: str, value: Any, lo: int) -> int:
    ok = not isinstance(value, bool)
    try:
        v = int(value)
        ok = ok and v == float(value) and v >= lo
    except (TypeError, ValueError, OverflowError):
        ok, v = False, 0
    if not ok:
        raise UserError(f"{name} must be an integer >= {lo}, got {value!r}")
    return v


def _choice(name: str, value: Any, valid: Sequence[str]) -> str:
    if value not in valid:
        raise UserError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
    return value


def permutation_count(confidence: float) -> int:
    """Permutations of the renyi test at this confidence: ``max(19, ceil(2 / (1 - confidence)) - 1)``."""
    return max(MIN_PERMUTATIONS, math.ceil(2.0 / (1.0 - confidence) - 1e-9) - 1)


def _t_critical(confidence: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(confidence, df))


# ---------------------------------------------------------------- inputs


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{name} must be an array or tensor: {e}") from None
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{name} holds non-finite values")
    return t


def _centered_channels(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """(N, C, d) float64 with each position's mean over the samples removed (distances unchanged,
    constant channels become exact zeros)."""
    t = x.to(device=dev, dtype=torch.float64).reshape(x.shape[0], x.shape[1], -1)
    return t - t.mean(0, keepdim=True)


def _packed_distances(x: torch.Tensor, iu: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Squared distances of every channel of ``x`` (N, C, d) over the sample pairs i < j: (C, P)."""
    n, c, d = x.shape
    out = torch.empty(c, iu.shape[1], dtype=dtype, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(n * max(n, d), 1))
    for a in range(0, c, step):
        dist = squared_distances(x[:, a:a + step].transpose(0, 1))
        out[a:a + step] = dist[:, iu[0], iu[1]].to(dtype)
    return out


# ---------------------------------------------------------------- the renyi estimator


class _RenyiMI:
    """``I(X_S; Y)`` for channel sets S given by their summed packed squared distances, batched.

    Gram of a set: ``exp(-D_S / scale)`` with one fixed ``scale`` per layer (``2 sigma^2`` of the
    paper rule, or the median of the whole layer's D for the median kernel), which is the
    Hadamard product of the channels' Gaussian kernels.
    """

    def __init__(self, n: int, iu: torch.Tensor, d_y: torch.Tensor, *, alpha: float, scale_x: float,
                 scale_y: float):
        self.n, self.iu, self.alpha, self.scale_x = n, iu, alpha, scale_x
        e_y = d_y[None] / scale_y
        self.k_y2 = torch.exp(-2.0 * e_y[0])
        self.k_y_full = None if alpha == 2.0 else self._unpack(torch.exp(-e_y))
        self.s_y = float(self._entropy(e_y)[0])

    def exponents(self, d: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        return d * (1.0 / (self.scale_x if scale is None else scale))

    def _unpack(self, k: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(k.shape[0], self.n, self.n, dtype=k.dtype, device=k.device)
        full[:, self.iu[0], self.iu[1]] = k
        full = full + full.transpose(1, 2)
        full.diagonal(dim1=1, dim2=2).fill_(1.0)
        return full

    def _entropy(self, e: torch.Tensor) -> torch.Tensor:
        n = self.n
        if self.alpha == 2.0:  # ||K||_F^2 = N + 2 sum_{i<j} K_ij^2, tr K = N
            return -torch.log((n + 2.0 * torch.exp(-2.0 * e).sum(-1)) / (n * n))
        return renyi_entropy(self._unpack(torch.exp(-e)), self.alpha)

    def from_exponents(self, e: torch.Tensor) -> torch.Tensor:
        """MI for a batch of exponents (B, P)."""
        n = self.n
        out = []
        step = max(1, _CHUNK_ELEMS // max(e.shape[1] if self.alpha == 2.0 else n * n, 1))
        for a in range(0, e.shape[0], step):
            ea = e[a:a + step]
            if self.alpha == 2.0:
                k2 = torch.exp(-2.0 * ea)
                both = torch.stack([k2.sum(-1), k2 @ self.k_y2], -1)
                s = -torch.log((n + 2.0 * both) / (n * n))
                out.append(s[:, 0] + self.s_y - s[:, 1])
            else:
                k = self._unpack(torch.exp(-ea))
                out.append(renyi_entropy(k, self.alpha) + self.s_y
                           - renyi_entropy(k * self.k_y_full, self.alpha))
        return torch.cat(out)

    def mi(self, d: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """MI of sets given by summed distances (B, P); ``scale`` overrides the layer's."""
        return self.from_exponents(self.exponents(d, scale))

    def entropy(self, d: torch.Tensor) -> torch.Tensor:
        return self._entropy(self.exponents(d))


def _median_scale(d: torch.Tensor) -> torch.Tensor:
    """Median kernel scale of each row of packed distances (B, P): the median over a fixed subset
    of at most MEDIAN_PAIRS pairs; the mean where the median is 0 (sparse maps); inf where every
    distance is 0 (a constant variable: its kernel is all ones)."""
    step = max(1, d.shape[1] // MEDIAN_PAIRS)
    s = d[:, ::step].median(dim=-1, keepdim=True).values
    if not bool((s > 0).all()):
        s = torch.where(s > 0, s, d.mean(-1, keepdim=True))
        s = torch.where(s > 0, s, torch.full_like(s, math.inf))
    return s


def _next_distances(y: torch.Tensor, iu: torch.Tensor, dev: torch.device, gamma: float, n: int
                    ) -> tuple[torch.Tensor, float]:
    """Summed packed squared distances of x_next and its paper width."""
    # (N, D): one variable (logits, features); (N, C', ...): C' channels of d = prod(shape[2:]) each
    flat = y.reshape(n, 1, -1) if y.ndim == 2 else y.reshape(n, y.shape[1], -1)
    t = flat.to(device=dev, dtype=torch.float64)
    t = t - t.mean(0, keepdim=True)
    d = t.shape[2]
    dist = torch.zeros(iu.shape[1], dtype=torch.float64, device=dev)
    if t.shape[1] and d:
        dist += _packed_distances(t, iu, torch.float64).sum(0)
    return dist, paper_sigma(n, max(d, 1), gamma)


# ---------------------------------------------------------------- the mlp estimator


def _pool_features(t: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, int]:
    """(N, C, ...) -> (N, C, f) average-pooled to at most 2x2 (1x1 when C * 4 > MLP_MAX_INPUTS);
    (N, D) stays as is (f = 1 feature per column). Returns the features and the pooled side."""
    t = t.to(device=dev, dtype=torch.float32)
    if t.ndim == 2:
        return t[:, :, None], 1
    n, c = t.shape[:2]
    small = c * 4 > MLP_MAX_INPUTS
    if t.ndim == 4:
        side = 1 if small or min(t.shape[-2:]) < 2 else 2
        return F.adaptive_avg_pool2d(t, side).reshape(n, c, -1), side
    flat = t.reshape(n, c, -1)
    side = 1 if small or flat.shape[2] < 4 else 4
    return F.adaptive_avg_pool1d(flat, side), side


def _standardize(t: torch.Tensor) -> torch.Tensor:
    """Per-column z-score in float64 (constant columns become exact zeros), returned float32."""
    t = t.double()
    mean = t.mean(0, keepdim=True)
    sd = t.std(0, unbiased=False, keepdim=True)
    ok = sd > 1e-12 * (1.0 + mean.abs())
    return torch.where(ok, (t - mean) / torch.where(ok, sd, torch.ones_like(sd)), torch.zeros_like(t)).float()


class _MLPEstimator:
    """Batched MLPs predicting pooled x_next from the pooled channels of x (one group per run)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, repeats: int, seed: int, dev: torch.device):
        n, c = x.shape[0], x.shape[1]
        feats, self.pool = _pool_features(x, dev)
        self.features_per_channel = feats.shape[2]
        self.x = _standardize(feats.reshape(n, -1))
        self.col_channel = torch.arange(c, device=dev).repeat_interleave(feats.shape[2])
        yp, self.pool_next = _pool_features(y, dev)
        target = _standardize(yp.reshape(n, -1))
        target = target[:, target.abs().amax(0) > 0]  # constant outputs carry nothing
        if target.shape[1] > MLP_MAX_OUTPUTS:  # principal components, mean variance 1
            _, sv, vh = torch.linalg.svd(target.double(), full_matrices=False)
            scores = target.double() @ vh[:MLP_MAX_OUTPUTS].T
            target = (scores / (sv[:MLP_MAX_OUTPUTS] ** 2 / n).mean().sqrt()).float()
        self.y = target
        self.repeats, self.dev, self.n, self.c = repeats, dev, n, c
        g = torch.Generator().manual_seed(int(seed))
        n_val = max(1, round(MLP_VAL_FRACTION * n))
        self.train_w = torch.ones(repeats, n)
        self.val_w = torch.zeros(repeats, n)
        for r in range(repeats):
            val = torch.randperm(n, generator=g)[:n_val]
            self.train_w[r, val] = 0.0
            self.val_w[r, val] = 1.0
        self.train_w, self.val_w = self.train_w.to(dev), self.val_w.to(dev)
        self.gen = g
        # ridge precision matrix of the kept input features (float64), for the re-routing warm start
        xd = self.x.double()
        cov = xd.T @ xd / n
        self.precision = torch.linalg.inv(cov + MLP_RIDGE * torch.eye(cov.shape[0], dtype=cov.dtype, device=dev))

    def _cols(self, ch: int) -> torch.Tensor:
        f = self.features_per_channel
        return torch.arange(ch * f, (ch + 1) * f, device=self.dev)

    def reroute(self, params: dict[str, torch.Tensor], cands: Sequence[int]) -> dict[str, torch.Tensor]:
        """Warm start for masking: per candidate block of R groups (copy k = candidate k), move the
        candidate's input weights onto the kept features that linearly predict it.

        With ``x_i ~ X_rest @ B`` (ridge regression over the N samples, ``B = -P_ri P_ii^-1`` from
        the precision matrix P of the kept features), ``X_rest W_rest + x_i W_i`` is approximated by
        ``X_rest (W_rest + B W_i)``: an exact copy of a kept channel is masked at no cost.
        """
        w1 = params["w1"].clone()
        r = self.repeats
        for k, ch in enumerate(cands):
            cols = self._cols(ch)
            p_ri = self.precision[:, cols]  # (in, f)
            p_ii = p_ri[cols]
            b = -(p_ri @ torch.linalg.pinv(p_ii))  # (in, f)
            b[cols] = 0.0
            blk = slice(k * r, (k + 1) * r)
            w1[blk] += torch.einsum("if,gfh->gih", b.float(), w1[blk][:, cols])
        out = dict(params)
        out["w1"] = w1
        return out

    def remove(self, ch: int) -> None:
        """Downdate the precision matrix: the inverse of the kept features' ridge covariance."""
        cols = self._cols(ch)
        p_ci = self.precision[:, cols]
        self.precision = self.precision - p_ci @ torch.linalg.pinv(p_ci[cols]) @ p_ci.T
        self.precision[cols] = 0.0
        self.precision[:, cols] = 0.0

    def init(self) -> dict[str, torch.Tensor]:
        r, i, h, o = self.repeats, self.x.shape[1], MLP_HIDDEN, self.y.shape[1]
        g = self.gen
        w1 = (torch.rand(r, i, h, generator=g) * 2 - 1) / math.sqrt(max(i, 1))
        w2 = (torch.rand(r, h, o, generator=g) * 2 - 1) / math.sqrt(h)
        return {k: v.to(self.dev) for k, v in
                {"w1": w1, "b1": torch.zeros(r, 1, h), "w2": w2, "b2": torch.zeros(r, 1, o)}.items()}

    @staticmethod
    def repeat(params: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
        """Groups ordered (copy, repeat): copy k of repeat r at k * R + r."""
        return {k: v.repeat(times, 1, 1) for k, v in params.items()}

    @staticmethod
    def take(params: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx].clone() for k, v in params.items()}

    def _loss(self, p: dict[str, torch.Tensor], colmask: torch.Tensor) -> torch.Tensor:
        hid = torch.relu(self.x @ (p["w1"] * colmask[:, :, None]) + p["b1"])
        out = hid @ p["w2"] + p["b2"]
        return ((out - self.y) ** 2).mean(-1)  # (G, N)

    def fit(self, params: dict[str, torch.Tensor], masks: torch.Tensor, steps: int
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Train every group ``steps`` full-batch Adam steps with its channel mask (G, C);
        group g belongs to repeat ``g % R``. Returns the new parameters and validation losses (G,)."""
        g = masks.shape[0]
        rep = torch.arange(g, device=self.dev) % self.repeats
        tw, vw = self.train_w[rep], self.val_w[rep]
        colmask = masks[:, self.col_channel].float()
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        if self.y.shape[1] == 0 or steps == 0:
            with torch.no_grad():
                return {k: v.detach() for k, v in p.items()}, self._val(p, colmask, vw)
        opt = torch.optim.Adam(list(p.values()), lr=MLP_LR)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                err = self._loss(p, colmask)
                loss = ((err * tw).sum(1) / tw.sum(1)).sum()
                loss = loss + MLP_L1 * (p["w1"] * colmask[:, :, None]).abs().sum() + MLP_L2 * (p["w2"] ** 2).sum()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return {k: v.detach() for k, v in p.items()}, self._val(p, colmask, vw)

    @torch.no_grad()
    def _val(self, p, colmask, vw) -> torch.Tensor:
        if self.y.shape[1] == 0:
            return torch.zeros(colmask.shape[0], dtype=torch.float64, device=self.dev)
        err = self._loss(p, colmask).double()
        return (err * vw).sum(1) / vw.sum(1)


# ---------------------------------------------------------------- one layer


@dataclass
class MIPPSelection:
    """Result of ``select_layer``; unpacks as ``kept, evidence = select_layer(...)``."""

    kept: list[int]  # kept channel indices, sorted
    evidence: list[float]  # one per channel, > 0 exactly for the channels the test kept
    visit_order: list[int]  # channels in the order they were visited (least informative first)
    removed_order: list[int]  # channels in the order they were removed
    mi_single: list[float]  # per channel: I(x_c; x_next), the visit-order key (matrix-based)
    estimator: str
    confidence: float
    forced: int | None = None  # the channel kept only because a layer keeps at least one
    p_values: list[float | None] = field(default_factory=list)  # renyi: permutation p (None: untested)
    drops: list[float] = field(default_factory=list)  # renyi: observed MI drop; mlp: mean loss rise
    critical: list[float | None] = field(default_factory=list)  # renyi: critical null drop (None: untested)
    mi_full: float | None = None  # renyi: I(X_all; x_next)
    mi_kept: float | None = None  # renyi: I(X_kept; x_next)
    entropy_full: float | None = None  # renyi: S(X_all)
    entropy_next: float | None = None  # S(x_next)
    max_entropy: float = 0.0  # ln N
    kernel: str = "median"
    widths: dict[str, Any] = field(default_factory=dict)
    permutations: int | None = None
    mlp: dict[str, Any] | None = None  # mlp settings and counts
    seconds: float = 0.0

    def __iter__(self):
        yield self.kept
        yield self.evidence

    @property
    def saturated(self) -> dict[str, bool]:
        ceil = (1.0 - SATURATION_TOL) * self.max_entropy
        return {"layer": self.entropy_full is not None and self.entropy_full >= ceil,
                "next": self.entropy_next is not None and self.entropy_next >= ceil}

    def to_info(self) -> dict[str, Any]:
        f = lambda v: None if v is None else float(v)  # noqa: E731
        return {
            "estimator": self.estimator, "confidence": float(self.confidence), "kept": len(self.kept),
            "kept_channels": list(self.kept), "evidence": [float(v) for v in self.evidence],
            "visit_order": list(self.visit_order), "removed_order": list(self.removed_order),
            "mi_single": [float(v) for v in self.mi_single], "forced": self.forced,
            "p_values": [f(p) for p in self.p_values], "drops": [float(v) for v in self.drops],
            "critical": [f(v) if v is None or math.isfinite(v) else None for v in self.critical],
            "mi_full": f(self.mi_full), "mi_kept": f(self.mi_kept), "entropy_full": f(self.entropy_full),
            "entropy_next": f(self.entropy_next), "max_entropy": float(self.max_entropy),
            "saturated": self.saturated, "kernel": self.kernel, "widths": self.widths,
            "permutations": self.permutations, "mlp": self.mlp, "seconds": round(float(self.seconds), 4),
        }


@torch.no_grad()
def select_layer(x, x_next, *, estimator="renyi", confidence=0.95, alpha=2.0, gamma=5.0, repeats=5, seed=0,
                 device=None, kernel="median") -> MIPPSelection:
    """Kept channels of one layer by MIPP's redundancy rule (see the module docstring).

    ``x``: (N, C, H, W) activations of the layer being pruned (any (N, C, ...) works);
    ``x_next``: activations of the next, already pruned layer or the logits, any shape with N
    first ((N, D): one variable; (N, C', ...): C' channels, one joint variable). ``confidence``
    in (0, 1): higher removes more. ``alpha``, ``gamma`` and ``kernel`` configure the matrix-based
    estimator (also used for the visit order with ``mlp``); ``repeats`` the mlp estimator's MLPs.
    Runs on ``device`` (default: x's device). Returns a ``MIPPSelection``
    (``kept, evidence = select_layer(...)``).
    """
    t0 = time.perf_counter()
    estimator = _choice("mipp estimator", estimator, ESTIMATORS)
    kernel = _choice("mipp kernel", kernel, KERNELS)
    confidence = _number("mipp confidence", confidence, 0.0, 1.0, hi_open=True)
    alpha = _number("mipp alpha", alpha, 0.0)
    gamma = _number("mipp gamma", gamma, 0.0)
    repeats = _integer("mipp repeats", repeats, 2 if estimator == "mlp" else 1)
    seed = _integer("mipp seed", seed, 0)
    xt, yt = _as_tensor(x, "x"), _as_tensor(x_next, "x_next")
    if xt.ndim < 2 or xt.shape[1] < 1:
        raise UserError(f"x must have shape (N, C, ...), got {tuple(xt.shape)}")
    if yt.ndim < 1 or yt.shape[0] != xt.shape[0]:
        raise UserError(f"x_next must have N = {xt.shape[0]} samples first, got shape {tuple(yt.shape)}")
    n, c = xt.shape[0], xt.shape[1]
    if n < 3:
        raise UserError(f"select_layer needs at least 3 samples, got {n}")
    if yt.ndim == 1:
        yt = yt[:, None]
    dev = torch.device(device) if device is not None else xt.device

    xc = _centered_channels(xt, dev)
    d = xc.shape[2]
    iu = torch.triu_indices(n, n, offset=1, device=dev)
    dx = _packed_distances(xc, iu, torch.float32)  # (C, P), raw squared distances per channel
    del xc
    d_y, sigma_y = _next_distances(yt, iu, dev, gamma, n)
    sigma = paper_sigma(n, max(d, 1), gamma)
    if kernel == "paper":
        scale_x, scale_y = 2.0 * sigma * sigma, 2.0 * sigma_y * sigma_y
        widths: dict[str, Any] = {"channels": sigma, "next": sigma_y}
    else:  # fixed for the layer: the medians of the whole layer's and of x_next's distances
        scale_x = float(_median_scale(dx.double().sum(0, keepdim=True))[0, 0])
        scale_y = float(_median_scale(d_y[None])[0, 0])
        widths = {k: math.sqrt(v / 2.0) if math.isfinite(v) else None  # None: constant, K = all ones
                  for k, v in (("channels", scale_x), ("next", scale_y))}
    est = _RenyiMI(n, iu, d_y, alpha=alpha, scale_x=scale_x, scale_y=scale_y)

    # visit order: single-channel MI with x_next, least informative first (ties: lower index);
    # with the median kernel every channel gets its own median width here
    mi_single = []
    for a in range(0, c, 64):
        da = dx[a:a + 64].double()
        mi_single.append(est.mi(da, None if kernel == "paper" else _median_scale(da)))
    mi_single = torch.cat(mi_single).cpu()
    visit = torch.sort(mi_single, stable=True).indices.tolist()

    sel = MIPPSelection(kept=[], evidence=[0.0] * c, visit_order=visit, removed_order=[],
                        mi_single=mi_single.tolist(), estimator=estimator, confidence=confidence,
                        max_entropy=math.log(n), kernel=kernel, entropy_next=est.s_y,
                        p_values=[None] * c, drops=[0.0] * c, critical=[None] * c, widths=widths)
    if estimator == "renyi":
        _renyi_pass(sel, est, dx, confidence, seed)
    else:
        _mlp_pass(sel, xt, yt, dev, confidence, repeats, seed)
    sel.seconds = time.perf_counter() - t0
    return sel


def _packed_index(pi: torch.Tensor, iu: torch.Tensor, n: int) -> torch.Tensor:
    """Packed position of the pair (pi[a], pi[b]) for every pair a < b: (B, P) for permutations (B, N)."""
    lo = torch.minimum(pi[:, iu[0]], pi[:, iu[1]])
    hi = torch.maximum(pi[:, iu[0]], pi[:, iu[1]])
    return lo * n - lo * (lo + 1) // 2 + (hi - lo - 1)


def _renyi_pass(sel: MIPPSelection, est: _RenyiMI, dx: torch.Tensor, confidence: float, seed: int) -> None:
    c, npairs = dx.shape
    n, iu = est.n, est.iu
    perms = permutation_count(confidence)
    sel.permutations = perms
    allowed = math.floor((1.0 - confidence) * (perms + 1) - 1.0 + 1e-9)  # null drops >= d allowed when kept
    gen = torch.Generator().manual_seed(int(seed))
    # the same row permutations for every channel of the layer
    pidx = _packed_index(torch.argsort(torch.rand(perms, n, generator=gen), dim=1).to(dx.device), iu, n)

    kept = torch.ones(c, dtype=torch.bool, device=dx.device)
    d_set = dx.double().sum(0)
    sel.entropy_full = float(est.entropy(d_set[None])[0])
    i_cur = float(est.mi(d_set[None])[0])
    sel.mi_full = i_cur
    removals = 0
    chunk = max(1, _CHUNK_ELEMS // max(npairs, 1))
    for ch in sel.visit_order:
        d_i = dx[ch].double()
        d_rest = d_set - d_i
        i_rest = float(est.mi(d_rest[None])[0])
        drop = i_cur - i_rest
        sel.drops[ch] = drop
        if drop <= DROP_TOL:
            evidence = drop - DROP_TOL
        else:
            null = torch.cat([est.mi(d_rest[None] + d_i[pidx[a:a + chunk]]) for a in range(0, perms, chunk)])
            null = (null - i_rest).cpu()
            sel.p_values[ch] = (1 + int((null >= drop).sum())) / (perms + 1)
            crit = float(torch.sort(null).values[perms - allowed - 1]) if allowed >= 0 else math.inf
            sel.critical[ch] = crit
            evidence = drop - max(crit, DROP_TOL)
        if not _try_remove(sel, kept, ch, evidence):
            continue
        removals += 1
        d_set = d_rest if removals % _RESUM_EVERY else dx[kept].double().sum(0)
        i_cur = i_rest if removals % _RESUM_EVERY else float(est.mi(d_set[None])[0])
    sel.kept = torch.nonzero(kept).flatten().tolist()
    sel.mi_kept = i_cur


def _try_remove(sel: MIPPSelection, kept: torch.Tensor, ch: int, evidence: float) -> bool:
    """The selection rule: record the evidence; remove the channel unless it is significant or the last one."""
    sel.evidence[ch] = float(evidence)
    if evidence > 0:
        return False
    if int(kept.sum()) == 1:
        sel.forced = ch
        return False
    kept[ch] = False
    sel.removed_order.append(ch)
    return True


def _mlp_pass(sel: MIPPSelection, x: torch.Tensor, y: torch.Tensor, dev: torch.device, confidence: float,
              repeats: int, seed: int) -> None:
    c = x.shape[1]
    mlp = _MLPEstimator(x, y, repeats=repeats, seed=seed, dev=dev)
    tcrit = _t_critical(confidence, repeats - 1)
    kept = torch.ones(c, dtype=torch.bool, device=dev)
    base, base_val = mlp.fit(mlp.init(), kept[None].expand(repeats, c), MLP_BASE_STEPS)
    control = torch.zeros(repeats, dtype=torch.float64)
    progress = 0.0  # the control's mean improvement over its retraining round (part of the margin)
    need_control = True  # the control runs join the next batch after every change of the base
    runs = discarded = fits = 0
    visit = sel.visit_order
    pos, batch = 0, 4
    while pos < len(visit):
        cands = visit[pos:pos + batch]
        b = len(cands)
        masks = kept[None].repeat(b * repeats, 1)
        cidx = torch.tensor(cands, device=dev).repeat_interleave(repeats)
        masks[torch.arange(b * repeats, device=dev), cidx] = False
        start = mlp.reroute(mlp.repeat(base, b), cands)
        if need_control:  # groups b*R .. b*R+R-1: the base retrained unmasked, repeat r at b*R + r
            start = {k: torch.cat([v, base[k]]) for k, v in start.items()}
            masks = torch.cat([masks, kept[None].expand(repeats, c)])
        params, losses = mlp.fit(start, masks, MLP_RETRAIN_STEPS)
        fits += 1
        if need_control:
            control, need_control = losses[b * repeats:].cpu(), False
            progress = float((base_val.cpu() - control).clamp(min=0.0).mean())
        runs += b
        rises = (losses[:b * repeats].view(b, repeats).cpu() - control[None])
        tol = progress + MLP_RISE_TOL * float(control.mean())  # the margin
        removed_at = None
        for j, ch in enumerate(cands):
            r = rises[j]
            mean, sd = float(r.mean()), float(r.std(unbiased=True))
            evidence = mean - tcrit * sd / math.sqrt(repeats) - tol  # lower confidence bound - margin
            sel.drops[ch] = mean
            if not _try_remove(sel, kept, ch, evidence):
                continue
            mlp.remove(ch)
            base = mlp.take(params, torch.arange(j * repeats, (j + 1) * repeats, device=dev))
            base_val = losses[j * repeats:(j + 1) * repeats]
            need_control = True
            removed_at = j
            break
        if removed_at is None:
            pos += b
            batch = min(2 * batch, MLP_MAX_BATCH)
        else:  # speculate on as many candidates as were kept in a row before the removal, plus one
            pos += removed_at + 1
            discarded += b - removed_at - 1
            batch = max(1, min(removed_at + 1, MLP_MAX_BATCH))
    sel.kept = torch.nonzero(kept).flatten().cpu().tolist()
    sel.mlp = {"hidden": MLP_HIDDEN, "base_steps": MLP_BASE_STEPS, "retrain_steps": MLP_RETRAIN_STEPS,
               "repeats": repeats, "t_critical": tcrit, "pool": mlp.pool, "pool_next": mlp.pool_next,
               "inputs": int(mlp.x.shape[1]), "outputs": int(mlp.y.shape[1]), "candidate_runs": runs,
               "discarded_runs": discarded, "fits": fits}


# ---------------------------------------------------------------- the criterion

_KEYS = ("mipp_estimator", "confidence", "alpha", "gamma", "repeats", "at_init", "mlp_layers", "mipp_kernel",
         "samples")


@dataclass(frozen=True)
class MIPPOptions:
    estimator: str = "renyi"
    confidence: float = 0.95
    alpha: float = 2.0
    gamma: float = 5.0
    repeats: int = 5
    at_init: bool = False
    mlp_layers: tuple[str, ...] | None = None
    kernel: str = "median"


def parse_options(options: Mapping[str, Any] | None, layer_names: Sequence[str] | None = None) -> MIPPOptions:
    """Validate ``RankContext.options`` for mipp; bad values raise a one-line UserError.

    ``samples`` is applied by the caller and ignored here; ``mlp_layers`` (a list or a
    comma-separated string of prunable layer names) needs ``mipp_estimator=mlp``.
    """
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(_KEYS))
    if unknown:
        raise UserError(f"unknown mipp option(s) {', '.join(unknown)}; valid: {', '.join(_KEYS)}")
    d = MIPPOptions()
    get = lambda key, default: default if opts.get(key) is None else opts[key]  # noqa: E731
    estimator = _choice("mipp option mipp_estimator", get("mipp_estimator", d.estimator), ESTIMATORS)
    at_init = get("at_init", d.at_init)
    if not isinstance(at_init, bool):
        raise UserError(f"mipp option at_init must be true or false, got {at_init!r}")
    layers = opts.get("mlp_layers")
    if layers is not None:
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        if not isinstance(layers, (list, tuple)) or not all(isinstance(s, str) for s in layers):
            raise UserError(f"mipp option mlp_layers must be a list of layer names, got {opts['mlp_layers']!r}")
        if estimator != "mlp":
            raise UserError("mipp option mlp_layers needs mipp_estimator=mlp")
        if layer_names is not None:
            bad = sorted(set(layers) - set(layer_names))
            if bad:
                raise UserError(f"mipp option mlp_layers: unknown layer(s) {', '.join(bad)}; "
                                f"prunable layers: {', '.join(layer_names)}")
        layers = tuple(layers)
    return MIPPOptions(
        estimator=estimator,
        confidence=_number("mipp option confidence", get("confidence", d.confidence), 0.0, 1.0, hi_open=True),
        alpha=_number("mipp option alpha", get("alpha", d.alpha), 0.0),
        gamma=_number("mipp option gamma", get("gamma", d.gamma), 0.0),
        repeats=_integer("mipp option repeats", get("repeats", d.repeats), 2 if estimator == "mlp" else 1),
        at_init=at_init,
        mlp_layers=layers,
        kernel=_choice("mipp option mipp_kernel", get("mipp_kernel", d.kernel), KERNELS),
    )


@torch.no_grad()
def _with_sample_bn_stats(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.nn.Module:
    """A copy whose BatchNorm running statistics are estimated on ``images`` (for at-init pruning:
    the fresh statistics 0/1 are not what training-mode BN computes)."""
    from toolchain.train.engine import recalibrate_batchnorm

    model = copy.deepcopy(model)
    batches = [(images[a:a + batch_size], None) for a in range(0, images.shape[0], batch_size)]
    recalibrate_batchnorm(model, batches, images.device, images.shape[0])
    return model.eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    out = [model(images[a:a + batch_size]).float() for a in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@CRITERIA.register("mipp")
def mipp_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """Mutual-information-preserving pruning (Westphal et al., 2024); options in ``ctx.options``.

    Layers are processed from the output back to the input: the last prunable layer preserves MI
    with the logits, every other layer with the next prunable layer's post-BN-activation maps
    restricted to the channels kept there. Options: mipp_estimator (renyi | mlp), confidence
    (0.95), alpha (2.0), gamma (5.0), repeats (5), at_init (false: BN statistics are then
    estimated on the samples first), mlp_layers (layers run with mlp; the others fall back to
    renyi), mipp_kernel (paper | median), samples (applied by the caller). ``keep`` is the
    number of channels MIPP kept (at least 1); ``order`` lists the kept channels by evidence,
    then the removed ones by evidence.
    """
    t0 = time.perf_counter()
    layers = ctx.layers
    opts = parse_options(ctx.options, [layer.name for layer in layers])
    model = ctx.model.eval()
    if opts.at_init:
        model = _with_sample_bn_stats(model, ctx.images)
    capture = FeatureCapture(model, layers, ctx.images, device=ctx.device)
    x_next = _logits(model, ctx.images).to(ctx.device)
    next_name = "logits"
    out: dict[str, LayerRanking] = {}
    processed: list[str] = []
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        use = opts.estimator
        if use == "mlp" and opts.mlp_layers is not None and layer.name not in opts.mlp_layers:
            use = "renyi"
        x = capture.get(i, upcoming=range(i - 1, -1, -1))
        next_shape = [int(v) for v in x_next.shape[1:]]
        sel = select_layer(x, x_next, estimator=use, confidence=opts.confidence, alpha=opts.alpha,
                           gamma=opts.gamma, repeats=opts.repeats, seed=ctx.seed + i, device=ctx.device,
                           kernel=opts.kernel)
        kept = sel.kept or [max(range(layer.channels), key=lambda ch: sel.evidence[ch])]
        x_next = x[:, torch.as_tensor(kept, device=x.device)].clone()
        capture.release(i)
        kept_set = set(kept)
        by_evidence = sorted(range(layer.channels), key=lambda ch: (-sel.evidence[ch], ch))
        order = [ch for ch in by_evidence if ch in kept_set] + [ch for ch in by_evidence if ch not in kept_set]
        info = sel.to_info()
        info.update(estimator_requested=opts.estimator, estimator=use, fallback=use != opts.estimator,
                    at_init=opts.at_init, next=next_name, next_shape=next_shape, position=len(processed),
                    bn_stats="estimated on the rank samples" if opts.at_init else "model")
        out[layer.name] = LayerRanking(order=order, scores=[float(v) for v in sel.evidence], keep=len(kept),
                                       info=info)
        processed.append(layer.name)
        next_name = layer.name
    total = time.perf_counter() - t0
    for name in out:
        out[name].info["processing_order"] = list(processed)
        out[name].info["total_seconds"] = round(total, 3)
    return {layer.name: out[layer.name] for layer in layers}  # network order


mipp_criterion.option_names = _KEYS  # type: ignore[attr-defined]
mipp_criterion.parse_options = parse_options  # type: ignore[attr-defined]  (layer names are checked when ranking)
