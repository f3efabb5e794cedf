"""MIPP, mutual-information-preserving pruning (Westphal, Hailes, Musolesi, 2024; docs/design/algorithms.md §4).

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

- ``renyi`` (fast, default): matrix-based Renyi MI (docs/design/algorithms.md §1, functions of
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
  paper widths every layer but the last three is saturated (docs/design/algorithms.md §5), every
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

from toolchain.errors import UserError
from toolchain.info.renyi import paper_sigma
from toolchain.ranking.base import CRITERIA, LayerRanking, RankContext
from toolchain.ranking.capture import FeatureCapture
from toolchain.ranking.mipp_estimators import (
    _CHUNK_ELEMS,
    MLP_BASE_STEPS,
    MLP_HIDDEN,
    MLP_MAX_BATCH,
    MLP_RETRAIN_STEPS,
    MLP_RISE_TOL,
    _as_tensor,
    _centered_channels,
    _median_scale,
    _MLPEstimator,
    _next_distances,
    _packed_distances,
    _packed_index,
    _RenyiMI,
)
from toolchain.ranking.options import check_choice, check_int, check_names, check_number, option, parse

__all__ = ["MIPPOptions", "MIPPSelection", "mipp_criterion", "parse_options", "permutation_count", "select_layer"]

ESTIMATORS = ("renyi", "mlp")
KERNELS = ("paper", "median")
DROP_TOL = 1e-9  # nats: an MI drop at or below this is "does not lower the MI"
SATURATION_TOL = 0.01  # an entropy within 1% of ln N is saturated (docs/design/algorithms.md §5)
MIN_PERMUTATIONS = 19
_RESUM_EVERY = 32  # removals between exact recomputations of the kept set's distance sum


def permutation_count(confidence: float) -> int:
    """Permutations of the renyi test at this confidence: ``max(19, ceil(2 / (1 - confidence)) - 1)``."""
    return max(MIN_PERMUTATIONS, math.ceil(2.0 / (1.0 - confidence) - 1e-9) - 1)


def _t_critical(confidence: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(confidence, df))


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
    estimator = check_choice("mipp estimator", estimator, ESTIMATORS)
    kernel = check_choice("mipp kernel", kernel, KERNELS)
    confidence = check_number("mipp confidence", confidence, 0.0, 1.0, hi_open=True)
    alpha = check_number("mipp alpha", alpha, 0.0)
    gamma = check_number("mipp gamma", gamma, 0.0)
    repeats = check_int("mipp repeats", repeats, 2 if estimator == "mlp" else 1)
    seed = check_int("mipp seed", seed, 0)
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


@dataclass(frozen=True)
class MIPPOptions:
    estimator: str = option("renyi", "MI estimator: matrix-based Renyi (fast) or the paper's MLPs",
                            key="mipp_estimator", choices=ESTIMATORS)
    confidence: float = option(0.95, "confidence of the redundancy test (higher removes more)", lo=0.0, hi=1.0,
                               hi_open=True)
    alpha: float = option(2.0, "Renyi entropy order (2 = fast Frobenius path, 1.01 = paper)", lo=0.0)
    gamma: float = option(5.0, "kernel width factor of the paper's rule", lo=0.0)
    repeats: int = option(5, "repeats of each mlp estimate (at least 2 with mlp)", lo=1)
    at_init: bool = option(False, "prune the freshly initialised model, then train it (BN statistics are "
                           "estimated on the rank samples first)")
    mlp_layers: tuple[str, ...] | None = option(
        None, "layers to run the mlp estimator on (the others use renyi); needs mipp_estimator mlp",
        parse=check_names, values="layer names, comma-separated (YAML: or a list)", default_text="all")
    kernel: str = option("median", "kernel widths of the renyi estimator: the median of the layer's distances "
                         "(scale-free) or the paper's rule", key="mipp_kernel", choices=KERNELS)

    def checked(self, given: Mapping[str, Any], layer_names: Sequence[str] | None = None) -> MIPPOptions:
        if self.estimator == "mlp":  # a t-test over the repeats needs two of them
            check_int("mipp option repeats", self.repeats, 2)
        if self.mlp_layers is not None:
            if self.estimator != "mlp":
                raise UserError("mipp option mlp_layers needs mipp_estimator=mlp")
            bad = sorted(set(self.mlp_layers) - set(layer_names)) if layer_names is not None else []
            if bad:
                raise UserError(f"mipp option mlp_layers: unknown layer(s) {', '.join(bad)}; "
                                f"prunable layers: {', '.join(layer_names)}")
        return self


def parse_options(options: Mapping[str, Any] | None, layer_names: Sequence[str] | None = None) -> MIPPOptions:
    """Validate ``RankContext.options`` for mipp; bad values raise a one-line UserError.

    ``mlp_layers`` (a list or a comma-separated string of
    prunable layer names, checked against ``layer_names`` when given) needs ``mipp_estimator=mlp``.
    """
    return parse(MIPPOptions, options, criterion="mipp", layer_names=layer_names)


@torch.no_grad()
def _with_sample_bn_stats(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.nn.Module:
    """A copy whose BatchNorm running statistics are estimated on ``images`` (for at-init pruning:
    the fresh statistics 0/1 are not what training-mode BN computes)."""
    from toolchain.train.loop import recalibrate_batchnorm

    model = copy.deepcopy(model)
    batches = [(images[a:a + batch_size], None) for a in range(0, images.shape[0], batch_size)]
    recalibrate_batchnorm(model, batches, images.device, images.shape[0])
    return model.eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    out = [model(images[a:a + batch_size]).float() for a in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@CRITERIA.register("mipp", options=MIPPOptions)
def mipp_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """Mutual-information-preserving pruning (Westphal et al., 2024); options in ``ctx.options``.

    Layers are processed from the output back to the input: the last prunable layer preserves MI
    with the logits, every other layer with the next prunable layer's post-BN-activation maps
    restricted to the channels kept there. Options: mipp_estimator (renyi | mlp), confidence
    (0.95), alpha (2.0), gamma (5.0), repeats (5), at_init (false: BN statistics are then
    estimated on the samples first), mlp_layers (layers run with mlp; the others fall back to
    renyi), mipp_kernel (paper | median). ``keep`` is the
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
