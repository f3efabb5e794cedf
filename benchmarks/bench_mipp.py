"""Benchmark the MIPP criterion on the shared VGG16-BN CIFAR-10 baseline.

For each requested MIPP variant (estimator, kernel) the script ranks all 13 conv layers from the
output back to the input with N class-balanced training images, prunes the model for real
(``toolchain.stages.prune.prune_model``) with MIPP's own per-layer counts, and prints the kept
counts, params/FLOPs, the test accuracy before fine-tuning (raw and after BatchNorm statistics
are re-estimated on training images) and the ranking time. For reference it prunes the same
per-layer counts with L1 and with a seeded random choice (same budget, BN re-estimated).

    .venv/bin/python benchmarks/bench_mipp.py                                  # renyi (paper and median kernels) + mlp
    .venv/bin/python benchmarks/bench_mipp.py --variants renyi:median --test-images 10000
    .venv/bin/python benchmarks/bench_mipp.py --variants mlp:median --mlp-layers all   # slow on a CPU

Variants are ``estimator:kernel``; the kernel is the matrix-based estimator's (for ``mlp`` it
only sets the visit order and the layers outside ``--mlp-layers``, which fall back to renyi).
Data: ``.data/cifar10/{train,test}/<class>/*.jpg`` (unpacked from
``../shared/datasets/cifar10-jpeg.tar.gz`` when missing), decoded once into ``.data/cache``.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BUILD_EDGE_NO_PROGRESS", "1")

from toolchain.cost import count_flops_params  # noqa: E402
from toolchain.data import DeviceLoader, balanced_indices, load_dataset  # noqa: E402
from toolchain.models import create_model  # noqa: E402
from toolchain.ranking.base import CRITERIA, RankContext  # noqa: E402
from toolchain.ranking.mipp import mipp_criterion  # noqa: E402,F401  (registers "mipp")
from toolchain.stages.prune import find_prunable_layers, prune_model  # noqa: E402
from toolchain.train.loop import evaluate, recalibrate_batchnorm  # noqa: E402

SHARED = ROOT.parent / "shared"
CHECKPOINT = SHARED / "models" / "vgg16_bn_cifar10.pt"
ARCHIVE = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
DATA = ROOT / ".data" / "cifar10"  # where the archive is unpacked
DEFAULT_MLP_LAYERS = "features.0,features.3,features.37,features.40"


def require_shared() -> None:
    """One line on stderr and exit code 2, before any work, when the shared baseline or the CIFAR-10 copy
    (unpacked under .data, or the archive to unpack) is missing beside the checkout."""
    need = [CHECKPOINT]
    if not (DATA / "test").is_dir():
        need.append(ARCHIVE)
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        print(f"{Path(sys.argv[0]).name}: missing {', '.join(missing)} (the shared material beside the checkout)",
              file=sys.stderr)
        sys.exit(2)


def load_data():
    if not (DATA / "test").is_dir():
        DATA.parent.mkdir(exist_ok=True)
        subprocess.run(["tar", "xzf", str(ARCHIVE), "-C", str(DATA.parent)], check=True)
    return load_dataset("imagefolder", str(DATA), cache_dir=DATA.parent / "cache", normalization="cifar10")


def load_baseline(device: torch.device, test_images: int, seed: int):
    """The shared CIFAR-10 copy, its class-balanced test subset (all of it at >= 10,000) and the shared
    VGG16-BN baseline in eval mode on `device`."""
    data = load_data()
    test = data.test if test_images >= len(data.test) else data.test.subset(
        balanced_indices(data.test.labels, test_images, seed))
    return data, test, load_dense().to(device)


def load_dense() -> torch.nn.Module:
    """The shared VGG16-BN baseline, in eval mode on the CPU."""
    dense = create_model("vgg16_bn", num_classes=10)
    dense.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return dense.eval()


def accuracy(model, data, test_split, device) -> float:
    return evaluate(model, DeviceLoader(test_split, data, 250, device), device)


def bn_accuracy(model, data, test_split, device, bn_images: int, seed: int) -> float:
    probe = DeviceLoader(data.train, data, 250, device, shuffle=True, seed=seed + 1)
    recalibrate_batchnorm(model, probe, device, bn_images)
    return accuracy(model, data, test_split, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="renyi:paper,renyi:median,mlp:median")
    ap.add_argument("--mlp-layers", default=DEFAULT_MLP_LAYERS, help="comma-separated, or 'all'")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--test-images", type=int, default=2000, help="class-balanced test subset (10000 = all)")
    ap.add_argument("--bn-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-reference", action="store_true", help="skip the L1/random comparisons")
    args = ap.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.perf_counter()
    data, test, dense = load_baseline(device, args.test_images, args.seed)
    example = torch.zeros(1, *data.input_shape, device=device)
    layers = find_prunable_layers(dense, example)
    flops_d, params_d = count_flops_params(dense, data.input_shape)
    acc_d = accuracy(dense, data, test, device)
    idx = balanced_indices(data.train.labels, args.samples, args.seed)
    images = data.normalize(data.train.images[idx].to(device))
    labels = data.train.labels[idx].to(device)
    print(f"device {device}, {args.threads} threads; data {time.perf_counter() - t0:.0f}s; N = {len(idx)} "
          f"class-balanced training images; test subset {len(test)} images (class-balanced); "
          f"BN re-estimated on {args.bn_images} training images")
    acc_d_bn = bn_accuracy(copy.deepcopy(dense), data, test, device, args.bn_images, args.seed)
    print(f"dense: {params_d / 1e6:.2f} M params, {flops_d / 1e6:.1f} MFLOPs, test acc {acc_d:.2%} "
          f"({acc_d_bn:.2%} after BN re-estimation)")

    for variant in args.variants.split(","):
        estimator, _, kernel = variant.partition(":")
        kernel = kernel or "median"
        options = {"mipp_estimator": estimator, "mipp_kernel": kernel, "confidence": args.confidence}
        if estimator == "mlp" and args.mlp_layers != "all":
            options["mlp_layers"] = args.mlp_layers
        ctx = RankContext(model=dense, layers=layers, images=images, labels=labels, num_classes=10, device=device,
                          options=options, seed=args.seed)
        t1 = time.perf_counter()
        rankings = CRITERIA.get("mipp")(ctx)
        rank_s = time.perf_counter() - t1
        kept = {name: sorted(r.order[:r.keep]) for name, r in rankings.items()}
        pruned, _ = prune_model(dense, example, kept)
        flops_p, params_p = count_flops_params(pruned, data.input_shape)
        acc_raw = accuracy(pruned, data, test, device)
        acc_bn = bn_accuracy(pruned, data, test, device, args.bn_images, args.seed)
        mlp_on = [n for n, r in rankings.items() if r.info["estimator"] == "mlp"]
        print(f"\n== MIPP estimator={estimator} kernel={kernel} confidence={args.confidence}"
              + (f" (mlp on {', '.join(mlp_on)}; renyi elsewhere)" if estimator == "mlp" else ""))
        print(f"{'layer':<12} {'est':<5} {'kept':>9} {'seconds':>8}  saturated(layer,next)")
        for layer in layers:
            r = rankings[layer.name]
            sat = r.info["saturated"]
            print(f"{layer.name:<12} {r.info['estimator']:<5} {r.keep:>4}/{layer.channels:<4} "
                  f"{r.info['seconds']:>8.1f}  {int(sat['layer'])},{int(sat['next'])}")
        print(f"channels kept {sum(len(k) for k in kept.values())}/{sum(layer.channels for layer in layers)}; "
              f"params {params_p / 1e6:.2f} M ({params_p / params_d:.1%}); "
              f"FLOPs {flops_p / 1e6:.1f} M ({flops_p / flops_d:.1%}); ranking time {rank_s:.0f}s")
        print(f"test acc before fine-tuning: {acc_raw:.2%} raw, {acc_bn:.2%} after BN re-estimation")
        if not args.no_reference:
            refs = {}
            g = torch.Generator().manual_seed(args.seed)
            for ref in ("l1", "random"):
                ref_kept = {}
                for layer in layers:
                    k = len(kept[layer.name])
                    if ref == "l1":
                        score = layer.conv.weight.detach().abs().flatten(1).sum(1).cpu()
                        ref_kept[layer.name] = sorted(torch.argsort(-score, stable=True)[:k].tolist())
                    else:
                        ref_kept[layer.name] = sorted(torch.randperm(layer.channels, generator=g)[:k].tolist())
                ref_model, _ = prune_model(dense, example, ref_kept)
                refs[ref] = bn_accuracy(ref_model, data, test, device, args.bn_images, args.seed)
            print(f"same per-layer counts, BN re-estimated: L1 {refs['l1']:.2%}, random {refs['random']:.2%}")
        sys.stdout.flush()
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
