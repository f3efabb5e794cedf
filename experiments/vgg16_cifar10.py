"""The VGG16-BN / CIFAR-10 study (issue 7): CMI and MIPP against L1, random and BN-scale at matched FLOPs.

From one dense baseline (the shared checkpoint, or one trained with ``configs/vgg16_cifar10_gpu.yaml``)
every variant is one full pipeline run (its own bundle under ``--out``, default ``runs/study``); the stage
cache shares the data, the baseline, and the rankings and cuts across the runs that agree on them.

1. The "primary" variants: CMI (formulation per-layer|compact|full x order forward|bidirectional x cutoff
   scree|xmeans|permutation: 18), CMI with a global FLOPs budget (0.5 and 0.4), MIPP (renyi and mlp
   estimators). Each chooses its own kept channels per layer.
2. The FLOPs levels they reach (read from their bundles) and the two budgets, levels closer than
   ``--level-tol`` merged; for each level the uniform keep ratio whose FLOPs match it is found by bisection
   (``matched_keep_ratio``) and L1, random and BN-scale are run at that ratio.
3. Every variant is fine-tuned with the same recipe, without and with distillation from the dense model.

The results (top-1, FLOPs and params reduction, filters removed, ONNX Runtime CPU latency, INT8 accuracy: the
bundles' manifest metrics, see ``toolchain.sweep.sweep_row``) go to ``--out-dir`` (default ``docs/study``) as
``results.json`` and ``results.md``, with the accuracy-vs-FLOPs plot(s) drawn by ``write_sweep_report``;
bundles, work files and the full sweep reports stay under ``--out`` (git-ignored ``runs/``). A variant that
fails (an unfinished criterion option, say) is recorded with its error and the study goes on.

    # quick CPU run (minutes): a few variants on subsets, 1 fine-tuning epoch
    .venv/bin/python experiments/vgg16_cifar10.py --quick --dataset imagefolder --data-dir .data/cifar10 \\
        --normalization cifar10 --checkpoint ../shared/models/vgg16_bn_cifar10.pt
    # full run on one GPU
    .venv/bin/python experiments/vgg16_cifar10.py --device cuda --dataset imagefolder --data-dir .data/cifar10 \\
        --normalization cifar10 --checkpoint ../shared/models/vgg16_bn_cifar10.pt --finetune-epochs 30

See docs/STUDY.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from toolchain.config import Config, build_config, load_yaml
from toolchain.errors import UserError
from toolchain.models import create_model
from toolchain.ranking.base import LayerRanking
from toolchain.stages import prune as prune_stage
from toolchain.sweep import sweep_row, variant_configs

log = logging.getLogger("build_edge.study")

ROOT = Path(__file__).resolve().parents[1]
SHARED_CHECKPOINT = ROOT.parent / "shared" / "models" / "vgg16_bn_cifar10.pt"
DEFAULT_RECIPE = ROOT / "configs" / "vgg16_cifar10_gpu.yaml"

CMI_FORMULATIONS = ("per-layer", "compact", "full")
CMI_ORDERS = ("forward", "bidirectional")
CMI_CUTOFFS = ("scree", "xmeans", "permutation")
BUDGETS = (0.5, 0.4)
BUDGET_OPTIONS = {"formulation": "per-layer", "order": "forward"}  # the CMI ranking the budgets allocate over
MIPP_ESTIMATORS = ("renyi", "mlp")
BASELINES = ("l1", "random", "bn-scale")

QUICK_CMI = {"formulation": ["per-layer"], "order": ["forward"], "cutoff": ["scree"]}
QUICK_BUDGETS = (0.4,)
QUICK_BASELINES_AT_CUTOFF = ("l1", "random")  # quick: L1 and random at the cutoff variant's FLOPs
QUICK_BASELINES_AT_BUDGET = ("l1",)  # quick: L1 at the budget variant's FLOPs

# settings of a mode (file values <- these <- the flags given)
QUICK_PRESET: dict[str, Any] = {"train_subset": 5000, "test_subset": 1000, "finetune_epochs": 1, "bench_runs": 10,
                                "bench_batch_sizes": [1]}
FULL_PRESET: dict[str, Any] = {"finetune_epochs": 30}
CIFAR_DATA = {"dataset": "imagefolder", "data_dir": ".data/cifar10", "normalization": "cifar10"}
STUDY_DEFAULTS = {"model": "vgg16_bn", "target": "x86-cpu", "out": "runs/study"}
GROUP_ORDER = ("cmi", "cmi-budget", "mipp", "baseline")
QUICK_GROUPS = ("cmi", "cmi-budget", "baseline")


# -- matched FLOPs -----------------------------------------------------------------------------------------
class FlopsModel:
    """FLOPs of a model pruned with a uniform keep ratio, without pruning it.

    A conv's (or linear's) FLOPs scale with ``kept_in / C_in * kept_out / C_out``: its output fraction when it
    is a prunable layer, its input fraction when it consumes one. Everything else ``count_flops_params``
    counts stays as it is. Kept counts come from ``prune.resolve_keep_counts``, exactly as the pipeline's
    prune stage computes them (rounding, ``round_to``, at least one channel).
    """

    def __init__(self, model: torch.nn.Module, input_shape: Sequence[int], *, round_to: int = 1):
        model = model.eval()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.round_to = round_to
        self.layers = prune_stage.find_prunable_layers(model, torch.zeros(2, *self.input_shape))
        self.dense_total, _ = prune_stage.count_flops_params(model, self.input_shape)
        self.module_flops = _module_flops(model, self.input_shape)
        self.constant = self.dense_total - sum(self.module_flops.values())  # FLOPs no cut changes
        self.producer = {c: layer.name for layer in self.layers for c in layer.consumers}
        self._rankings = {layer.name: LayerRanking(order=[], scores=[]) for layer in self.layers}

    def counts(self, ratio: float) -> dict[str, int]:
        return prune_stage.resolve_keep_counts(self.layers, self._rankings, keep_ratio=ratio, per_layer={},
                                               round_to=self.round_to)

    def fraction_of_counts(self, counts: dict[str, int]) -> float:
        out = {layer.name: counts[layer.name] / layer.channels for layer in self.layers}
        total = self.constant
        for name, flops in self.module_flops.items():
            total += flops * out.get(name, 1.0) * out.get(self.producer.get(name, ""), 1.0)
        return total / self.dense_total

    def fraction(self, ratio: float) -> float:
        """Pruned FLOPs / dense FLOPs (as ``count_flops_params`` counts them) at a uniform keep ratio."""
        return self.fraction_of_counts(self.counts(ratio))


def _module_flops(model: torch.nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """Dense FLOPs of every Conv2d and Linear for one image (2 per multiply-accumulate)."""
    names = {m: n for n, m in model.named_modules()}
    flops: dict[str, float] = {}

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            per_out = mod.in_features
        flops[names[mod]] = flops.get(names[mod], 0.0) + 2.0 * out.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return flops


def matched_keep_ratio(flops: FlopsModel, target: float, *, iterations: int = 60) -> float:
    """The uniform keep ratio whose pruned FLOPs fraction is closest to `target` (bisection).

    The fraction is a non-decreasing step function of the ratio (kept counts are rounded), so the
    bisection brackets the step that crosses `target` and returns the closer side. The returned ratio
    is rounded to 4 decimals when that gives the same kept counts (readable labels), else left as is.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target FLOPs fraction must be in (0, 1], got {target}")
    lo, hi = 1e-6, 1.0
    if flops.fraction(hi) <= target:
        return 1.0
    if flops.fraction(lo) >= target:
        return _tidy(flops, lo)
    for _ in range(iterations):  # invariant: fraction(lo) < target <= fraction(hi)
        mid = 0.5 * (lo + hi)
        if flops.fraction(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda r: (abs(flops.fraction(r) - target), r))
    return _tidy(flops, best)


def _tidy(flops: FlopsModel, ratio: float) -> float:
    counts = flops.counts(ratio)
    for digits in (2, 3, 4):
        short = round(ratio, digits)
        if 0.0 < short <= 1.0 and flops.counts(short) == counts:
            return short
    return ratio


# -- the plan ----------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str  # short name for tables and plot labels
    group: str  # cmi | cmi-budget | mipp | baseline
    label: str  # the axes' values (toolchain.sweep.variant_configs)
    cfg: Config
    level: str | None = None  # baselines: the FLOPs level they match
    target_flops: float | None = None  # baselines: the FLOPs fraction aimed at
    predicted_flops: float | None = None  # baselines: what FlopsModel predicts at cfg.keep_ratio


@dataclass
class Level:
    """A FLOPs fraction that baselines are matched to: reached by primary variants and/or a budget."""

    key: str
    fraction: float
    sources: list[str] = field(default_factory=list)  # primary variants (short names) / "budget flops=0.4"
    kinds: set[str] = field(default_factory=set)  # cutoff | budget
    keep_ratio: float | None = None
    predicted: float | None = None


def _with(base: Config, **changes: Any) -> Config:
    return build_config({}, {**base.to_dict(), **changes})


def _distill_tag(distill: bool) -> str:
    return "KD" if distill else "CE"


def primary_plan(base: Config, *, quick: bool, distill: Sequence[bool],
                 groups: Iterable[str] | None = None) -> list[Variant]:
    """CMI cutoff variants, CMI budgets and MIPP estimators, each fine-tuned with every `distill` value
    (quick: one CMI cutoff variant and one budget, no MIPP unless `groups` names it)."""
    groups = set(groups if groups is not None else (QUICK_GROUPS if quick else GROUP_ORDER))
    tag = base.run_name or base.model
    dist = {"distill": list(distill)}
    out: list[Variant] = []
    if "cmi" in groups:
        axes = QUICK_CMI if quick else {"formulation": list(CMI_FORMULATIONS), "order": list(CMI_ORDERS),
                                        "cutoff": list(CMI_CUTOFFS)}
        cmi = _with(base, criterion="cmi", run_name=f"{tag}-cmi", criterion_options={})
        for label, cfg in variant_configs(cmi, {**axes, **dist}):
            o = cfg.criterion_options
            out.append(Variant(f"cmi {o['formulation']}/{o['order']}/{o['cutoff']}", "cmi", label, cfg))
    if "cmi-budget" in groups:
        budgets = QUICK_BUDGETS if quick else BUDGETS
        cmi = _with(base, criterion="cmi", run_name=f"{tag}-cmi", criterion_options=dict(BUDGET_OPTIONS))
        for label, cfg in variant_configs(cmi, {"budget": [f"flops={b}" for b in budgets], **dist}):
            out.append(Variant(f"cmi {cfg.budget}", "cmi-budget", label, cfg))
    if "mipp" in groups:
        mipp = _with(base, criterion="mipp", run_name=f"{tag}-mipp", criterion_options={})
        for label, cfg in variant_configs(mipp, {"mipp_estimator": list(MIPP_ESTIMATORS), **dist}):
            out.append(Variant(f"mipp {cfg.criterion_options['mipp_estimator']}", "mipp", label, cfg))
    return out


def flops_levels(reached: Sequence[tuple[str, str, float]], budgets: Sequence[float], tol: float) -> list[Level]:
    """Merge the FLOPs fractions the primaries reached ``(name, group, fraction)`` and the nominal budgets
    into levels: fractions within `tol` of a level's first (smallest) one join it. A level's fraction is
    the mean of the reached fractions it holds (the budget's nominal value when it holds none)."""
    points = [(f, name, "budget" if group == "cmi-budget" else "cutoff", True) for name, group, f in reached]
    points += [(float(b), f"budget flops={b}", "budget", False) for b in budgets]
    levels: list[tuple[float, list[tuple[float, str, str, bool]]]] = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if levels and p[0] - levels[-1][0] <= tol:
            levels[-1][1].append(p)
        else:
            levels.append((p[0], [p]))
    out = []
    for i, (_, members) in enumerate(sorted(levels, key=lambda lv: -lv[0]), 1):
        measured = [f for f, _, _, is_reached in members if is_reached]
        fraction = sum(measured) / len(measured) if measured else members[0][0]
        names = list(dict.fromkeys(name for _, name, _, _ in members))
        out.append(Level(f"L{i}", fraction, names, {kind for _, _, kind, _ in members}))
    return out


def baseline_plan(base: Config, levels: Sequence[Level], *, criteria: Sequence[str], distill: Sequence[bool],
                  ratio_for: Callable[[float], float], predict: Callable[[float], float] | None = None,
                  quick: bool = False) -> list[Variant]:
    """L1 / random / BN-scale at each level's matched uniform keep ratio (quick: L1 and random at the
    cutoff variants' levels, L1 alone at the budget levels)."""
    tag = base.run_name or base.model
    out: list[Variant] = []
    seen: set[tuple[str, float, bool]] = set()
    for level in levels:
        level.keep_ratio = ratio_for(level.fraction)
        level.predicted = predict(level.keep_ratio) if predict else None
        if quick:
            wanted = QUICK_BASELINES_AT_CUTOFF if "cutoff" in level.kinds else QUICK_BASELINES_AT_BUDGET
            names = [c for c in criteria if c in wanted]
        else:
            names = list(criteria)
        for criterion in names:
            keyed = _with(base, criterion=criterion, run_name=f"{tag}-{criterion}", criterion_options={})
            for label, cfg in variant_configs(keyed, {"keep_ratio": [level.keep_ratio], "distill": list(distill)}):
                key = (criterion, cfg.keep_ratio, cfg.distill)
                if key in seen:  # two levels that round to the same counts: one run
                    continue
                seen.add(key)
                out.append(Variant(f"{criterion} @{level.keep_ratio:g}", "baseline", label, cfg, level=level.key,
                                   target_flops=level.fraction, predicted_flops=level.predicted))
    return out


# -- running -----------------------------------------------------------------------------------------------
def study_row(v: Variant, bundle: Path) -> dict[str, Any]:
    """``sweep_row`` plus what the study's table shows beyond it, from the bundle's manifest."""
    row = sweep_row(v.name, bundle)
    m = json.loads((bundle / "manifest.json").read_text())["metrics"]
    lat = m.get("latency") or {}
    int8 = (lat.get("pruned/int8") or {}).get("batches", {}).get("1", {}) if isinstance(lat, dict) else {}
    row.update({
        "acc_onnxruntime": m.get("acc_onnxruntime"), "acc_int8_host": m.get("acc_int8_host"),
        "flops_dense": m.get("flops_dense"), "flops_pruned": m.get("flops_pruned"),
        "params_dense": m.get("params_dense"), "params_pruned": m.get("params_pruned"),
        "channels_dense": m.get("channels_dense"), "int8_latency_p50_ms": int8.get("p50_ms"),
        "flops_reduction": 1.0 - m["flops_ratio"], "params_reduction": 1.0 - m["params_ratio"],
    })
    return row


def run_variant(v: Variant, failures_dir: Path) -> dict[str, Any]:
    from toolchain.pipeline import run_pipeline

    started = time.perf_counter()
    base = {"name": v.name, "group": v.group, "axes": v.label, "distill": v.cfg.distill, "level": v.level,
            "target_flops": v.target_flops, "predicted_flops": v.predicted_flops,
            "run_name": v.cfg.resolved_run_name}
    try:
        row = {**study_row(v, run_pipeline(v.cfg)), **base, "status": "ok"}
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one failing variant (an unfinished option) must not end the study
        first = (str(e).strip().splitlines() or [""])[0][:500]
        row = {**base, "label": v.name, "criterion": v.cfg.criterion, "criterion_options": v.cfg.criterion_options,
               "status": "failed", "error": f"{type(e).__name__}: {first}"}
        failures_dir.mkdir(parents=True, exist_ok=True)
        (failures_dir / f"{v.cfg.resolved_run_name}.txt").write_text(traceback.format_exc())
        log.error("study: %s (%s) failed: %s", v.name, _distill_tag(v.cfg.distill), row["error"])
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus, "torch_cuda_build": torch.version.cuda,
            "system": f"{platform.system()} {platform.release()} {platform.machine()}"}


# -- writing -----------------------------------------------------------------------------------------------
def _pct(x: Any, digits: int = 2) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{100 * x:.{digits}f}%"


def _pp(x: Any, ref: Any) -> str:
    if not isinstance(x, (int, float)) or not isinstance(ref, (int, float)):
        return "-"
    return f"{100 * (x - ref):+.2f}"


def _ms(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x:.3g}"


TABLE_HEADER = ["level", "variant", "FLOPs kept", "FLOPs red.", "params red.", "filters removed",
                "top-1 BN re-est.", "top-1 fine-tuned", "vs dense (pp)", "top-1 ORT", "top-1 INT8", "top-1 INT8 host",
                "ORT p50 ms pruned", "ORT p50 ms dense", "ORT p50 ms INT8"]


def _table_rows(rows: Sequence[dict[str, Any]], levels: Sequence[Level]) -> list[list[str]]:
    by_level: dict[str, list[dict[str, Any]]] = {lv.key: [] for lv in levels}
    loose = []
    for r in rows:
        key = r.get("level") or next((lv.key for lv in levels if r["name"] in lv.sources), None)
        by_level.get(key, loose).append(r)
    out = []
    for lv in levels:
        for r in sorted(by_level[lv.key], key=lambda r: (GROUP_ORDER.index(r["group"]), r["name"])):
            out.append(_row_cells(r, f"{lv.key} ({_pct(lv.fraction, 1)})"))
    out += [_row_cells(r, "-") for r in loose]
    return out


def _row_cells(r: dict[str, Any], level: str) -> list[str]:
    removed = r.get("channels_removed")
    dense = r.get("channels_dense")
    filters = "-" if removed is None else (f"{removed} / {dense}" if dense else f"{removed}")
    return [level, r["name"], _pct(r.get("flops_ratio")), _pct(r.get("flops_reduction")),
            _pct(r.get("params_reduction")), filters, _pct(r.get("acc_pruned_bn_recalibrated")),
            _pct(r.get("acc_finetuned")), _pp(r.get("acc_finetuned"), r.get("acc_dense")),
            _pct(r.get("acc_onnxruntime")), _pct(r.get("acc_int8")), _pct(r.get("acc_int8_host")),
            _ms(r.get("latency_p50_ms")), _ms(r.get("dense_latency_p50_ms")), _ms(r.get("int8_latency_p50_ms"))]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    cell = lambda s: str(s).replace("|", "\\|")
    return ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows), ""]


def write_markdown(path: Path, summary: dict[str, Any], rows: list[dict[str, Any]], levels: list[Level],
                   plots: dict[str, str]) -> None:
    cfg = summary["config"]
    ok = [r for r in rows if r["status"] == "ok"]
    dense = next((r["acc_dense"] for r in ok if r.get("acc_dense") is not None), None)
    hw = summary["hardware"]
    baseline = cfg["checkpoint"] or f"trained by the recipe ({cfg['baseline_epochs']} epochs, lr {cfg['baseline_lr']})"
    lines = [f"# {cfg['model']} on {cfg['dataset']}: CMI and MIPP vs L1 / random / BN-scale at matched FLOPs", "",
             f"Mode: **{'quick (CPU subset)' if summary['quick'] else 'full'}**. {len(ok)} of {len(rows)} runs "
             f"finished; dense top-1 {_pct(dense)}. Written by `experiments/vgg16_cifar10.py`; how to "
             "reproduce it and what every column means: `docs/STUDY.md`.", "",
             "## Setup", "",
             f"- command: `{summary['command']}`",
             f"- started {summary['started']}, wall time {summary['wall_seconds'] / 60:.1f} min",
             f"- hardware: CPU {hw['cpu']} ({hw['cpu_count']} logical CPUs), "
             f"GPU {', '.join(hw['gpus']) or 'none'}; {hw['system']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
             f"- baseline: {baseline}",
             f"- data: {cfg['dataset']}{' ' + cfg['data_dir'] if cfg['data_dir'] else ''}, normalization "
             f"{cfg['normalization']}, train subset "
             f"{cfg['train_subset'] or 'all'}, test subset {cfg['test_subset'] or 'all'}",
             f"- fine-tuning: {cfg['finetune_epochs']} epochs, SGD nesterov lr {cfg['lr']} cosine, batch "
             f"{cfg['batch_size']}, wd {cfg['weight_decay']}, label smoothing {cfg['label_smoothing']}; distillation "
             f"(KD) alpha {cfg['distill_alpha']}, T {cfg['distill_temperature']}; device {summary['device']}",
             f"- ranking samples {cfg['rank_samples']}, BN re-estimation on {cfg['bn_recalibration']} images, "
             f"INT8 calibration {cfg['calibration_method']} on {cfg['calibration_samples']} images",
             f"- latency: ONNX Runtime CPU on this host, target profile {cfg['target']}, {cfg['bench_runs']} runs, "
             "batch 1, p50", ""]
    lines += ["## FLOPs levels", "",
              "Baselines (uniform keep ratio per layer) are matched to each level's FLOPs fraction.", ""]
    lines += _md_table(["level", "FLOPs kept", "from", "matched uniform keep ratio", "predicted FLOPs at it"],
                       [[lv.key, _pct(lv.fraction), ", ".join(lv.sources),
                         "-" if lv.keep_ratio is None else f"{lv.keep_ratio:g}", _pct(lv.predicted)] for lv in levels])
    for distill in (False, True):
        mine = [r for r in ok if r["distill"] == distill]
        if not mine:
            continue
        lines += [f"## Fine-tuned {'with' if distill else 'without'} distillation", ""]
        lines += _md_table(TABLE_HEADER, _table_rows(mine, levels))
        plot = plots.get("kd" if distill else "ce")
        if plot:
            lines += [f"![accuracy vs FLOPs, {'with' if distill else 'without'} distillation]({plot})", ""]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += _md_table(["variant", "distill", "error"],
                           [[r["name"], _distill_tag(r["distill"]), r.get("error", "?")] for r in failed])
    path.write_text("\n".join(lines).rstrip() + "\n")


def write_outputs(out_dir: Path, work: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                  levels: list[Level]) -> dict[str, Path]:
    from toolchain.stages.report import write_sweep_report

    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    cfg = summary["config"]
    for distill, key, png in ((False, "ce", "accuracy_vs_flops.png"), (True, "kd", "accuracy_vs_flops_distill.png")):
        mine = [{**r, "label": r["name"], "criterion": "cmi budget" if r["group"] == "cmi-budget" else r["criterion"]}
                for r in rows if r["status"] == "ok" and r["distill"] == distill]
        if not mine:
            continue
        folder = work / f"report-{key}"
        how = "with distillation from the dense model" if distill else "without distillation"
        write_sweep_report(folder, mine, title=f"{cfg['model']} on {cfg['dataset']}: fine-tuned {how}",
                           notes=[f"{len(mine)} variants from one baseline; baselines at matched FLOPs."])
        src = folder / "plots" / "accuracy_vs_flops.png"
        if src.is_file():
            shutil.copyfile(src, out_dir / png)
            plots[key] = png
    (out_dir / "results.json").write_text(json.dumps(
        {**summary, "levels": [{**dataclasses.asdict(lv), "kinds": sorted(lv.kinds)} for lv in levels],
         "plots": plots, "rows": rows}, indent=1, default=str) + "\n")
    write_markdown(out_dir / "results.md", summary, rows, levels, plots)
    return {"json": out_dir / "results.json", "md": out_dir / "results.md",
            **{k: out_dir / v for k, v in plots.items()}}


# -- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from toolchain.cli import _add_config_flags

    parser = argparse.ArgumentParser(
        prog="experiments/vgg16_cifar10.py",
        description="VGG16-BN / CIFAR-10 study: CMI and MIPP vs L1/random/BN-scale at matched FLOPs, from one "
                    "baseline. Every build-edge option is accepted and applies to every variant (criterion, "
                    "keep ratio, criterion options and distillation are set per variant).")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset on the CPU in minutes: cmi per-layer/forward/scree, cmi flops=0.4, "
                             "L1 and random matched to the first, L1 matched to the second; "
                             f"{QUICK_PRESET} unless given")
    parser.add_argument("--config", default=os.path.relpath(DEFAULT_RECIPE),
                        help="YAML recipe (baseline and fine-tuning; flags override it), default %(default)s")
    parser.add_argument("--out-dir", default="docs/study", help="summary files (results.md/json, plots)")
    parser.add_argument("--groups", default=None,
                        help="groups to run, of cmi,cmi-budget,mipp,baseline (default: all; --quick: all but mipp)")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="baseline criteria, default %(default)s")
    parser.add_argument("--level-tol", type=float, default=0.005,
                        help="FLOPs fractions closer than this share one matched level (default %(default)s)")
    parser.add_argument("--plan-only", action="store_true", help="print the primary variants and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    _add_config_flags(parser)
    return parser


def resolve_base(args: argparse.Namespace) -> tuple[Config, list[bool]]:
    """defaults <- recipe YAML <- mode preset <- CIFAR-10 data defaults <- flags; returns (config, distill modes)."""
    from toolchain.cli import _flag_values

    if any(k.startswith("opt_") and v is not None for k, v in vars(args).items()):
        raise UserError("criterion options (--formulation, --cutoff, --budget, --mipp-estimator, ...) are set per "
                        "variant by the study; they cannot be given")
    flags = _flag_values(args)
    for key in ("criterion", "keep_ratio", "keep"):
        if flags.get(key) is not None:
            raise UserError(f"--{key.replace('_', '-')} is set per variant by the study")
    distill_flag = flags.pop("distill", None)
    file_values = load_yaml(args.config) if args.config else {}
    values: dict[str, Any] = {**STUDY_DEFAULTS, **file_values, **(QUICK_PRESET if args.quick else FULL_PRESET)}
    if flags.get("dataset") is None and "dataset" not in file_values:
        values.update(CIFAR_DATA)
    checkpoint = flags.pop("checkpoint", None)
    if checkpoint is None:  # the shared baseline when it fits, else the recipe trains one
        model = flags.get("model") or values["model"]
        dataset = flags.get("dataset") or values["dataset"]
        if model == "vgg16_bn" and dataset in ("imagefolder", "cifar10") and SHARED_CHECKPOINT.is_file():
            checkpoint = os.path.relpath(SHARED_CHECKPOINT)
    elif checkpoint.lower() in ("", "none"):
        checkpoint = None
    values["checkpoint"] = checkpoint
    values.pop("distill", None)
    values.pop("run_name", None)
    cfg = build_config(values, flags)
    distill = [distill_flag] if distill_flag is not None else ([False] if args.quick else [False, True])
    return cfg, distill


def main(argv: list[str] | None = None) -> int:
    from toolchain.train import distributed as dist_utils

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ["BUILD_EDGE_NO_PROGRESS"] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("build_edge").setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.setLevel(logging.INFO)
    if dist_utils.launched_by_torchrun():
        sys.stderr.write("study: run it as one process; it runs the variants one after another on one device\n")
        return 2
    try:
        base, distill = resolve_base(args)
        groups = {g.strip() for g in (args.groups or ",".join(QUICK_GROUPS if args.quick else GROUP_ORDER)).split(",")
                  if g.strip()}
        unknown = groups - set(GROUP_ORDER)
        criteria = [c.strip() for c in args.baselines.split(",") if c.strip()]
        if unknown or not set(criteria) <= set(BASELINES):
            raise UserError(f"unknown group(s) or baseline(s): {sorted(unknown | (set(criteria) - set(BASELINES)))}")
        primaries = primary_plan(base, quick=args.quick, distill=distill, groups=groups)
        if args.plan_only:
            for v in primaries:
                print(f"{v.group:11s} {v.name:35s} {_distill_tag(v.cfg.distill)}  {v.cfg.resolved_run_name}")
            return 0
        return run_study(args, argv, base, distill, primaries, criteria if "baseline" in groups else [])
    except UserError as e:
        sys.stderr.write(f"study: error: {e}\n")
        return 2


def run_study(args: argparse.Namespace, argv: list[str], base: Config, distill: list[bool],
              primaries: list[Variant], criteria: list[str]) -> int:
    from toolchain.pipeline import preflight
    from toolchain.stages.bundle import library_versions

    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    pre = preflight(base)  # bad data dir, checkpoint, target: one line now, not after an hour
    work = Path(base.out)
    failures = work / "study-failures"
    script = os.path.relpath(Path(__file__).resolve())
    summary = {"study": "vgg16_cifar10", "quick": args.quick, "command": shlex.join(["python", script, *argv]),
               "python": sys.executable, "cwd": os.getcwd(), "started": started.isoformat(timespec="seconds"),
               "hardware": hardware(),
               "versions": library_versions(), "device": str(pre.device), "config": base.to_dict(),
               "distill_modes": distill, "level_tol": args.level_tol, "budgets": list(QUICK_BUDGETS if args.quick
                                                                                       else BUDGETS)}
    rows: list[dict[str, Any]] = []

    def checkpoint_progress() -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "study-progress.json").write_text(json.dumps({**summary, "rows": rows}, indent=1, default=str))

    plan_total = len(primaries)
    for i, v in enumerate(primaries, 1):
        log.info("study %d/%d+: %s (%s)", i, plan_total, v.name, _distill_tag(v.cfg.distill))
        rows.append(run_variant(v, failures))
        checkpoint_progress()

    # matched FLOPs levels: what the primaries reached, and the nominal budgets (full run)
    reached = {}
    for r in rows:
        if r["status"] == "ok":
            reached.setdefault(r["name"], (r["name"], r["group"], float(r["flops_ratio"])))
    budgets = [] if args.quick else list(BUDGETS)  # quick: only the levels the variants reached
    levels = flops_levels(list(reached.values()), budgets, args.level_tol)
    baselines: list[Variant] = []
    if criteria and levels:
        model = create_model(base.model, num_classes=pre.num_classes)
        flops = FlopsModel(model, (3, base.image_size, base.image_size), round_to=base.round_to)
        baselines = baseline_plan(base, levels, criteria=criteria, distill=distill,
                                  ratio_for=lambda f: matched_keep_ratio(flops, f), predict=flops.fraction,
                                  quick=args.quick)
    for i, v in enumerate(baselines, 1):
        log.info("study baseline %d/%d: %s (%s) for %s", i, len(baselines), v.name, _distill_tag(v.cfg.distill),
                 v.level)
        rows.append(run_variant(v, failures))
        checkpoint_progress()

    summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    written = write_outputs(Path(args.out_dir), work, summary, rows, levels)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"study: {ok}/{len(rows)} runs ok in {summary['wall_seconds'] / 60:.1f} min")
    for r in rows:
        if r["status"] == "ok":
            print(f"  {r['name']:32s} {_distill_tag(r['distill'])}  FLOPs {_pct(r['flops_ratio'])}  "
                  f"top-1 {_pct(r['acc_finetuned'])}  INT8 {_pct(r.get('acc_int8'))}  "
                  f"p50 {_ms(r.get('latency_p50_ms'))} ms")
        else:
            print(f"  {r['name']:32s} {_distill_tag(r['distill'])}  FAILED {r['error']}")
    for name, path in written.items():
        print(f"study {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
