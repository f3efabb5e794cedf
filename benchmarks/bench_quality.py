"""One-shot pruning quality on the shared VGG16-BN CIFAR-10 baseline: every criterion, with and
without compensation, at uniform cuts and under FLOPs budgets, no gradient step.

For each criterion the package ranks the 13 convs once (``toolchain.stages.rank.rank_channels``,
N class-balanced training images), then for each setting it cuts the network for real
(``toolchain.stages.prune.prune_model``, plain removal) and measures top-1 on the test split:

- ``none``: BN statistics re-estimated on ``--bn-images`` training images;
- ``lstsq``: consumers refitted (``toolchain.compensation.compensate``, ``--compensation-samples``
  images), then BN re-estimated the same way.

Settings: ``uniform:F`` removes the fraction F of every conv's channels; ``flops:F`` /
``params:F`` keep at most F of the prunable convs' cost, with counts from the measured
sensitivity allocator (``toolchain.allocation.allocate_for_budget``, as the prune stage calls it;
measured with the same compensation mode, kept under ``--out``/sensitivity); ``matched:flops:F`` cuts
every criterion to the keep counts the reference criterion's ``flops:F`` record chose (``--reference``,
build-edge's default criterion; same seed, mode and sensitivity grid), so the criteria are compared at
the same keep counts, as the quality goal states it; ``flops:F`` gives each criterion its own allocation.
Results go to ``--out`` as JSON (one record per run; an interrupted run resumes and skips the
records already there) and a markdown table.

    .venv/bin/python benchmarks/bench_quality.py                                   # everything (hours on 2 cores)
    .venv/bin/python benchmarks/bench_quality.py --criteria recon,l1,random --settings uniform:0.4

Criteria are ``name`` or ``name:key=value:key=value`` (criterion options), ``random`` runs
``--random-seeds`` seeds. Data: ``.data/cifar10`` (unpacked from the shared archive when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BUILD_EDGE_NO_PROGRESS", "1")

from bench_mipp import load_baseline, require_shared  # noqa: E402  (the sibling script: one way to load the data and baseline)

from toolchain.allocation import SENSITIVITY_FRACTIONS, allocate_for_budget  # noqa: E402
from toolchain.compensation import compensate  # noqa: E402
from toolchain.config import Config  # noqa: E402
from toolchain.data import DeviceLoader, balanced_indices  # noqa: E402
from toolchain.ranking import CRITERIA, load_criteria  # noqa: E402
from toolchain.ranking.base import LayerRanking, default_samples  # noqa: E402
from toolchain.ranking.cutoffs import parse_budget  # noqa: E402
from toolchain.stages.prune import (  # noqa: E402
    consumer_outputs,
    count_flops_params,
    find_prunable_layers,
    kept_indices,
    prune_model,
)
from toolchain.stages.rank import rank_channels  # noqa: E402
from toolchain.train.loop import evaluate, recalibrate_batchnorm  # noqa: E402

DEFAULT_CRITERIA = ("recon,random,l1,bn-scale,taylor,cmi:kernel=adaptive:preserve=next,cmi:kernel=adaptive,"
                    "cmi:kernel=exact,mipp")
DEFAULT_SETTINGS = "uniform:0.4,uniform:0.6,flops:0.4,flops:0.2,uniform:0.2"


def parse_criterion(spec: str) -> tuple[str, dict]:
    name, *rest = spec.split(":")
    options = {}
    for item in rest:
        key, _, value = item.partition("=")
        try:
            options[key] = float(value) if "." in value else int(value)
        except ValueError:
            options[key] = value
    return name, options


def matched_counts(results: dict, setting: str, *, reference: str, seed: int, mode: str,
                   compensation_samples: int | None, fractions: tuple) -> dict[str, int] | None:
    """The keep counts of ``matched:BUDGET``: those of the reference criterion's ``BUDGET`` record with the
    same seed, compensation and sensitivity grid (its default ranking images); None when no such record."""
    load_criteria()  # the reference's default ranking images come from its registry entry
    budget = setting.partition(":")[2]
    default_grid = tuple(SENSITIVITY_FRACTIONS)
    for r in results["runs"]:
        if (r["criterion"], r["seed"], r["setting"], r["compensation"]) != (reference, seed, budget, mode):
            continue
        if r.get("compensation_samples") != compensation_samples or r["rank_samples"] != default_samples(reference):
            continue
        if tuple(r.get("sensitivity_fractions") or default_grid) == tuple(fractions):
            return dict(r["kept_counts"])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--criteria", default=DEFAULT_CRITERIA)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--compensation", default="none,lstsq", help="comma-separated: none, lstsq")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=None, help="ranking images (default: the criterion's own)")
    ap.add_argument("--compensation-samples", type=int, default=2048,
                    help="images for the refit (the build-edge default)")
    ap.add_argument("--bn-images", type=int, default=2000)
    ap.add_argument("--test-images", type=int, default=10000, help="class-balanced test subset (10000 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sensitivity-fractions", default=",".join(map(str, SENSITIVITY_FRACTIONS)),
                    help="kept fractions a budget's sensitivity probes per layer (build-edge --sensitivity-fractions)")
    ap.add_argument("--reference", default=Config.criterion,
                    help="the criterion whose budget allocation a matched:... setting applies to every criterion")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality"))
    args = ap.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    def fitted(mode: str) -> int | None:  # compensation images of a run (None: no compensation)
        return args.compensation_samples if mode == "lstsq" else None

    fractions = tuple(float(f) for f in args.sensitivity_fractions.split(","))
    settings = args.settings.split(",")
    modes = args.compensation.split(",")
    matched = {}  # (setting, mode) -> the reference's keep counts
    for setting in (s for s in settings if s.startswith("matched:")):
        for mode in modes:
            counts = matched_counts(results, setting, reference=args.reference, seed=args.seed, mode=mode,
                                    compensation_samples=fitted(mode), fractions=fractions)
            if counts is None:
                budget = setting.partition(":")[2]
                print(f"error: {setting} needs {args.reference}'s {budget} record ({mode}, seed {args.seed}, this "
                      f"grid) in {results_path}: run --criteria {args.reference} --settings {budget} --compensation "
                      f"{mode} first", file=sys.stderr)
                sys.exit(2)
            matched[setting, mode] = counts
    out.mkdir(parents=True, exist_ok=True)

    def grid(setting: str, record_fractions=None) -> tuple | None:  # a budget's sensitivity grid (None: uniform cut)
        return None if setting.startswith("uniform") else tuple(record_fractions or SENSITIVITY_FRACTIONS)

    done = {(r["criterion"], r["seed"], r["setting"], r["compensation"], r["rank_samples"],
             r.get("compensation_samples"), grid(r["setting"], r.get("sensitivity_fractions")))
            for r in results["runs"]}

    data, test, dense = load_baseline(device, args.test_images, args.seed)
    example = torch.zeros(2, *data.input_shape, device=device)
    layers = find_prunable_layers(dense, example)
    flops_d, params_d = count_flops_params(dense, data.input_shape)
    test_loader = DeviceLoader(test, data, 500, device)
    if "dense_acc" not in results:
        results["dense_acc"] = evaluate(dense, test_loader, device)
    results.update(test_images=len(test), machine=f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    command = " ".join(["python", *sys.argv])
    if command not in results.setdefault("commands", []):  # every invocation that added runs
        results["commands"].append(command)
    fit_idx = balanced_indices(data.train.labels, args.compensation_samples, args.seed + 2)
    fit_images = data.normalize(data.train.images[fit_idx].to(device))
    probe_idx = balanced_indices(data.train.labels, 256, args.seed + 3)
    probe_images = data.normalize(data.train.images[probe_idx].to(device))
    print(f"dense {results['dense_acc']:.2%} on {len(test)} test images; {flops_d / 1e6:.1f} MFLOPs", flush=True)

    def save() -> None:
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_path)
        (out / "results.md").write_text(markdown(results))

    load_criteria()
    for spec in args.criteria.split(","):
        name, options = parse_criterion(spec)
        seeds = range(args.seed, args.seed + (args.random_seeds if name == "random" else 1))
        for seed in seeds:
            samples = args.samples or default_samples(name)
            # a criterion that cuts at the run's keep ratio (cmi's "ratio" cutoff) gets the first uniform setting's
            uniform = [1 - float(s.partition(":")[2]) for s in settings if s.startswith("uniform:")]
            keep_ratio = (uniform[0] if uniform else 0.5) if getattr(CRITERIA.get(name), "reads_keep_ratio", False) \
                else None
            todo = [(s, m) for s in settings for m in modes
                    if (spec, seed, s, m, samples, fitted(m), grid(s, fractions)) not in done
                    and not (s.startswith("matched:") and spec == args.reference)]  # its own budget record
            if not todo:
                continue
            stem = spec.replace(":", "_").replace("=", "-")
            cached = out / "rankings" / (f"{stem}-seed{seed}-n{samples}"
                                         + (f"-keep{keep_ratio:g}" if keep_ratio is not None else "") + ".json")
            if cached.exists():  # a later invocation (other settings) reuses the ranking and its time
                saved = json.loads(cached.read_text())
                rankings = {k: LayerRanking(**v) for k, v in saved["rankings"].items()}
                rank_s = saved["seconds"]
            else:
                t0 = time.perf_counter()
                rankings = rank_channels(dense, layers, data, criterion=name, options=options,
                                         samples=args.samples, seed=seed, device=device, keep_ratio=keep_ratio)
                rank_s = time.perf_counter() - t0
                cached.parent.mkdir(exist_ok=True)
                cached.write_text(json.dumps({"seconds": rank_s, "rankings": {k: r.__dict__ for k, r in
                                                                               rankings.items()}}))
            print(f"{spec} seed {seed}: ranked in {rank_s:.1f}s", flush=True)
            for setting, mode in todo:
                kind, _, value = setting.partition(":")
                t1 = time.perf_counter()
                alloc_s = None
                if kind == "uniform":
                    counts = {layer.name: max(1, round((1 - float(value)) * layer.channels)) for layer in layers}
                elif kind == "matched":
                    counts = matched[setting, mode]
                else:
                    # with compensation the sensitivity serves every budget; without, it is measured around
                    # each budget's uniform cut (toolchain.allocation), so its file names the budget
                    sens_file = out / "sensitivity" / (cached.stem + f"-{mode}"
                                                       + (f"-{kind}{value}" if mode == "none" else "") + ".json")
                    sens_file.parent.mkdir(exist_ok=True)
                    counts, info = allocate_for_budget(dense, layers, rankings, example, probe_images,
                                                       fit_images[:128], parse_budget(f"{kind}={value}"),
                                                       compensation=mode == "lstsq", seed=seed, cache=sens_file,
                                                       fractions=fractions)
                    alloc_s = None if info["sensitivity_cached"] else info["seconds"]
                kept = kept_indices(rankings, counts)
                pruned, _ = prune_model(dense, example, kept)
                pruned.to(device)
                comp_s = None
                if mode == "lstsq":
                    t2 = time.perf_counter()
                    compensate(pruned, dense, fit_images, consumer_outputs(layers, kept), seed=seed)
                    comp_s = time.perf_counter() - t2
                recalibrate_batchnorm(pruned, DeviceLoader(data.train, data, 256, device, shuffle=True,
                                                           seed=seed + 1), device, args.bn_images)
                acc = evaluate(pruned, test_loader, device)
                flops_p, params_p = count_flops_params(pruned, data.input_shape)
                run = {"criterion": spec, "seed": seed, "setting": setting, "compensation": mode, "acc": acc,
                       "flops_ratio": flops_p / flops_d, "params_ratio": params_p / params_d,
                       "kept_counts": counts, "rank_samples": samples, "compensation_samples": fitted(mode),
                       "rank_seconds": round(rank_s, 1),
                       "compensation_seconds": None if comp_s is None else round(comp_s, 1),
                       "allocation_seconds": alloc_s, "seconds": round(time.perf_counter() - t1, 1)}
                if kind != "uniform" and fractions != tuple(SENSITIVITY_FRACTIONS):
                    run["sensitivity_fractions"] = list(fractions)
                results["runs"].append(run)
                done.add((spec, seed, setting, mode, samples, fitted(mode), grid(setting, fractions)))
                save()
                print(f"  {setting:<12} {mode:<5} acc {acc:.2%}  FLOPs {flops_p / flops_d:.1%}"
                      + (f"  comp {comp_s:.0f}s" if comp_s else "") + (f"  alloc {alloc_s:.0f}s" if alloc_s else ""),
                      flush=True)
    save()


def markdown(results: dict) -> str:
    runs = results["runs"]

    def setting_order(s: str) -> tuple:
        # uniform cuts by fraction removed, then budgets from loose to tight, each followed by its matched cut
        kind, _, value = s.partition(":")
        if kind == "uniform":
            return (0, float(value), 0)
        matched = kind == "matched"
        return (1, -float(value.rpartition(":")[2]), int(matched))

    settings = sorted(dict.fromkeys(r["setting"] for r in runs), key=setting_order)
    def mode(r: dict) -> str:  # a budget's sensitivity grid other than the default is named in its column
        grid = f", {len(r['sensitivity_fractions'])} fractions" if r.get("sensitivity_fractions") else ""
        return ("none" if r["compensation"] == "none" else f"lstsq {r['compensation_samples']}") + grid

    modes = sorted(dict.fromkeys(mode(r) for r in runs), key=lambda m: (m != "none", len(m), m))
    rows = list(dict.fromkeys((r["criterion"], r["rank_samples"]) for r in runs))
    # only the columns some run fills (a budget's grid, say, is no column of the uniform cuts)
    columns = [(s, m) for s in settings for m in modes if any(r["setting"] == s and mode(r) == m for r in runs)]
    head = ["criterion", "N"] + [f"{s} {m}" for s, m in columns]
    lines = [f"Dense: {results['dense_acc']:.2%} on {results['test_images']} test images. "
             f"Top-1 after the cut, no gradient step (BN re-estimated; `lstsq M` = compensation on M images first). "
             f"N: ranking images. Budget columns give the FLOPs kept in brackets; `uniform:0.368` and "
             f"`uniform:0.553` are the uniform cuts nearest the FLOPs of `flops:0.4` and `flops:0.2` (40.0% and "
             f"20.1%), `uniform:0.3682` and `uniform:0.555` the largest within them (39.9% and 19.9%). "
             f"`matched:flops:F`: every criterion cut to the keep counts that the reference criterion's own "
             f"`flops:F` allocation chose (the same keep counts for all; the reference's own figure is its "
             f"`flops:F` column).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, n in rows:
        row = [c, str(n)]
        for s, m in columns:
            rs = [r for r in runs if (r["criterion"], r["rank_samples"]) == (c, n) and r["setting"] == s
                  and mode(r) == m]
            if not rs:
                row.append("")
                continue
            accs = " / ".join(f"{100 * r['acc']:.1f}" for r in rs)
            if not s.startswith("uniform"):
                accs += f" ({100 * rs[0]['flops_ratio']:.1f}%)"
            row.append(accs)
        lines.append("| " + " | ".join(row) + " |")
    # a row may gather several rankings (other seeds, or cmi's keep ratio): give the range, not the last one's
    rank_s: dict[tuple, list[float]] = {}
    for r in runs:
        rank_s.setdefault((r["criterion"], r["rank_samples"]), []).append(r["rank_seconds"])
    spans = {row: (min(v), max(v)) for row, v in rank_s.items()}
    seconds = [f"{c} (N={n}): {lo}" + (f"-{hi}" if hi != lo else "") + " s" for (c, n), (lo, hi) in spans.items()]
    comp = [r["compensation_seconds"] for r in runs if r["compensation_seconds"]]
    lines += ["", "Ranking seconds: " + "; ".join(seconds) + "."]
    if comp:
        lines.append(f"Compensation: {min(comp):.0f}-{max(comp):.0f} s per cut.")
    lines += ["", f"Machine: {results['machine']}. Commands (each adds its runs to the same results):", ""]
    lines += [f"    {c}" for c in results.get("commands", [])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
