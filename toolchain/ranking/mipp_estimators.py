"""MIPP's estimators (how and why: the toolchain.ranking.mipp docstring): the matrix-based Renyi MI of
channel sets given by their summed distances (``_RenyiMI``), and the batched MLPs of the paper's
estimator (``_MLPEstimator``); with the input helpers both share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from toolchain.errors import UserError
from toolchain.info.renyi import paper_sigma, renyi_entropy, squared_distances

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


def _packed_index(pi: torch.Tensor, iu: torch.Tensor, n: int) -> torch.Tensor:
    """Packed position of the pair (pi[a], pi[b]) for every pair a < b: (B, P) for permutations (B, N)."""
    lo = torch.minimum(pi[:, iu[0]], pi[:, iu[1]])
    hi = torch.maximum(pi[:, iu[0]], pi[:, iu[1]])
    return lo * n - lo * (lo + 1) // 2 + (hi - lo - 1)


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

