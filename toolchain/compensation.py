"""Compensation: refit the layers that consume removed channels so the pruned net tracks the dense one.

Removing a channel takes away part of every consumer's input. The consumer's remaining weights
were trained with that input present, so its output drifts, and the drift compounds layer after
layer. Most of what a removed channel carried is still linearly predictable from the channels
that stay (channels of one layer are strongly correlated), so a least-squares refit of each
consumer recovers most of it (He et al. 2017, "Channel pruning"; ThiNet 2017). Measured on the
shared VGG16 baseline (docs/design/algorithms.md §3) it lifts one-shot accuracy far more than the
choice of channels does.

What is fitted, per consumer (conv or linear) whose inputs shrank, in network order:

- inputs: the consumer's input in the *pruned* network, with every earlier consumer already
  refitted, so the refit also corrects the errors of all earlier cuts;
- target: the *dense* network's pre-activation output of the same module (only the output
  channels the pruned module still has);
- samples: positions of a class-balanced set of training images (a seeded random subset of the
  output positions of each image, all of them for small maps), as im2col patches;
- solution: ridge regression ``min ||X W^T + b - Y||^2 + lam ||W - W0||^2`` in float64, with
  ``W0`` the consumer's current weights (the dense weights of the kept inputs) and ``lam``
  relative to the mean diagonal of ``X^T X``. Shrinking towards ``W0`` rather than towards
  zero matters in late layers: a 2x2 map gives 4 positions per image for up to 512*9 unknowns,
  and there the data alone cannot pin the weights down. The bias is not regularised.

Memory stays bounded: only ``X^T X`` (d x d), ``X^T Y`` and the sampled targets are held; the
patches are accumulated batch by batch. Grouped convolutions are solved group by group.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CompensationReport", "augmented_view", "compensate", "consumer_order", "module_inputs", "patch_rows",
           "take_positions", "views_needed"]


class _Stop(Exception):
    """Ends a forward pass once the hooked module has been reached."""


@dataclass
class CompensationReport:
    consumers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> errors, sizes
    bias_added: list[str] = field(default_factory=list)  # consumers that had no bias before
    images: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "seconds": round(self.seconds, 2), "consumers": self.consumers,
                "bias_added": self.bias_added}


def consumer_order(model: nn.Module, example: torch.Tensor, names: set[str]) -> list[str]:
    """The modules of ``names`` in the order a forward pass reaches them (an eval-mode pass on one image; every
    module's training flag is put back as it was)."""
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
               for n in names]
    modes = {m: m.training for m in modules.values()}
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return order


def module_inputs(model: nn.Module, modules: dict[str, nn.Module], names: list[str], x: torch.Tensor
            ) -> dict[str, torch.Tensor]:
    """The inputs of the named modules in one forward pass."""
    got: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: got.__setitem__(n, a[0])) for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def _run_until(model: nn.Module, module: nn.Module, x: torch.Tensor, *, want: str) -> torch.Tensor:
    """The input (``want="input"``) or output of ``module`` when ``model`` runs on ``x``."""
    got: list[torch.Tensor] = []

    def pre(_m, args):
        if want == "input":
            got.append(args[0])
            raise _Stop

    def post(_m, _args, out):
        got.append(out)
        raise _Stop

    h = module.register_forward_pre_hook(pre) if want == "input" else module.register_forward_hook(post)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError("the forward pass never reached the module to compensate")
    return got[0]


def patch_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, d, L) rows the module multiplies by its weights: im2col for a conv, the vector for a linear."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, 1)
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


def _outputs(y: torch.Tensor) -> torch.Tensor:
    """(B, C_out, L) pre-activation outputs (bias included: it is refitted too)."""
    return y.reshape(y.shape[0], y.shape[1], -1)


def take_positions(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows (B * k, C) of ``t`` (B, C, L) at positions ``idx`` (B, k)."""
    rows = torch.gather(t, 2, idx[:, None, :].expand(-1, t.shape[1], -1))
    return rows.transpose(1, 2).reshape(-1, t.shape[1])


def augmented_view(images: torch.Tensor, view: int, *, pad: int = 4) -> torch.Tensor:
    """View 0: the images; 1: mirrored; from 2 on: a seeded shift by up to ``pad`` pixels (zero
    padding, the training augmentation), mirrored every other view. More views give more rows
    for consumers of small maps (a 2x2 map gives 4 positions per image)."""
    if view == 0:
        return images
    x = images.flip(-1) if view % 2 else images
    if view < 2:
        return x
    g = torch.Generator().manual_seed(view)
    dy, dx = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=g))
    h, w = x.shape[-2:]
    x = F.pad(x, (pad, pad, pad, pad))
    return x[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def views_needed(rows_per_view: int, unknowns: int, *, rows_per_unknown: float, max_views: int) -> int:
    """Views so that the fit sees about ``rows_per_unknown`` rows per unknown (at most ``max_views``)."""
    want = math.ceil(rows_per_unknown * unknowns / max(rows_per_view, 1))
    return max(1, min(max_views, want))


class _Accumulator:
    """X^T X and X^T Y per group (float64), plus the bias column, over sampled positions."""

    def __init__(self, groups: int, d: int, out: int, device: torch.device):
        f64 = torch.float64
        self.groups, self.d, self.out = groups, d, out
        self.xtx = torch.zeros(groups, d + 1, d + 1, dtype=f64, device=device)
        self.xty = torch.zeros(groups, d + 1, out // groups, dtype=f64, device=device)
        self.yty = torch.zeros(groups, out // groups, dtype=f64, device=device)
        self.ysum = torch.zeros(groups, out // groups, dtype=f64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: (M, groups * d) patches, y: (M, out) targets."""
        m = x.shape[0]
        ones = torch.ones(m, 1, dtype=torch.float64, device=x.device)
        for g in range(self.groups):
            xg = torch.cat([x[:, g * self.d:(g + 1) * self.d].double(), ones], 1)
            yg = y[:, g * (self.out // self.groups):(g + 1) * (self.out // self.groups)].double()
            self.xtx[g] += xg.T @ xg
            self.xty[g] += xg.T @ yg
            self.yty[g] += (yg * yg).sum(0)
            self.ysum[g] += yg.sum(0)
        self.rows += m

    def residual(self, w: torch.Tensor) -> float:
        """Relative squared error of weights ``w`` (groups, d + 1, out/groups) on the samples:
        ``||X w - Y||^2 / ||Y - mean(Y)||^2`` from the accumulated moments."""
        err = (self.yty - 2 * (w * self.xty).sum(1) + (w * (self.xtx @ w)).sum(1)).sum()
        var = (self.yty - self.ysum ** 2 / max(self.rows, 1)).sum()
        return float(err / var.clamp_min(1e-300))

    def solve(self, w0: torch.Tensor, ridge: float) -> torch.Tensor:
        """Ridge solution shrunk towards ``w0`` (bias row unregularised)."""
        d = self.d
        out = torch.empty_like(w0)
        for g in range(self.groups):
            a = self.xtx[g].clone()
            lam = ridge * float(a.diagonal()[:d].mean().clamp_min(1e-12))
            a.diagonal()[:d] += lam
            b = self.xty[g].clone()
            b[:d] += lam * w0[g, :d]
            out[g] = torch.linalg.solve(a, b)
        return out


def _weights_as_rows(module: nn.Module) -> torch.Tensor:
    """(groups, d + 1, out/groups): the weights with the bias as the last row (0 without a bias)."""
    w = module.weight.detach().double()
    groups = getattr(module, "groups", 1)
    out = w.shape[0]
    w = w.reshape(groups, out // groups, -1).transpose(1, 2)  # (g, d, out/g)
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(out, dtype=torch.float64,
                                                                                     device=w.device)
    return torch.cat([w, b.reshape(groups, 1, out // groups)], 1)


def _write_rows(module: nn.Module, rows: torch.Tensor) -> None:
    out = module.weight.shape[0]
    w = rows[:, :-1].transpose(1, 2).reshape(module.weight.shape)
    with torch.no_grad():
        module.weight.copy_(w.to(module.weight.dtype))
        bias = rows[:, -1].reshape(out).to(module.weight.dtype)
        if module.bias is None:
            module.bias = nn.Parameter(bias.clone())
        else:
            module.bias.copy_(bias)


@torch.no_grad()
def _dense_targets(dense: nn.Module, order: list[str], consumers: dict[str, list[int] | None], images: torch.Tensor,
                   views: dict[str, int], picks: dict[tuple, torch.Tensor], batches: list[tuple[int, int]],
                   cache: dict[tuple, torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """The dense outputs each consumer is refitted towards, at its sampled positions, per view and batch:
    one dense pass per view and batch for the consumers that use the view and have no target in `cache`,
    stopped once they all have theirs."""
    d_mods = dict(dense.named_modules())

    def target_key(name: str, v: int, a: int, b: int) -> tuple:
        kept = consumers[name]
        return name, v, a, b, None if kept is None else tuple(kept), picks[(name, v)][a:b].numpy().tobytes()

    where: list[tuple[int, int, int]] = []
    wanted: set[str] = set()

    def keep_target(name: str, out: torch.Tensor) -> None:
        a, b, v = where[0]
        if name in wanted:
            y = _outputs(out)
            if consumers[name] is not None:
                y = y[:, torch.as_tensor(consumers[name], device=y.device)]
            cache[target_key(name, v, a, b)] = take_positions(y, picks[(name, v)][a:b].to(y.device)).float()
            wanted.discard(name)
        if not wanted:  # every consumer has its target: the rest of the dense pass is not needed
            raise _Stop

    handles = [d_mods[n].register_forward_hook(lambda _m, _a, out, n=n: keep_target(n, out)) for n in order]
    try:
        for v in range(max(views.values(), default=0)):
            for a, b in batches:
                where[:] = [(a, b, v)]
                wanted.clear()
                wanted.update(n for n in order if v < views[n] and target_key(n, v, a, b) not in cache)
                if wanted:
                    with contextlib.suppress(_Stop):
                        dense(augmented_view(images[a:b], v))
    finally:
        for h in handles:
            h.remove()
    return {(n, v): [cache[target_key(n, v, a, b)] for a, b in batches] for n, v in picks}


@torch.no_grad()  # a least-squares refit: no graph through the forward passes it accumulates moments from
def compensate(pruned: nn.Module, dense: nn.Module, images: torch.Tensor, consumers: dict[str, list[int] | None], *,
               ridge: float = 1e-2, positions_per_image: int = 64, rows_per_unknown: float = 1.0,
               max_views: int = 12, batch_size: int = 128, seed: int = 0,
               dense_targets: dict[tuple, torch.Tensor] | None = None) -> CompensationReport:
    """Refit ``consumers`` of ``pruned`` in place so their outputs match ``dense``'s (module docstring).

    ``consumers``: module name (the same in both models) -> the dense output channels the pruned
    module keeps (None: all). ``images``: normalised training images on the models' device.
    Consumers of small maps see augmented views of the images as well (``augmented_view``)
    until they have about ``rows_per_unknown`` rows per unknown, at most ``max_views`` views.
    Returns per consumer the relative reconstruction error on the fitting samples before and
    after the refit, the number of samples and of unknowns. A consumer that had no bias gets one.
    ``dense_targets``: a dict kept by a caller that refits cuts of the same layer again and again with the
    same ``dense`` and ``images`` (the allocator's sensitivity probes): the dense outputs go in once and are
    read back by the later calls that need the same sampled positions, instead of a dense pass each time.
    """
    t0 = time.perf_counter()
    pruned.eval()
    dense.eval()
    order = consumer_order(pruned, images[:1], set(consumers))
    p_mods = dict(pruned.named_modules())
    probe = module_inputs(pruned, p_mods, order, images[:1])
    lengths = {n: patch_rows(p_mods[n], x).shape[-1] for n, x in probe.items()}
    views = {n: views_needed(len(images) * min(lengths[n], positions_per_image), p_mods[n].weight[0].numel() + 1,
                             rows_per_unknown=rows_per_unknown, max_views=max_views) for n in order}
    gen = torch.Generator().manual_seed(seed)
    picks = {(n, v): torch.stack([torch.randperm(lengths[n], generator=gen)[:positions_per_image]
                                  for _ in range(len(images))]) for n in order for v in range(views[n])}
    batches = [(a, min(a + batch_size, len(images))) for a in range(0, len(images), batch_size)]
    cache: dict[tuple, torch.Tensor] = {} if dense_targets is None else dense_targets
    targets = _dense_targets(dense, order, consumers, images, views, picks, batches, cache)
    if dense_targets is None:
        cache.clear()
    report = CompensationReport(images=len(images))
    for name in order:
        pm = p_mods[name]
        acc = _Accumulator(getattr(pm, "groups", 1), pm.weight[0].numel(), pm.weight.shape[0], images.device)
        for v in range(views[name]):
            for (a, b), ys in zip(batches, targets.pop((name, v))):
                x = patch_rows(pm, _run_until(pruned, pm, augmented_view(images[a:b], v), want="input"))
                acc.add(take_positions(x, picks[(name, v)][a:b].to(x.device)), ys)
        w0 = _weights_as_rows(pm)
        before = acc.residual(w0)
        w = acc.solve(w0, ridge)
        after = acc.residual(w)
        if pm.bias is None:
            report.bias_added.append(name)
        _write_rows(pm, w)
        report.consumers[name] = {"error_before": before, "error_after": after, "samples": acc.rows,
                                  "unknowns": pm.weight[0].numel() + 1, "views": views[name]}
    report.seconds = time.perf_counter() - t0
    return report
