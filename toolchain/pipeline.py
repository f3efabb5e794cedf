"""The pipeline, top to bottom: config -> preflight -> each stage's inputs -> the stages -> bundle.

The stages (``toolchain.stages``, one module each, the contract in ``stages/base.py``) run in order;
each one's inputs hold the digests of those before it, so runs that agree on a stage (the runs of a
sweep over criteria share data, baseline and more) compute it once, and a killed run resumes. The
bundle is assembled in a temporary folder and renamed into place, so a reader never sees half a bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolchain import protect
from toolchain.allocation import SENSITIVITY_FRACTIONS
from toolchain.config import OPSET_DEFAULT, Config
from toolchain.data import SOURCES as DATA_SOURCES
from toolchain.data import DataSpec, count_classes
from toolchain.errors import UserError
from toolchain.latency import host_measures
from toolchain.latency_store import imported_table
from toolchain.models import create_model, default_normalization
from toolchain.ranking import CRITERIA, load_criteria
from toolchain.ranking.base import check_options, default_samples
from toolchain.ranking.cutoffs import parse_budget
from toolchain.stages import baseline, bench, bundle, export, finetune, latency, prune, quantize, rank, tensorrt_engine
from toolchain.stages.base import Done, StageContext, digest_of, run_stage
from toolchain.targets import TargetProfile, load_target
from toolchain.train import distributed as dist_utils
from toolchain.util import out_lock, resolve_device, sha256_file

log = logging.getLogger("build_edge")
TRAINING = (baseline, rank, latency, prune, finetune)  # every rank runs (or waits for) these under torchrun
DELIVERY = (export, quantize, tensorrt_engine, bench)  # rank 0 alone


@dataclass
class Preflight:
    target: TargetProfile
    precision: str
    device: torch.device
    checkpoint: dict[str, torch.Tensor] | None
    num_classes: int
    opset: int  # the ONNX opset to export: --opset, or the default within the target's limit
    protected: tuple[str, ...] = ()  # prunable layers kept whole (--protect, resolved against the model)


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
    DATA_SOURCES.get(cfg.dataset)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is not a folder")
    bundle.check_destination(out / cfg.resolved_run_name)
    if cfg.dataset == "imagefolder" and cfg.data_dir and not Path(cfg.data_dir).exists():
        raise UserError(f"data dir {cfg.data_dir} does not exist")
    num_classes = count_classes(cfg.dataset, cfg.data_dir)
    if num_classes == 0:
        raise UserError(f"{cfg.data_dir}/train has no class folders")
    state = None
    if cfg.checkpoint:
        head = new_head(cfg, num_classes)
        state = baseline.read_checkpoint(cfg.checkpoint, cfg.model, head or num_classes)
        if head:
            baseline.model_with_new_head(cfg.model, state, head, num_classes)
    elif cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise UserError(f"num_classes {cfg.num_classes} is the head size of a --checkpoint's model; without a "
                        f"checkpoint {cfg.model} is built for the data's {num_classes} classes (leave it out)")
    model = create_model(cfg.model, num_classes=num_classes).eval()
    example = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as e:
        raise UserError(f"image_size {cfg.image_size} does not fit {cfg.model}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    layers = prune.find_prunable_layers(model, example)
    names = {layer.name for layer in layers}
    if not names:
        raise UserError(f"model {cfg.model} has no prunable convolution")
    grouped = [layer.name for layer in layers if layer.members]
    if cfg.criterion_options.get("budget") and grouped:  # cmi's own budget: one producer per layer (cmi.py)
        raise UserError(f"the cmi option budget does not allocate over channel groups cut across several convs "
                        f"({cfg.model}: {len(grouped)} such groups, e.g. {grouped[0]}); use --budget")
    if cfg.keep:  # per-layer names must name prunable layers: check now, not after training
        unknown = sorted(set(cfg.keep) - names)
        if unknown:
            raise UserError(f"keep: unknown layer(s) {', '.join(unknown)}; prunable layers of {cfg.model}: "
                            f"{', '.join(sorted(names))}")
    protected = tuple(protect.resolve(cfg.protect, cfg.model, model, example, layers))
    both = sorted(set(cfg.keep) & set(protected))
    if both:
        raise UserError(f"keep names protected layer(s) {', '.join(both)} (--protect {cfg.protect}); protected "
                        f"layers keep every channel: leave them out of --protect (--protect none) or of --keep")
    if cfg.criterion_options.get("budget") and protected:
        raise UserError(f"the cmi option budget does not know protected layers ({', '.join(protected)}); use "
                        "--budget, or --protect none")
    _check_latency_source(cfg, target, precision)
    return Preflight(target, precision, device, state, num_classes, opset, protected)


def new_head(cfg: Config, data_classes: int) -> int | None:
    """The checkpoint's head size when a new head for the data's classes is trained from it (``--num-classes``
    given with a checkpoint and not the data's class count), else None."""
    if cfg.checkpoint and cfg.num_classes is not None and cfg.num_classes != data_classes:
        return cfg.num_classes
    return None


def _check_latency_source(cfg: Config, target: TargetProfile, precision: str) -> None:
    budget = parse_budget(cfg.budget)
    if budget is None or budget.kind != "latency" or cfg.latency_source != "host":
        return
    if target.runtime == "onnxruntime" and precision != "fp32":
        raise UserError(f"--latency-source host measures ONNX Runtime CPU tables at fp32, not {precision}; use "
                        "--precision fp32 or --latency-source estimate")
    if target.runtime == "tensorrt":
        if not torch.cuda.is_available():
            raise UserError(f"--latency-source host for {target.name} (TensorRT) measures on a GPU and this machine "
                            "has none; use --latency-source estimate, or import a table from the device")
        if precision not in ("fp32", "fp16"):
            raise UserError(f"--latency-source host times torch convs at fp32 or fp16, not {precision}")


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


def sensitivity_grid(cfg: Config) -> list[float] | None:
    """The prune stage's sensitivity fractions: None (the key of earlier runs) without a budget or with the default
    grid; a latency budget's table allocator reads the same sensitivity."""
    grid = cfg.sensitivity_fractions
    return None if not cfg.budget or grid is None or tuple(grid) == SENSITIVITY_FRACTIONS else list(grid)


def resolve_round_to(round_to: int | None, target: TargetProfile, latency_budget: bool) -> int:
    """``--round-to``, or its default: for a latency budget 8 on a GPU with tensor cores and on an x86 ONNX Runtime
    target (its NCHWc conv kernels take channel blocks of 8 on AVX2: on the shared VGG16 at 1 thread, pruned
    models with counts such as 60 measured 0.9x to 1.35x what their convs' entries predict, with blocks of 8 they
    follow the table), else 1."""
    if round_to is not None:
        return round_to
    if not latency_budget:
        return 1
    tensor_cores = target.gpu is not None and (target.gpu.tensor_cores or 0) > 0
    cpu_model = target.cpu.model if target.cpu is not None else ""
    return 8 if tensor_cores or (target.runtime == "onnxruntime" and "x86" in cpu_model.lower()) else 1


def latency_inputs(baseline_digest: str, cfg: Config, pre: Preflight, threads: int, round_to: int) -> latency.Inputs:
    """Where a latency budget's table comes from (``--latency-source``): auto measures on this host when it is
    the target (an x86 ONNX Runtime target at fp32), else reads a table imported from the device for this target,
    precision and batch, else estimates with the roofline; host measures here whatever the target."""
    target, source = pre.target, cfg.latency_source
    imported = imported_table(target.name, pre.precision, 1) if source == "auto" else None
    cpu_model = target.cpu.model if target.cpu is not None else ""
    here = host_measures(cpu_model, target.runtime) and pre.precision == "fp32"
    if source == "host" or (source == "auto" and here and imported is None):
        backend = "onnxruntime" if target.runtime == "onnxruntime" else "torch"
    else:
        backend = "roofline"
    return latency.Inputs(baseline_digest, cfg.model, target.to_dict(), backend, pre.precision, 1, threads, round_to,
                          cfg.latency_levels, device_table=str(imported) if imported else None,
                          device_table_sha256=sha256_file(imported) if imported else None)


def stage_inputs(cfg: Config, pre: Preflight, *, world: int = 1) -> dict[str, Any]:
    """Every stage's inputs, from the config alone (nothing runs): their digests are the cache keys, so
    which stages a config change re-runs can be read off here (tests/test_stage_keys.py does)."""
    digest: dict[str, str] = {}

    def add(stage, inputs) -> Any:
        digest[stage.NAME] = digest_of(stage.NAME, inputs)
        return inputs

    data = DataSpec(cfg.dataset, str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None, cfg.image_size,
                    cfg.normalization if cfg.normalization != "auto" else default_normalization(cfg.model),
                    cfg.train_subset, cfg.test_subset, cfg.seed)
    at_init = bool(cfg.criterion_options.get("at_init"))
    compensation = "none" if at_init else cfg.compensation  # at init there is no trained network to match
    training = baseline.Training(cfg.baseline_epochs, cfg.baseline_lr, cfg.momentum, cfg.batch_size,
                                 cfg.weight_decay, cfg.label_smoothing, cfg.amp, world, cfg.baseline_cutout or None)
    target, batches = pre.target, tuple(cfg.bench_batch_sizes or sorted({1, *pre.target.batch_sizes}))
    threads = min(target.threads, os.cpu_count() or 1)
    budget = parse_budget(cfg.budget)
    timed = budget is not None and budget.kind == "latency"
    round_to = resolve_round_to(cfg.round_to, target, timed)
    reads_ratio = getattr(CRITERIA.get(cfg.criterion), "reads_keep_ratio", False)
    head = new_head(cfg, pre.num_classes)
    return {
        "baseline": add(baseline, baseline.Inputs(
            data, cfg.model, cfg.checkpoint, sha256_file(Path(cfg.checkpoint)) if cfg.checkpoint else None,
            None if cfg.checkpoint and not head else training, head_classes=head)),
        "rank": add(rank, rank.Inputs(digest["baseline"], cfg.model, cfg.criterion,
                                      cfg.rank_samples or default_samples(cfg.criterion), cfg.seed,
                                      dict(cfg.criterion_options), at_init, cfg.keep_ratio if reads_ratio else None)),
        "latency": add(latency, latency_inputs(digest["baseline"], cfg, pre, threads, round_to)) if timed else None,
        "prune": add(prune, prune.Inputs(
            digest["rank"], digest["baseline"], cfg.model, cfg.seed, cfg.keep_ratio, dict(cfg.keep), round_to,
            cfg.budget, cfg.bn_recalibration, cfg.fold, compensation,
            cfg.compensation_samples, at_init, digest.get("latency"), list(pre.protected) or None,
            sensitivity_grid(cfg))),
        "finetune": add(finetune, finetune.Inputs(
            digest["prune"], digest["baseline"], cfg.model, *((cfg.baseline_epochs, cfg.baseline_lr) if at_init
                                                              else (cfg.finetune_epochs, cfg.lr)),
            cfg.momentum, cfg.weight_decay, cfg.label_smoothing, cfg.distill, cfg.distill_alpha,
            cfg.distill_temperature, cfg.batch_size, cfg.amp, world, cfg.seed, cfg.bn_recalibration,
            cfg.cutout or None, cfg.ema_decay, cfg.distill_features, cfg.distill_flip or None)),
        "export": add(export, export.Inputs(digest["finetune"], digest["prune"], digest["baseline"], cfg.model,
                                            pre.opset, cfg.parity_tolerance)),
        "quantize": add(quantize, quantize.Inputs(digest["export"], cfg.calibration_samples, cfg.calibration_method,
                                                  cfg.seed, target.tensorrt_version or "10.3.0",
                                                  target.supports_fp16,
                                                  target.int8_weight_bits if target.int8_weight_bits != 8 else None)),
        "engine": add(tensorrt_engine, tensorrt_engine.Inputs(digest["export"], digest["quantize"], pre.precision,
                                                              batches, target.workspace_mb or 1024)),
        "bench": add(bench, bench.Inputs(digest["export"], digest["quantize"], digest["engine"],
                                         threads, target.memory_budget_mb,
                                         cfg.bench_runs, batches)),
    }


def _run(cfg: Config, pre: Preflight) -> Path:
    dist_device = dist_utils.init_from_env(pre.device.type)
    device = dist_device or pre.device
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    inputs = stage_inputs(cfg, pre, world=dist_utils.world_size())
    if not dist_utils.is_main():
        dist_utils.barrier()  # rank 0 decodes and caches the data first; the others read its cache
    data = inputs["baseline"].data.load(out / ".cache")
    if dist_utils.is_main():
        dist_utils.barrier()
    if pre.checkpoint is not None and data.num_classes != pre.num_classes:
        raise UserError(f"checkpoint has {pre.num_classes} classes but the data has {data.num_classes}")
    log.info("data: %s, %d train / %d test images, %d classes, input %s", data.name, len(data.train),
             len(data.test), data.num_classes, data.input_shape)
    ctx = StageContext(out / ".work", data, device)  # keyed by content: runs that share a stage share it
    done: dict[str, Done] = {}
    for stage in TRAINING:  # every rank under torchrun
        if inputs[stage.NAME] is not None:  # the latency stage runs for a latency budget only
            done[stage.NAME] = run_stage(stage, inputs[stage.NAME], ctx)
    if not dist_utils.is_main():
        return out / cfg.resolved_run_name  # rank 0 alone exports, benchmarks and writes the bundle
    for stage in DELIVERY:
        done[stage.NAME] = run_stage(stage, inputs[stage.NAME], ctx)
    return bundle.write_run_bundle(out / cfg.resolved_run_name, cfg=cfg, target=pre.target,
                                   precision=pre.precision, data=data, done=done)
