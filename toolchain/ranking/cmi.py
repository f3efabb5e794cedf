"""CMI ranking (Vu-Van et al., 2024): greedy channel selection by matrix-based Renyi (conditional) MI.

``rank_layer`` ranks the channels of one layer (docs/design/algorithms.md §2); the ``cmi`` criterion
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

The code: ``cmi_layer`` (``rank_layer``, ``CMIRanking``: one layer), ``cmi_estimators`` (the exact
and adaptive kernels); this module holds the criterion over a network and its options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from toolchain.errors import UserError
from toolchain.ranking.base import CRITERIA, LayerRanking, RankContext
from toolchain.ranking.capture import FeatureCapture
from toolchain.ranking.cmi_estimators import KERNELS, TIE_TOL
from toolchain.ranking.cmi_layer import SATURATION_TOL, CMIRanking, rank_layer
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
from toolchain.ranking.options import option, parse

# rank_layer and its constants live in cmi_layer / cmi_estimators and are importable from here too
__all__ = ["KERNELS", "SATURATION_TOL", "TIE_TOL", "CMIOptions", "CMIRanking", "cmi_criterion", "parse_options",
           "rank_layer"]

FORMULATIONS = ("per-layer", "compact", "full")
ORDERS = ("forward", "bidirectional")
CUTOFFS = ("scree", "xmeans", "permutation", "knee", "ratio")
PRESERVES = ("labels", "next")


def _budget(name: str, value: Any) -> Budget | None:
    budget = parse_budget(value)  # its UserError names the budget and the accepted forms
    if budget is not None and budget.kind == "latency":
        raise UserError("the cmi option budget takes flops, params or channels; for latency use --budget latency=...")
    return budget


@dataclass(frozen=True)
class CMIOptions:
    """Defaults: the CMI variant that measured best one-shot on the shared VGG16 (docs/QUALITY.md):
    adaptive kernels preserving the next layer's response, cut at the run's keep ratio (or budget).
    Without compensation it leads the paper's mode by 9-19 points; with it the two are within 0.35
    points except at 60% removal, where the paper's mode leads by 1.3. ``kernel="exact"`` (which
    preserves the labels unless told otherwise) with a paper cutoff (scree, xmeans, permutation)
    is the paper-faithful mode."""

    formulation: str = option(
        "per-layer", "what each layer is conditioned on: nothing (per-layer), the kept maps of the previously "
        "pruned layer (compact) or of all previously pruned layers (full)", choices=FORMULATIONS)
    order: str = option(
        "forward", "layer order: the network's, or from the most pruned layer towards both ends (bidirectional)",
        choices=ORDERS)
    cutoff: str = option("ratio", "per-layer cutoff on the CMI curve (ratio: the option keep_ratio, else the "
                         "run's --keep-ratio)", choices=CUTOFFS)
    budget: Budget | None = option(
        None, "keep at most that fraction of the prunable convs' FLOPs, parameters or filters, allocated over the "
        "layers' CMI curves (overrides the cutoff)", flag=False, parse=_budget,
        values="`flops=F`, `params=F` or `channels=F`")
    alpha: float = option(2.0, "Renyi entropy order (2 = fast Frobenius path, 1.01 = paper)", lo=0.0)
    gamma: float = option(5.0, "kernel width factor of the paper's rule", lo=0.0)
    permutations: int = option(100, "permutations of the stopping test (cutoff permutation)", lo=1)
    eta: float = option(0.05, "significance of the permutation stopping test", lo=0.0, hi=1.0)
    keep_ratio: float | None = option(None, "kept fraction of each layer for cutoff ratio", flag=False, lo=0.0,
                                      hi=1.0, default_text="the run's `--keep-ratio`")
    kernel: str = option(
        "adaptive", "exact (the paper's kernel widths, ties to the lowest index) or adaptive (median widths, "
        "no saturation; ties by single-channel MI)", choices=KERNELS)
    preserve: str = option(
        "next", "what the selection preserves: the labels (the papers') or the next layer's response (adaptive "
        "kernel)", choices=PRESERVES, default_text="`next` (`labels` with `kernel: exact`)")

    def checked(self, given: Mapping[str, Any]) -> CMIOptions:
        # the exact (paper) kernel preserves the labels unless told otherwise; next needs the adaptive one
        if given.get("preserve") is None and self.kernel == "exact":
            return dataclasses.replace(self, preserve="labels")
        if self.preserve == "next" and self.kernel != "adaptive":
            raise UserError("cmi option preserve=next needs kernel=adaptive (the exact kernel preserves the labels)")
        return self


def parse_options(options: Mapping[str, Any] | None) -> CMIOptions:
    """Validate ``RankContext.options`` for the cmi criterion; bad values raise a one-line UserError."""
    return parse(CMIOptions, options, criterion="cmi")


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
        if any(layer.members for layer in layers):  # its curves have no cost model for the groups' other convs
            raise UserError("the cmi option budget does not allocate over channel groups cut across several convs; "
                            "use --budget")
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


@CRITERIA.register("cmi", options=CMIOptions)
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
    widths and ties to the lowest index; adaptive: median widths, ties by single-channel MI).
    """
    return _Engine(ctx, parse_options(ctx.options)).run()


cmi_criterion.reads_keep_ratio = True  # type: ignore[attr-defined]  (cutoff "ratio": part of the rank key)
