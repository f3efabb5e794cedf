"""The pipeline, top to bottom: config -> data -> baseline -> rank -> prune -> finetune -> export
-> bench -> bundle.

Each stage writes its outputs under ``<out>/.work/<stage>-<key>/`` where the key hashes the config
fields the stage reads and the keys of the stages before it, so runs that agree on a stage (the
runs of a sweep over criteria share data, baseline and more) compute it once. A finished stage leaves
``done.json``; re-running skips it. A killed stage resumes from what it left (fine-tuning and
baseline training keep a checkpoint per epoch). The bundle is assembled in a temporary folder
and renamed into place, so a reader never sees half a bundle.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolchain import kit
from toolchain.allocation import allocate_for_budget
from toolchain.compensation import compensate
from toolchain.config import OPSET_DEFAULT, Config
from toolchain.errors import UserError
from toolchain.models import MODELS, create_model
from toolchain.ranking import CRITERIA, LayerRanking, load_criteria
from toolchain.ranking.base import check_options, default_samples
from toolchain.ranking.cutoffs import parse_budget
from toolchain.stages import baseline as baseline_stage
from toolchain.stages import bench as bench_stage
from toolchain.stages import bundle as bundle_stage
from toolchain.stages import engine as engine_stage
from toolchain.stages import export as export_stage
from toolchain.stages import finetune as finetune_stage
from toolchain.stages import prune as prune_stage
from toolchain.stages import quantize as quantize_stage
from toolchain.stages import rank as rank_stage
from toolchain.stages.data import SOURCES as DATA_SOURCES
from toolchain.stages.data import DeviceLoader, balanced_indices, count_classes, load_dataset
from toolchain.targets import TargetProfile, load_target
from toolchain.train import distributed as dist_utils
from toolchain.train.engine import Recipe, evaluate, recalibrate_batchnorm
from toolchain.util import (
    atomic_torch_save,
    atomic_write_json,
    out_lock,
    resolve_device,
    sha256_file,
    stable_hash,
)

log = logging.getLogger("build_edge")
RESUME_CHECKPOINT = "last.pt"  # a training stage's per-epoch checkpoint (toolchain.train.engine.fit)


class StageCache:
    """Runs a stage once per key; its folder holds its outputs and, when finished, done.json."""

    def __init__(self, root: Path):
        self.root = root

    def run(self, name: str, key: dict[str, Any], fn: Callable[[Path], dict[str, Any]], *,
            all_ranks: bool = False) -> tuple[Path, str, dict]:
        """Under torchrun, rank 0 alone runs a stage unless `all_ranks` (training stages); the others
        wait and read its result. Only rank 0 writes done.json."""
        digest = stable_hash({"stage": name, **key})
        folder = self.root / f"{name}-{digest}"
        done = folder / "done.json"
        if done.exists():
            log.info("stage %-8s cached  (%s)", name, folder.name)
            return folder, digest, json.loads(done.read_text())
        result: dict[str, Any] = {}
        if all_ranks or dist_utils.is_main():
            if dist_utils.is_main():
                folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            log.info("stage %-8s running (%s)", name, folder.name)
            result = fn(folder)
            result["seconds"] = round(time.perf_counter() - started, 2)
            if dist_utils.is_main():
                atomic_write_json(done, result)
                (folder / RESUME_CHECKPOINT).unlink(missing_ok=True)  # only a killed stage needs it
            log.info("stage %-8s done in %.1fs", name, result["seconds"])
        dist_utils.barrier()
        if not dist_utils.is_main():
            result = json.loads(done.read_text())
        return folder, digest, result


@dataclass
class Preflight:
    target: TargetProfile
    precision: str
    device: torch.device
    checkpoint: dict[str, torch.Tensor] | None
    num_classes: int
    opset: int  # the ONNX opset to export: --opset, or the default within the target's limit


def preflight(cfg: Config) -> Preflight:
    """Every check on user input that can fail, before anything is written."""
    target = load_target(cfg.target)
    precision = cfg.precision or target.default_precision
    if precision not in target.precisions:
        raise UserError(f"target {target.name} does not support {precision}; it supports "
                        f"{', '.join(target.precisions)}")
    limit = target.max_onnx_opset
    if cfg.opset is not None and limit is not None and cfg.opset > limit:
        raise UserError(f"opset {cfg.opset} is above what {target.name}'s TensorRT {target.tensorrt_version or ''} "
                        f"parses (up to {limit}); use --opset {limit} or leave it out")
    opset = cfg.opset or min(OPSET_DEFAULT, limit or OPSET_DEFAULT)
    load_criteria()
    check_options(cfg.criterion, cfg.criterion_options)
    MODELS.get(cfg.model)
    DATA_SOURCES.get(cfg.dataset)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is not a folder")
    bundle_stage.check_destination(out / cfg.resolved_run_name)
    if cfg.dataset == "imagefolder" and cfg.data_dir and not Path(cfg.data_dir).exists():
        raise UserError(f"data dir {cfg.data_dir} does not exist")
    num_classes = count_classes(cfg.dataset, cfg.data_dir)
    if num_classes == 0:
        raise UserError(f"{cfg.data_dir}/train has no class folders")
    state = None
    if cfg.checkpoint:
        state = baseline_stage.read_checkpoint(cfg.checkpoint, cfg.model, num_classes)
    model = create_model(cfg.model, num_classes=num_classes).eval()
    example = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as e:
        raise UserError(f"image_size {cfg.image_size} does not fit {cfg.model}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if cfg.keep:  # per-layer names must name prunable layers: check now, not after training
        names = {layer.name for layer in prune_stage.find_prunable_layers(model, example)}
        unknown = sorted(set(cfg.keep) - names)
        if unknown:
            raise UserError(f"keep: unknown layer(s) {', '.join(unknown)}; prunable layers of {cfg.model}: "
                            f"{', '.join(sorted(names))}")
    return Preflight(target, precision, device, state, num_classes, opset)


def run_pipeline(cfg: Config, pre: Preflight | None = None) -> Path:
    """Run every stage (or reuse its cached result) and return the bundle folder.

    One run at a time per --out (``util.out_lock``); under the lock, what a killed run left (half
    bundles, temporary files) is removed first.
    """
    pre = pre or preflight(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 holds the lock for all
        with out_lock(Path(cfg.out)):
            remove_leftovers(Path(cfg.out))
            return _run(cfg, pre)
    return _run(cfg, pre)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _remove(path: Path) -> tuple[Path, int]:
    size = _size(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return path, size


def remove_leftovers(out: Path) -> list[tuple[Path, int]]:
    """Half-written bundles (``.NAME.partial-*``, ``.NAME.old-*``) and temp files (``.*.tmp``) a killed run left.

    Only names build-edge itself gives its temporary files are matched; call it under ``out_lock``.
    Returns (path, bytes) of what went.
    """
    found = [p for pattern in (".*.partial-*", ".*.old-*") for p in out.glob(pattern) if p.is_dir()]
    found += [p for root in (out / ".work", out / ".cache") if root.is_dir() for p in root.rglob(".*.tmp")
              if p.is_file()]
    return [_remove(p) for p in found]


def clean(out: Path, *, keep_cache: bool = False) -> list[tuple[Path, int]]:
    """``build-edge clean``: remove the stage folders under ``out/.work`` that no bundle in ``out`` refers to
    (its manifest's ``stages``), what killed runs left (``remove_leftovers``) and, unless ``keep_cache``,
    the decoded-data cache ``out/.cache``. Bundles and anything else in ``out`` stay. Returns (path, bytes)."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"--out {out} does not exist or is not a folder")
    with out_lock(out):
        removed = remove_leftovers(out)
        used: set[str] = set()
        for manifest in out.glob("*/manifest.json"):
            try:
                info = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and info.get("tool") == "build-edge":
                used.update(str(v) for v in (info.get("stages") or {}).values())
        work = out / ".work"
        unused = [p for p in sorted(work.iterdir()) if p.is_dir() and p.name not in used] if work.is_dir() else []
        if not keep_cache and (out / ".cache").is_dir():
            unused.append(out / ".cache")
        removed += [_remove(p) for p in unused]
    return removed


def _run(cfg: Config, pre: Preflight) -> Path:
    dist_device = dist_utils.init_from_env(pre.device.type)
    device = dist_device or pre.device
    out = Path(cfg.out)
    run = cfg.resolved_run_name
    torch.manual_seed(cfg.seed)

    data_key = {"dataset": cfg.dataset, "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
                "image_size": cfg.image_size, "normalization": cfg.normalization,
                "train_subset": cfg.train_subset, "test_subset": cfg.test_subset, "seed": cfg.seed}
    if not dist_utils.is_main():
        dist_utils.barrier()  # rank 0 decodes and caches the data first; the others read its cache
    data = load_dataset(cfg.dataset, cfg.data_dir, cache_dir=out / ".cache", image_size=cfg.image_size,
                        normalization=cfg.normalization, train_subset=cfg.train_subset,
                        test_subset=cfg.test_subset, seed=cfg.seed)
    if dist_utils.is_main():
        dist_utils.barrier()
    if pre.checkpoint is not None and data.num_classes != pre.num_classes:
        raise UserError(f"checkpoint has {pre.num_classes} classes but the data has {data.num_classes}")
    log.info("data: %s, %d train / %d test images, %d classes, input %s", data.name, len(data.train),
             len(data.test), data.num_classes, data.input_shape)
    stages = StageCache(out / ".work")  # keyed by content: runs that share a stage (a sweep's baseline) share it
    example = torch.zeros(2, *data.input_shape)
    test_loader = DeviceLoader(data.test, data, 500, device)

    # baseline --------------------------------------------------------------------------------
    if cfg.checkpoint:
        base_key = {"data": data_key, "model": cfg.model, "checkpoint": sha256_file(Path(cfg.checkpoint))}
    else:
        base_key = {"data": data_key, "model": cfg.model, "epochs": cfg.baseline_epochs, "lr": cfg.baseline_lr,
                    "momentum": cfg.momentum, "batch_size": cfg.batch_size, "wd": cfg.weight_decay,
                    "ls": cfg.label_smoothing, "amp": cfg.amp}

    def do_baseline(folder: Path) -> dict[str, Any]:
        if pre.checkpoint is not None:
            model = create_model(cfg.model, num_classes=data.num_classes)
            model.load_state_dict(pre.checkpoint)
            model.to(device)
        else:
            model = baseline_stage.train_baseline(
                data, cfg.model, epochs=cfg.baseline_epochs, lr=cfg.baseline_lr, batch_size=cfg.batch_size,
                momentum=cfg.momentum, weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing,
                amp=cfg.amp, device=device, workdir=folder, seed=cfg.seed)
        acc = evaluate(model, test_loader, device, desc="eval dense")
        if dist_utils.is_main():
            atomic_torch_save(model.cpu().state_dict(), folder / "model.pt")
        return {"test_acc": acc, "source": cfg.checkpoint or "trained"}

    base_dir, base_digest, base = stages.run("baseline", base_key, do_baseline, all_ranks=True)
    dense = create_model(cfg.model, num_classes=data.num_classes)
    dense.load_state_dict(torch.load(base_dir / "model.pt", map_location="cpu", weights_only=True))
    dense.eval()
    layers = prune_stage.find_prunable_layers(dense, example)
    # pruning at initialisation (MIPP --at-init): rank and cut a freshly initialised model, then train it
    at_init = bool(cfg.criterion_options.get("at_init"))
    if at_init:
        torch.manual_seed(cfg.seed)
        source = create_model(cfg.model, num_classes=data.num_classes).eval()
    else:
        source = dense
    if not layers:
        raise UserError(f"model {cfg.model} has no prunable convolution")

    # rank ------------------------------------------------------------------------------------
    rank_key = {"baseline": base_digest, "criterion": cfg.criterion, "options": cfg.criterion_options,
                "samples": cfg.rank_samples or default_samples(cfg.criterion), "at_init": at_init,
                # a criterion that can cut at the run's keep ratio (cmi's "ratio" cutoff) reads it
                "keep_ratio": cfg.keep_ratio if getattr(CRITERIA.get(cfg.criterion), "reads_keep_ratio", False)
                else None}

    def do_rank(folder: Path) -> dict[str, Any]:
        model = source.to(device)
        found = prune_stage.find_prunable_layers(model, example.to(device))
        rankings = rank_stage.rank_channels(model, found, data, criterion=cfg.criterion,
                                            options=cfg.criterion_options, samples=cfg.rank_samples,
                                            seed=cfg.seed, device=device, keep_ratio=cfg.keep_ratio)
        source.cpu()
        atomic_write_json(folder / "rankings.json", {name: r.__dict__ for name, r in rankings.items()})
        return {"layers": len(rankings)}

    rank_dir, rank_digest, _ = stages.run("rank", rank_key, do_rank)
    rankings = {k: LayerRanking(**v) for k, v in json.loads((rank_dir / "rankings.json").read_text()).items()}

    # prune -----------------------------------------------------------------------------------
    compensating = cfg.compensation != "none" and not at_init  # at init there is no trained network to match
    prune_key = {"rank": rank_digest, "keep_ratio": cfg.keep_ratio, "keep": cfg.keep, "round_to": cfg.round_to,
                 "bn": cfg.bn_recalibration, "fold": cfg.fold, "budget": cfg.budget,
                 "compensation": cfg.compensation if compensating else "none",
                 "compensation_samples": cfg.compensation_samples if compensating else None}

    # a budget's allocation measures every layer's sensitivity first; that does not depend on the budget, so
    # runs at other budgets (a study's flops=0.4 and 0.2) share it (the prune stage runs on one rank only, so
    # this is a plain cached file, not a stage of its own)
    sensitivity_dir = stages.root / ("sensitivity-" + stable_hash(
        {"stage": "sensitivity", "rank": rank_digest, "compensation": prune_key["compensation"],
         "compensation_samples": prune_key["compensation_samples"], "seed": cfg.seed}))

    def do_prune(folder: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        fit_idx = balanced_indices(data.train.labels, cfg.compensation_samples, cfg.seed + 2)
        fit_images = data.normalize(data.train.images[fit_idx].to(device))
        if cfg.budget:
            probe_idx = balanced_indices(data.train.labels, 256, cfg.seed + 3)
            counts, result["allocation"] = allocate_for_budget(
                source.to(device), layers, rankings, example.to(device), data.normalize(data.train.images[probe_idx]
                                                                                        .to(device)),
                fit_images[:128], parse_budget(cfg.budget), compensation=compensating, round_to=cfg.round_to,
                seed=cfg.seed, cache=sensitivity_dir / "sensitivity.json")
            source.cpu()
        else:
            counts = prune_stage.resolve_keep_counts(layers, rankings, keep_ratio=cfg.keep_ratio,
                                                     per_layer=cfg.keep, round_to=cfg.round_to)
        kept = prune_stage.kept_indices(rankings, counts)
        pruned, record = prune_stage.prune_model(source, example, kept, fold=cfg.fold == "masked")
        flops_d, params_d = prune_stage.count_flops_params(dense, data.input_shape)
        flops_p, params_p = prune_stage.count_flops_params(pruned, data.input_shape)
        acc_raw = evaluate(pruned.to(device), test_loader, device, desc="eval pruned")

        def recalibrate(model: torch.nn.Module) -> int:
            probe = DeviceLoader(data.train, data, 256, device, shuffle=True, seed=cfg.seed + 1)
            return recalibrate_batchnorm(model, probe, device, cfg.bn_recalibration)

        uncompensated = copy.deepcopy(pruned) if compensating else pruned
        recalibrated = recalibrate(uncompensated)
        acc_bn = evaluate(uncompensated, test_loader, device, desc="eval pruned+bn")
        if compensating:
            report = compensate(pruned, source.to(device), fit_images, prune_stage.consumer_outputs(layers, kept),
                                seed=cfg.seed)
            source.cpu()
            record.bias_added = sorted(set(record.bias_added) | set(report.bias_added))
            recalibrate(pruned)
            acc_oneshot = evaluate(pruned, test_loader, device, desc="eval compensated")
            result["compensation"] = report.to_json()
        else:
            acc_oneshot = acc_bn
        atomic_torch_save(pruned.cpu().state_dict(), folder / "pruned.pt")
        atomic_write_json(folder / "architecture.json", {"model": cfg.model, "num_classes": data.num_classes,
                                                         "input_shape": list(data.input_shape),
                                                         **record.to_json()})
        return {**result, "flops_dense": flops_d, "flops_pruned": flops_p, "params_dense": params_d,
                "params_pruned": params_p, "acc_pruned": acc_raw, "acc_pruned_bn_recalibrated": acc_bn,
                "acc_oneshot": acc_oneshot, "bn_images": recalibrated, "kept_counts": counts,
                "channels_removed": sum(layer.channels - counts[layer.name] for layer in layers),
                "channels_dense": sum(layer.channels for layer in layers)}

    prune_dir, prune_digest, prune_metrics = stages.run("prune", prune_key, do_prune)
    record = prune_stage.PruneRecord.from_json(json.loads((prune_dir / "architecture.json").read_text()))

    def load_pruned_unfinetuned() -> torch.nn.Module:
        model = prune_stage.build_pruned(create_model(cfg.model, num_classes=data.num_classes), example, record)
        model.load_state_dict(torch.load(prune_dir / "pruned.pt", map_location="cpu", weights_only=True))
        return model.eval()

    # finetune --------------------------------------------------------------------------------
    ft_key = {"prune": prune_digest, "epochs": cfg.finetune_epochs, "lr": cfg.lr, "at_init": at_init,
              "init_epochs": cfg.baseline_epochs if at_init else None,
              "init_lr": cfg.baseline_lr if at_init else None, "momentum": cfg.momentum, "wd": cfg.weight_decay,
              "ls": cfg.label_smoothing, "distill": cfg.distill,
              "alpha": cfg.distill_alpha, "T": cfg.distill_temperature, "batch_size": cfg.batch_size, "amp": cfg.amp,
              "world": dist_utils.world_size()}

    def do_finetune(folder: Path) -> dict[str, Any]:
        model = load_pruned_unfinetuned()
        # at init the pruned model is trained like a baseline, not fine-tuned
        epochs, lr = (cfg.baseline_epochs, cfg.baseline_lr) if at_init else (cfg.finetune_epochs, cfg.lr)
        recipe = Recipe(epochs=epochs, lr=lr, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing,
                        distill_alpha=cfg.distill_alpha, distill_temperature=cfg.distill_temperature, amp=cfg.amp)
        teacher = dense if cfg.distill else None
        model, history = finetune_stage.finetune(model, data, recipe, device, folder, batch_size=cfg.batch_size,
                                                 seed=cfg.seed, teacher=teacher, bn_images=cfg.bn_recalibration)
        acc = evaluate(model, test_loader, device, desc="eval finetuned")
        if dist_utils.is_main():
            atomic_torch_save(model.cpu().to(memory_format=torch.contiguous_format).state_dict(),
                              folder / "model.pt")
        return {"test_acc": acc, "history": history}

    ft_dir, ft_digest, ft = stages.run("finetune", ft_key, do_finetune, all_ranks=True)
    if not dist_utils.is_main():
        return out / run  # rank 0 alone exports, benchmarks and writes the bundle
    pruned = prune_stage.build_pruned(create_model(cfg.model, num_classes=data.num_classes), example, record)
    pruned.load_state_dict(torch.load(ft_dir / "model.pt", map_location="cpu", weights_only=True))
    pruned.eval()

    # export ----------------------------------------------------------------------------------
    export_key = {"finetune": ft_digest, "opset": pre.opset, "tol": cfg.parity_tolerance}

    def do_export(folder: Path) -> dict[str, Any]:
        probe = data.normalize(data.test.images[:64])
        result: dict[str, Any] = {}
        for name, model in (("dense", dense), ("pruned", pruned)):
            path = folder / f"{name}.onnx"
            info = export_stage.export_onnx(model, data.input_shape, path, opset=pre.opset)
            info["parity_max_abs_diff"] = export_stage.check_parity(model, path, probe, cfg.parity_tolerance)
            result[name] = info
        images = data.normalize(data.test.images)
        result["pruned"]["onnxruntime_test_acc"] = export_stage.onnx_accuracy(folder / "pruned.onnx", images,
                                                                              data.test.labels)
        return result

    export_dir, export_digest, exported = stages.run("export", export_key, do_export)

    # quantize --------------------------------------------------------------------------------
    target = pre.target
    quant_key = {"export": export_digest, "samples": cfg.calibration_samples, "method": cfg.calibration_method,
                 "trt": target.tensorrt_version, "fp16": target.supports_fp16}

    def do_quantize(folder: Path) -> dict[str, Any]:
        return quantize_stage.quantize(export_dir / "pruned.onnx", data, folder, samples=cfg.calibration_samples,
                                       method=cfg.calibration_method, seed=cfg.seed,
                                       tensorrt_version=target.tensorrt_version or "10.3.0",
                                       fp16=target.supports_fp16)

    quant_dir, quant_digest, quantized = stages.run("quantize", quant_key, do_quantize)
    onnx_by_precision = {"fp32": export_dir / "pruned.onnx", "int8": quant_dir / "model.int8.onnx"}
    if (quant_dir / "model.fp16.onnx").exists():
        onnx_by_precision["fp16"] = quant_dir / "model.fp16.onnx"

    # engine ----------------------------------------------------------------------------------
    batch_sizes = cfg.bench_batch_sizes or sorted({1, *target.batch_sizes})
    engine_key = {"quantize": quant_digest, "precision": pre.precision, "target": target.to_dict(),
                  "batches": batch_sizes, "workspace": target.workspace_mb}

    def do_engine(folder: Path) -> dict[str, Any]:
        return engine_stage.build_or_defer(onnx_by_precision, pre.precision, folder,
                                           workspace_mb=target.workspace_mb or 1024, batch_sizes=batch_sizes,
                                           input_shape=data.input_shape)

    engine_dir, _, engine = stages.run("engine", engine_key, do_engine)

    # bench -----------------------------------------------------------------------------------
    variants = {"dense/fp32": ("onnxruntime", export_dir / "dense.onnx"),
                "pruned/fp32": ("onnxruntime", export_dir / "pruned.onnx"),
                "pruned/int8": ("onnxruntime", quant_dir / "model.int8.onnx")}
    if engine.get("built"):
        variants[f"pruned-tensorrt/{pre.precision}"] = ("tensorrt", engine_dir / engine["file"])
    bench_key = {"quantize": quant_digest, "target": target.to_dict(), "runs": cfg.bench_runs, "batches": batch_sizes,
                 "variants": sorted(variants)}

    def do_bench(folder: Path) -> dict[str, Any]:
        results = bench_stage.bench_models(variants, input_shape=data.input_shape,
                                           threads=min(target.threads, os.cpu_count() or 1), runs=cfg.bench_runs,
                                           batch_sizes=batch_sizes, memory_budget_mb=target.memory_budget_mb)
        atomic_write_json(folder / "bench.json", results)
        return {"latency": bench_stage.latency_summary(results), "memory": bench_stage.memory_summary(results),
                "roofline": bench_stage.roofline_all_targets(export_dir / "dense.onnx", export_dir / "pruned.onnx",
                                                             data.input_shape)}

    bench_dir, _, bench = stages.run("bench", bench_key, do_bench)

    # bundle ----------------------------------------------------------------------------------
    metrics = {
        "acc_dense": base["test_acc"],
        "acc_pruned": prune_metrics["acc_pruned"],
        "acc_pruned_bn_recalibrated": prune_metrics["acc_pruned_bn_recalibrated"],
        "acc_oneshot": prune_metrics["acc_oneshot"],
        **({"compensation_seconds": prune_metrics["compensation"]["seconds"]}
           if "compensation" in prune_metrics else {}),
        "acc_finetuned": ft["test_acc"],
        "acc_onnxruntime": exported["pruned"]["onnxruntime_test_acc"],
        "acc_int8": quantized["acc_int8"],
        "acc_int8_host": quantized["acc_int8_host"],
        **({"acc_fp16": quantized["acc_fp16"]} if "acc_fp16" in quantized else {}),
        "onnx_parity_max_abs_diff": exported["pruned"]["parity_max_abs_diff"],
        **{k: prune_metrics[k] for k in ("flops_dense", "flops_pruned", "params_dense", "params_pruned",
                                         "channels_dense", "channels_removed")},
        "flops_ratio": prune_metrics["flops_pruned"] / prune_metrics["flops_dense"],
        "params_ratio": prune_metrics["params_pruned"] / prune_metrics["params_dense"],
        "latency": bench["latency"],
        "memory": bench["memory"],
        "roofline": bench["roofline"],
        "finetune_history": ft["history"],
    }
    files = {"model.onnx": export_dir / "pruned.onnx", "model.pt": ft_dir / "model.pt",
             "architecture.json": prune_dir / "architecture.json", "rankings.json": rank_dir / "rankings.json",
             "bench.json": bench_dir / "bench.json"}
    files.update({name: quant_dir / name for name in quantized["files"]})
    if engine.get("built"):
        files[engine["file"]] = engine_dir / engine["file"]
    model_files = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    if "model.fp16.onnx" in quantized["files"]:
        model_files["fp16"] = "model.fp16.onnx"

    def write_kit(folder: Path) -> None:
        kit.write_kit(folder, model_files=model_files, target=target, labels=data.classes, mean=data.mean,
                      std=data.std, input_size=data.input_shape)

    return bundle_stage.write_bundle(
        out / run, cfg=cfg, target=target, data=data, metrics=metrics, files=files, extra_writers=[write_kit],
        extra={"stages": {name: folder.name for name, folder in (
                   ("baseline", base_dir), ("rank", rank_dir), ("sensitivity", sensitivity_dir), ("prune", prune_dir),
                   ("finetune", ft_dir), ("export", export_dir), ("quantize", quant_dir), ("engine", engine_dir),
                   ("bench", bench_dir)) if name != "sensitivity" or sensitivity_dir.is_dir()},
               "precision": pre.precision, "engine": {k: v for k, v in engine.items() if k != "seconds"},
               "quantization": quantized["quantization"]})
