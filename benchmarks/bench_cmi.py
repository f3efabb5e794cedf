"""Benchmark the CMI ranking engine on the shared VGG16-BN CIFAR-10 baseline.

Ranks all 13 conv layers per-layer (paper widths) with N class-balanced training images and
prints the time per layer and in total, for alpha = 2 (Frobenius path) and alpha = 1.01
(batched float64 eigenvalues), on the CPU and on CUDA when present.

    .venv/bin/python benchmarks/bench_cmi.py                      # alpha 2 on all layers, 1.01 sampled
    .venv/bin/python benchmarks/bench_cmi.py --alpha 2            # alpha 2 only
    .venv/bin/python benchmarks/bench_cmi.py --exact-layers all   # alpha 1.01 on every layer (hours on 2 cores)

alpha = 1.01 needs about C^2 eigen-decompositions of N x N matrices per layer. Layers not in
``--exact-layers`` get an estimate from the measured time of one batch of candidate entropies
(marked "est").

Data: ``.data/cifar10/train/<class>/*.jpg`` (unpacked from
``../shared/datasets/cifar10-jpeg.tar.gz`` when missing).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_mipp import load_data, load_dense, require_shared  # noqa: E402  (the sibling script)

from toolchain.data import balanced_indices  # noqa: E402
from toolchain.info.renyi import renyi_entropy  # noqa: E402
from toolchain.ranking.base import PrunableLayer  # noqa: E402
from toolchain.ranking.capture import FeatureCapture  # noqa: E402
from toolchain.ranking.cmi import rank_layer  # noqa: E402
from toolchain.ranking.cutoffs import (  # noqa: E402
    allocate_budget,
    budget_cost,
    full_curve,
    knee_cutoff,
    layer_costs,
    parse_budget,
    scree_cutoff,
    xmeans_cutoff,
)
from toolchain.stages.prune import find_prunable_layers  # noqa: E402


def prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """The prunable convs as the pipeline finds them (the dependency graph), with their FLOPs at 32x32."""
    return find_prunable_layers(model, torch.zeros(2, 3, 32, 32))


def load_samples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` class-balanced, normalised training images, chosen as the rank stage chooses them."""
    data = load_data()
    idx = balanced_indices(data.train.labels, n, seed)
    return data.normalize(data.train.images[idx]), data.train.labels[idx]


def estimate_exact(feats: torch.Tensor, alpha: float, device: torch.device) -> float:
    """Seconds that rank_layer would take at this alpha: time one batch of candidate entropies.

    The greedy loop evaluates sum_{k=1}^{C-1} (C-k+1) candidates with 2 entropies each; the
    batch measured is 32 Hadamard products of N x N Grams.
    """
    n, c = feats.shape[:2]
    b = min(32, c)
    x = feats[:, :b].reshape(n, b, -1).to(device, torch.float64).transpose(0, 1)
    g = torch.exp(-torch.cdist(x, x) ** 2 / 50.0)
    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.perf_counter()
    renyi_entropy(g, alpha)
    renyi_entropy(g * g[0], alpha)
    torch.cuda.synchronize() if device.type == "cuda" else None
    per_candidate = (time.perf_counter() - t0) / b
    candidates = c * (c + 1) // 2 - 1
    return per_candidate * candidates


def run(alpha: float, device: torch.device, model, layers, images, labels, exact_layers: set[int] | None,
        show_cutoffs: bool = False, kernel: str = "exact", budgets: tuple[str, ...] = ()):
    model = model.to(device)
    cap = FeatureCapture(model, layers, images.to(device), device=device)
    rows, total, estimated, t_all = [], 0.0, False, time.perf_counter()
    curves = []
    capture_s = 0.0
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        feats = cap.get(i, upcoming=range(i + 1, len(layers)))
        capture_s += time.perf_counter() - t0
        if alpha == 2.0 or exact_layers is None or i in exact_layers:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = rank_layer(feats, labels, num_classes=10, alpha=alpha, gamma=5.0, device=device, kernel=kernel)
            curves.append(full_curve(res.cmi_total, res.cmi))
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt, kind = time.perf_counter() - t0, "measured"
            extra = (f"sat@{res.saturation_step}" if res.saturated else "not saturated") + \
                f", ties {res.tie_steps}/{layer.channels - 1}, cmi0 {res.cmi_total:.4f}, top {res.order[:5]}"
            if show_cutoffs:
                curve = full_curve(res.cmi_total, res.cmi)
                extra += (f", keep scree {scree_cutoff(curve)} knee {knee_cutoff(curve)} "
                          f"xmeans {xmeans_cutoff(curve)[0]}")
        else:
            dt, kind, extra = estimate_exact(feats, alpha, device), "est", ""
            estimated = True
        cap.release(i)
        total += dt
        rows.append((layer.name, layer.channels, layer.out_hw, dt, kind, extra))
        print(f"  alpha={alpha:<5} {device.type:4} {layer.name:12} C={layer.channels:3d} "
              f"{layer.out_hw[0]:2d}x{layer.out_hw[1]:<2d} {dt:9.2f} s {kind:8} {extra}", flush=True)
    wall = time.perf_counter() - t_all
    print(f"  load average now {os.getloadavg()[0]:.1f}", flush=True)
    tag = " (includes estimates)" if estimated else ""
    print(f"  alpha={alpha} {device.type} kernel={kernel}: ranking total {total:.1f} s{tag}; feature capture "
          f"{capture_s:.1f} s ({cap.passes} forward passes); wall {wall:.1f} s", flush=True)
    for text in budgets if len(curves) == len(layers) else ():
        b = parse_budget(text)
        coupled, out_only, producer = layer_costs(layers, b.kind)
        channels = [layer.channels for layer in layers]
        keep = allocate_budget(curves, channels, coupled, out_only, producer, b.fraction)
        kept = budget_cost(keep, channels, coupled, out_only, producer)
        print(f"  budget {b}: keep {keep} (kept {b.kind} fraction {kept:.3f})", flush=True)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, nargs="+", default=[2.0, 1.01])
    ap.add_argument("--exact-layers", default="0",
                    help="layers ranked for real at alpha != 2 ('all', or comma-separated indices); others estimated")
    ap.add_argument("--devices", default="auto", help="cpu, cuda or auto (cpu, plus cuda when present)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--cutoffs", action="store_true", help="also print the scree / knee / X-means keep counts")
    ap.add_argument("--kernel", default="exact", choices=["exact", "adaptive"])
    ap.add_argument("--budget", nargs="*", default=[], help="budgets to allocate from the curves, e.g. flops=0.4")
    args = ap.parse_args()
    require_shared()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if args.devices == "cuda" or (args.devices == "auto" and torch.cuda.is_available()):
        devices = ([] if args.devices == "cuda" else devices) + [torch.device("cuda")]
    exact = None if args.exact_layers == "all" else {int(s) for s in args.exact_layers.split(",") if s}
    model = load_dense()
    layers = prunable_layers(model)
    images, labels = load_samples(args.samples, args.seed)
    print(f"VGG16-BN CIFAR-10, {len(layers)} conv layers, N={len(labels)} class-balanced "
          f"({np.bincount(labels.numpy()).tolist()}), torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, ln N = {math.log(len(labels)):.3f}",
          flush=True)
    for device in devices:
        for alpha in args.alpha:
            run(alpha, device, model, layers, images, labels.to(device), exact, args.cutoffs, args.kernel,
                tuple(args.budget))


if __name__ == "__main__":
    main()
