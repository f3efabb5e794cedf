"""The VGG16-BN / CIFAR-10 study: do pruned models keep their accuracy, and does the method beat the baselines?

From one dense baseline (the shared checkpoint, or one trained by ``configs/vgg16_cifar10_gpu.yaml``) every
variant is one full pipeline run (its own bundle under ``--out``, default ``runs/study``); the stage cache
shares the data, the baseline, the ranking and the measured sensitivity across the runs that agree on them.

``--plan headline`` (the default): the configuration's criterion (the package default, recon with
compensation) at ``--budget flops=0.4``, ``flops=0.2`` and ``channels=0.667`` (1/3 of the filters removed),
then L1 and random at the uniform keep ratio whose FLOPs match what the first budget reached, all fine-tuned
with distillation from the dense model. ``--gpu``: the baseline trained by the recipe (100 epochs), then
flops=0.4 and 0.2, sized for 15 minutes of one H100/H200. Writes ``results.md``/``results.json`` and
``accuracy_vs_flops.png`` to ``--out-dir`` (default ``docs/study``) from the bundles' manifests.

``--plan cmi`` (implied by ``--quick``), the earlier study:

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

    # the headline plan on the CPU (what docs/study holds: its recipe, from studies run in two sessions)
    .venv/bin/python experiments/vgg16_cifar10.py --target jetson --finetune-epochs 15 --lr 0.01 --cutout 16 \
        --bench-runs 30
    # the GPU plan
    .venv/bin/python experiments/vgg16_cifar10.py --gpu
    # one table from headline studies run with one recipe in several sessions (runs nothing); a study repeated
    # with --seed 1 merges beside the first (its runs named "... seed 1"; the findings add the means over seeds)
    .venv/bin/python experiments/vgg16_cifar10.py --merge docs/study/a/results.json docs/study/b/results.json
    # cmi plan, quick CPU run (minutes): a few variants on subsets, 1 fine-tuning epoch
    .venv/bin/python experiments/vgg16_cifar10.py --quick --dataset imagefolder --data-dir .data/cifar10 \\
        --normalization cifar10 --checkpoint ../shared/models/vgg16_bn_cifar10.pt
    # cmi plan, full run on one GPU
    .venv/bin/python experiments/vgg16_cifar10.py --plan cmi --device cuda --dataset imagefolder \\
        --data-dir .data/cifar10 --normalization cifar10 --checkpoint ../shared/models/vgg16_bn_cifar10.pt \\
        --finetune-epochs 30

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
from toolchain.cost import CostModel
from toolchain.errors import UserError
from toolchain.models import create_model
from toolchain.ranking.base import LayerRanking
from toolchain.ranking.cutoffs import parse_budget
from toolchain.report import Manifest
from toolchain.report import Variant as ReportVariant  # a benchmarked variant's name (the study has its own)
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
ROW_ORDER = ("budget", *GROUP_ORDER)  # table order within a FLOPs level

# the headline plan (issue 12): the default criterion under budgets, L1 and random at the first budget's FLOPs
PLANS = ("headline", "cmi")
HEADLINE_BUDGETS = ("flops=0.4", "flops=0.2", "channels=0.667")  # channels=0.667: the papers' 1/3 of filters
HEADLINE_MATCHED = ("l1", "random")
GPU_BUDGETS = ("flops=0.4", "flops=0.2")
# one H100/H200 in 15 minutes: the recipe's 100-epoch baseline at a larger batch (lr scaled with it), two
# budgets fine-tuned for 20 epochs each; bf16 and channels_last are the pipeline's on CUDA, the data set
# sits on the GPU (DeviceLoader), crop+flip are done there. Fine-tunes with cutout 16: on the CPU it lifted the
# same 15-epoch fine-tune by 0.43 pt at flops=0.4 and 0.62 at flops=0.2 (docs/STUDY.md, one seed each)
GPU_PRESET: dict[str, Any] = {"device": "cuda", "checkpoint": None, "baseline_epochs": 100, "batch_size": 256,
                              "baseline_lr": 0.15, "lr": 0.02, "finetune_epochs": 20, "cutout": 16, "bench_runs": 50}
# published anchors on VGG16/CIFAR-10 (their own baselines and recipes, not rerun here)
ANCHORS = (
    {"method": "HRankPlus", "source": "Lin et al., HRank / HRankPlus (github.com/lmbxmu/HRankPlus)",
     "baseline": 0.9396, "rows": ((0.581, 0.9373), (0.666, 0.9356), (0.786, 0.9310))},
)


# -- matched FLOPs -----------------------------------------------------------------------------------------
class FlopsModel:
    """FLOPs of a model pruned with a uniform keep ratio, without pruning it: the package's cost model
    (``toolchain.cost``, which equals the flop counter on pruned models) at the kept counts the pipeline's
    prune stage computes for that ratio (``prune.resolve_keep_counts``: rounding, ``round_to``, at least one
    channel)."""

    def __init__(self, model: torch.nn.Module, input_shape: Sequence[int], *, round_to: int = 1):
        model = model.eval()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.round_to = round_to
        self.layers = prune_stage.find_prunable_layers(model, torch.zeros(2, *self.input_shape))
        self.cost = CostModel.of(model, self.input_shape, self.layers)
        self.dense_total = self.cost.dense_total["flops"]
        self._rankings = {layer.name: LayerRanking(order=[], scores=[]) for layer in self.layers}

    def counts(self, ratio: float) -> dict[str, int]:
        return prune_stage.resolve_keep_counts(self.layers, self._rankings, keep_ratio=ratio, per_layer={},
                                               round_to=self.round_to)

    def fraction_of_counts(self, counts: dict[str, int]) -> float:
        return self.cost.fraction("flops", counts)

    def fraction(self, ratio: float) -> float:
        """Pruned FLOPs / dense FLOPs (as ``count_flops_params`` counts them) at a uniform keep ratio."""
        return self.fraction_of_counts(self.counts(ratio))


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


def _trained_baseline(cfg: dict[str, Any]) -> str:
    """The setup line's baseline when the study trained it."""
    return (f"trained by the recipe ({cfg['baseline_epochs']} epochs, lr {cfg['baseline_lr']}"
            f"{_cutout(cfg, 'baseline_cutout')})")


def _cutout(cfg: dict[str, Any], key: str = "cutout") -> str:
    """A setup line's cutout clause ("" when off, and for configs written before the option)."""
    return f", cutout {cfg[key]}" if cfg.get(key) else ""


def _ema(cfg: dict[str, Any]) -> str:
    """A setup line's weight-averaging clause ("" when off, and for configs written before the option)."""
    return f", ending on the weights' moving average (decay {cfg['ema_decay']})" if cfg.get("ema_decay") else ""


def _features(cfg: dict[str, Any]) -> str:
    """A setup line's clause for distillation at the kept channels ("" when off, and for configs before it)."""
    w = cfg.get("distill_features")
    return f", the cut layers' outputs matched to the dense model's at the kept channels (weight {w:g})" if w else ""


def _flip(cfg: dict[str, Any]) -> str:
    """A setup line's clause for the mirror-averaged teacher ("" when off, and for configs before it)."""
    return ", the teacher's logits averaged over each image and its mirror" if cfg.get("distill_flip") else ""


def _distill_tag(distill: bool) -> str:
    return "KD" if distill else "CE"


def _seed_tag(seed: int) -> str:
    """A run made with another seed than the default says so in its name: a study repeated with ``--seed 1``
    merges beside the first one (``--merge``) instead of clashing with its runs' names."""
    return "" if seed == Config.seed else f" seed {seed}"


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


def headline_plan(base: Config, *, budgets: Sequence[str] = HEADLINE_BUDGETS,
                  distill: Sequence[bool] = (True,)) -> list[Variant]:
    """The configuration's criterion (the package default unless ``--criterion``) under each budget."""
    tag = base.run_name or base.model
    keyed = _with(base, run_name=f"{tag}-{base.criterion}")
    return [Variant(f"{base.criterion} {cfg.budget}{_seed_tag(base.seed)}", "budget", label, cfg)
            for label, cfg in variant_configs(keyed, {"budget": list(budgets), "distill": list(distill)})]


def flops_levels(reached: Sequence[tuple[str, str, float]], budgets: Sequence[float], tol: float) -> list[Level]:
    """Merge the FLOPs fractions the primaries reached ``(name, group, fraction)`` and the nominal budgets
    into levels: fractions within `tol` of a level's first (smallest) one join it. A level's fraction is
    the mean of the reached fractions it holds (the budget's nominal value when it holds none)."""
    points = [(f, name, "budget" if group in ("budget", "cmi-budget") else "cutoff", True)
              for name, group, f in reached]
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
                  quick: bool = False, random_seeds: int = 1) -> list[Variant]:
    """L1 / random / BN-scale at each level's matched uniform keep ratio (quick: L1 and random at the
    cutoff variants' levels, L1 alone at the budget levels). Random runs ``random_seeds`` seeds from the
    base seed on (one draw says little: three seeds of the uniform 40% cut span 85.5-85.9% one-shot with
    compensation, 62.0-66.9% without, docs/QUALITY.md); the first keeps the single-seed run's name and
    bundle, so adding seeds reuses it."""
    tag = base.run_name or base.model
    out: list[Variant] = []
    seen: set[tuple[str, float, bool, int]] = set()
    for level in levels:
        level.keep_ratio = ratio_for(level.fraction)
        level.predicted = predict(level.keep_ratio) if predict else None
        if quick:
            wanted = QUICK_BASELINES_AT_CUTOFF if "cutoff" in level.kinds else QUICK_BASELINES_AT_BUDGET
            names = [c for c in criteria if c in wanted]
        else:
            names = list(criteria)
        for criterion in names:
            seeds = range(base.seed, base.seed + (random_seeds if criterion == "random" else 1))
            for seed in seeds:
                extra = "" if seed == base.seed else f"-seed{seed}"
                keyed = _with(base, criterion=criterion, run_name=f"{tag}-{criterion}{extra}", criterion_options={},
                              seed=seed)
                for label, cfg in variant_configs(keyed, {"keep_ratio": [level.keep_ratio],
                                                          "distill": list(distill)}):
                    key = (criterion, cfg.keep_ratio, cfg.distill, seed)
                    if key in seen:  # two levels that round to the same counts: one run
                        continue
                    seen.add(key)
                    name = f"{criterion} @{level.keep_ratio:g}{_seed_tag(seed)}"
                    out.append(Variant(name, "baseline", label, cfg, level=level.key,
                                       target_flops=level.fraction, predicted_flops=level.predicted))
    return out


# -- running -----------------------------------------------------------------------------------------------
def stage_seconds(bundle: Path, manifest: dict[str, Any]) -> dict[str, float]:
    """Seconds each of the bundle's stages took when it was computed (its ``done.json``; a stage shared with
    another run counts the time of the run that computed it). A training stage resumed after a kill counts
    every epoch (the sum of its history's ``secs``), not only the invocation that finished it."""
    out = {}
    for stage, folder in (manifest.get("stages") or {}).items():
        done = bundle.parent / ".work" / folder / "done.json"
        try:
            result = json.loads(done.read_text())
        except (OSError, ValueError):
            continue
        seconds = float(result.get("seconds") or 0.0)
        epochs = [e.get("secs") for e in result.get("history") or [] if isinstance(e, dict)]
        if epochs and all(isinstance(v, (int, float)) for v in epochs):
            seconds = max(seconds, float(sum(epochs)))
        out[stage] = seconds
    return out


def study_row(v: Variant, bundle: Path) -> dict[str, Any]:
    """``sweep_row`` plus what the study's table shows beyond it, from the bundle's manifest."""
    from toolchain.cli import config_argv

    row = sweep_row(v.name, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    m = Manifest.parse(manifest).metrics
    count = (lambda x: None if x is None else int(x))
    row.update({
        "acc_onnxruntime": m.acc_onnxruntime, "acc_int8_host": m.acc_int8_host,
        "flops_dense": count(m.flops_dense), "flops_pruned": count(m.flops_pruned),
        "params_dense": count(m.params_dense), "params_pruned": count(m.params_pruned),
        "channels_dense": count(m.channels_dense),
        "int8_latency_p50_ms": m.p50_ms(ReportVariant("pruned", None, "int8")),
        "flops_reduction": 1.0 - m.flops_ratio, "params_reduction": 1.0 - m.params_ratio,
        "budget": v.cfg.budget, "test_images": manifest["data"]["test"], "train_images": manifest["data"]["train"],
        "compensation_seconds": manifest["metrics"].get("compensation_seconds"),
        "command": shlex.join(["build-edge", *config_argv(v.cfg)]),
    })
    seconds = stage_seconds(bundle, manifest)
    row["stage_seconds"] = seconds
    row["compute_seconds"] = round(sum(seconds.values()), 1)
    return row


def run_variant(v: Variant, failures_dir: Path) -> dict[str, Any]:
    from toolchain.pipeline import run_pipeline

    started = time.perf_counter()
    base = {"name": v.name, "group": v.group, "axes": v.label, "distill": v.cfg.distill, "level": v.level,
            "target_flops": v.target_flops, "predicted_flops": v.predicted_flops,
            "run_name": v.cfg.resolved_run_name, "seed": v.cfg.seed}
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
    # three significant digits, trailing zeros kept so that a column reads alike (4.00, not 4, beside 6.75)
    return "-" if not isinstance(x, (int, float)) else f"{x:#.3g}".rstrip(".")


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
        for r in sorted(by_level[lv.key], key=lambda r: (ROW_ORDER.index(r["group"]), r["name"])):
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
    baseline = cfg["checkpoint"] or _trained_baseline(cfg)
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
             f"(KD) alpha {cfg['distill_alpha']}, T {cfg['distill_temperature']}"
             f"{_cutout(cfg)}{_ema(cfg)}{_features(cfg)}{_flip(cfg)}; device {summary['device']}",
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


HEADLINE_HEADER = ["run", "FLOPs kept", "FLOPs red.", "params red.", "filters removed", "top-1 one-shot",
                   "top-1 fine-tuned", "vs dense (pp)", "top-1 INT8", "ORT p50 ms dense", "ORT p50 ms pruned",
                   "compute min (fine-tune)"]


def _headline_cells(r: dict[str, Any]) -> list[str]:
    removed, dense = r.get("channels_removed"), r.get("channels_dense")
    filters = "-" if removed is None else f"{removed} / {dense} ({removed / dense:.1%})" if dense else f"{removed}"
    seconds = r.get("stage_seconds") or {}
    minutes = "-" if not seconds else f"{r['compute_seconds'] / 60:.1f} ({seconds.get('finetune', 0.0) / 60:.1f})"
    return [r["name"], _pct(r.get("flops_ratio")), _pct(r.get("flops_reduction")), _pct(r.get("params_reduction")),
            filters, _pct(r.get("acc_oneshot")), _pct(r.get("acc_finetuned")),
            _pp(r.get("acc_finetuned"), r.get("acc_dense")), _pct(r.get("acc_int8")),
            _ms(r.get("dense_latency_p50_ms")), _ms(r.get("latency_p50_ms")), minutes]


def _first_budget_runs(budgets: Sequence[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The first budget's run of each study seed (one key, None, for a study not merged from several seeds):
    the run its study matched the baselines to."""
    leads: dict[Any, dict[str, Any]] = {}
    for r in budgets:
        if r.get("budget") == budgets[0].get("budget"):
            leads.setdefault(r.get("study_seed"), r)
    return leads


def headline_findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Plain sentences from the numbers: each budget against the dense model, the first budget against the
    matched baselines (the same FLOPs, the same fine-tune). Studies merged from several seeds (``study_seed``)
    compare each baseline with the first budget's run of its own study, then the means over seeds."""
    ok = [r for r in rows if r["status"] == "ok"]
    budgets = [r for r in ok if r["group"] == "budget"]
    out = []
    for r in budgets:
        delta = 100 * (r["acc_finetuned"] - r["acc_dense"])
        out.append(f"{r['name']}: {_pct(r['flops_reduction'], 1)} fewer FLOPs, top-1 {_pct(r['acc_finetuned'])} "
                   f"after fine-tuning ({delta:+.2f} pt vs the dense {_pct(r['acc_dense'])}; one-shot "
                   f"{_pct(r.get('acc_oneshot'))}).")
    by_budget: dict[Any, list[dict[str, Any]]] = {}  # a budget run repeated with other seeds: its mean, once
    for r in budgets:
        by_budget.setdefault((r.get("criterion"), r.get("budget")), []).append(r)
    for runs in by_budget.values():
        if len(runs) > 1:
            accs = [r["acc_finetuned"] for r in runs]
            mean_acc = sum(accs) / len(accs)
            out.append(f"{runs[0]['name']}, mean of {len(runs)} seeds ({', '.join(map(_pct, accs))}): "
                       f"{_pct(mean_acc)} after fine-tuning ({100 * (mean_acc - runs[0]['acc_dense']):+.2f} pt "
                       f"vs the dense {_pct(runs[0]['acc_dense'])}).")
    matched = [r for r in ok if r["group"] == "baseline"]
    if budgets and matched:
        leads = _first_budget_runs(budgets)
        for r in matched:
            lead = leads.get(r.get("study_seed"), budgets[0])
            out.append(f"{lead['name']} vs {r['name']} at {_pct(r['flops_ratio'], 1)} of the FLOPs: "
                       f"{100 * (lead['acc_finetuned'] - r['acc_finetuned']):+.2f} pt after the same fine-tune "
                       f"(one-shot {100 * ((lead.get('acc_oneshot') or 0) - (r.get('acc_oneshot') or 0)):+.2f} pt).")
        by_criterion: dict[Any, list[dict[str, Any]]] = {}  # several seeds of a baseline (random draws, say)
        for r in matched:
            by_criterion.setdefault(r.get("criterion"), []).append(r)

        def mean(runs: Sequence[dict[str, Any]]) -> float:
            return sum(r["acc_finetuned"] for r in runs) / len(runs)

        def seeds(runs: Sequence[dict[str, Any]]) -> str:
            return f"mean of {len(runs)} seeds: {', '.join(_pct(r['acc_finetuned']) for r in runs)}"

        first = list(leads.values())
        left = first[0]["name"] + (f" ({seeds(first)})" if len(first) > 1 else "")
        for criterion, runs in by_criterion.items():
            if len(runs) == 1 and len(first) == 1:
                continue
            # named after the first seed's run, which carries the plain name, when all are at one keep ratio
            name = runs[0]["name"] if len({r.get("keep_ratio") for r in runs}) == 1 else str(criterion)
            right = name + (f" ({seeds(runs)})" if len(runs) > 1 else "")
            out.append(f"{left} vs {right}: {100 * (mean(first) - mean(runs)):+.2f} pt after the same fine-tune.")
    return out


def draw_headline_plot(path: Path, rows: Sequence[dict[str, Any]], anchors: Sequence[dict[str, Any]] = ANCHORS) -> None:
    """Left: top-1 vs FLOPs kept (fine-tuned filled, one-shot hollow, dense dashed). Right: change vs each method's
    own dense baseline vs FLOPs reduction, ours beside the published anchors (their baselines differ)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["status"] == "ok"]
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    # one colour per criterion (the baselines differ from each other too); the matched baselines sit at the
    # budget's FLOPs, so their labels go to the left of the points and the budget runs' to the right
    palette = ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:gray"]
    colours: dict[str, str] = {}
    labels = []
    for r in ok:
        c = colours.setdefault(r.get("criterion") or r["name"], palette[len(colours) % len(palette)])
        x = 100 * r["flops_ratio"]
        side = {"xytext": (-5, 3), "ha": "right"} if r["group"] == "baseline" else {"xytext": (5, 3), "ha": "left"}
        left.scatter([x], [100 * r["acc_finetuned"]], color=c, zorder=3)
        if r.get("acc_oneshot") is not None:
            left.scatter([x], [100 * r["acc_oneshot"]], facecolors="none", edgecolors=c, zorder=3)
            left.plot([x, x], [100 * r["acc_oneshot"], 100 * r["acc_finetuned"]], color=c, lw=0.8, alpha=0.5)
        labels.append(left.annotate(r["name"], (x, 100 * r["acc_finetuned"]), textcoords="offset points",
                                    fontsize=7, **side))
        right.scatter([100 * r["flops_reduction"]], [100 * (r["acc_finetuned"] - r["acc_dense"])], color=c, zorder=3)
        labels.append(right.annotate(r["name"], (100 * r["flops_reduction"],
                                                 100 * (r["acc_finetuned"] - r["acc_dense"])),
                                     textcoords="offset points", fontsize=7, **side))
    dense = next((r["acc_dense"] for r in ok), None)
    if dense is not None:
        left.axhline(100 * dense, color="k", ls="--", lw=0.8, label=f"dense {100 * dense:.2f}%")
        left.legend(loc="lower right", fontsize=8)
    for a in anchors:
        xs = [100 * red for red, _ in a["rows"]]
        ys = [100 * (acc - a["baseline"]) for _, acc in a["rows"]]
        right.plot(xs, ys, "s--", color="tab:green", ms=4, lw=0.8,
                   label=f"{a['method']} (their paper, dense {100 * a['baseline']:.2f}%)")
    right.axhline(0.0, color="k", lw=0.8)
    # below the axes: inside, it covered whichever run sat in its corner
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    left.set(xlabel="FLOPs kept (% of dense)", ylabel="top-1 (%)",
             title="top-1 vs FLOPs (filled: fine-tuned, hollow: one-shot)")
    right.set(xlabel="FLOPs removed (%)", ylabel="top-1 change vs own dense (pt)", title="against published anchors")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.08)  # room for the labels beside the outermost points
        lo, hi = ax.get_xlim()
        if hi - lo < 20:  # runs at one FLOPs level: a 0.1-point-wide axis hid the labels and read as a spread
            mid = (lo + hi) / 2
            ax.set_xlim(mid - 10, mid + 10)
    fig.tight_layout()
    # the anchors set the right panel's span: a baseline labelled to the left of a point near its edge ran over
    # the axis, so widen it until the longest such label fits (its width measured in pixels)
    lefts = [(100 * r["flops_reduction"], r["name"]) for r in ok if r["group"] == "baseline"]
    if lefts:
        renderer = fig.canvas.get_renderer()
        lo, hi = right.get_xlim()
        width = right.get_window_extent(renderer).width
        for x, name in lefts:
            label = right.text(0, 0, name, fontsize=7)
            share = min(0.9, (label.get_window_extent(renderer).width + 24) / width)  # of the axis width
            label.remove()
            lo = min(lo, (x - share * hi) / (1 - share))  # (x - lo) / (hi - lo) >= share
        right.set_xlim(lo, hi)
    _separate_labels(fig, labels)
    fig.savefig(path, dpi=120)


def _separate_labels(fig: Any, labels: Sequence[Any]) -> None:
    """Move labels down until none overlaps one above it: runs a few hundredths of a point apart (L1 and a random
    seed, say) had their names drawn over each other."""
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for label in sorted(labels, key=lambda a: -a.get_window_extent(renderer).y1):  # top first
        for _ in range(len(labels)):
            box = label.get_window_extent(renderer)
            hit = next((b for b in placed if box.overlaps(b)), None)
            if hit is None:
                break
            dx, dy = label.xyann
            label.xyann = (dx, dy - ((box.y1 - hit.y0) + 1) * 72 / fig.dpi)  # offset points from pixels
        placed.append(label.get_window_extent(renderer))


def write_headline_markdown(path: Path, summary: dict[str, Any], rows: list[dict[str, Any]], plot: str | None) -> None:
    cfg, hw = summary["config"], summary["hardware"]
    ok = [r for r in rows if r["status"] == "ok"]
    dense = next((r["acc_dense"] for r in ok), None)
    test_images = next((r["test_images"] for r in ok), None)
    baseline = cfg["checkpoint"] or _trained_baseline(cfg)
    # a study stopped before its end says which planned runs it has not reached, not "n of n"
    planned = summary.get("planned") or [r["name"] for r in rows]
    reached = {r["name"] for r in rows}
    pending = [name for name in planned if name not in reached]
    merged = summary.get("merged_from") or []
    lines = [f"# {cfg['model']} on {cfg['dataset']}: do pruned models keep their accuracy?", "",
             f"{len(ok)} of {len(planned)} planned runs finished"
             + (f" (not run yet: {', '.join(pending)})" if pending else "")
             + f"; dense top-1 {_pct(dense)} on {test_images} test images. "
             f"Written by `experiments/vgg16_cifar10.py` from the bundles' manifests"
             + (f" (by way of the results.json of {len(merged)} studies with one recipe, listed under Setup)"
                if merged else "") + "; see `docs/STUDY.md`.", ""]
    lines += ["## What it shows", "", *(f"- {line}" for line in headline_findings(rows)), ""]
    lines += ["## Results", ""]
    lines += _md_table(HEADLINE_HEADER, [_headline_cells(r) for r in ok])
    if plot:
        lines += [f"![accuracy vs FLOPs]({plot})", ""]
    lines += ["## Published anchors (from their papers, their own baselines; not rerun here)", ""]
    lines += _md_table(["method", "their dense top-1", "FLOPs red.", "top-1", "vs their dense (pp)", "source"],
                       [[a["method"], _pct(a["baseline"]), _pct(red, 1), _pct(acc), _pp(acc, a["baseline"]),
                         a["source"]] for a in ANCHORS for red, acc in a["rows"]])
    ended = f"finished {summary['finished']}" if summary.get("finished") else "still running when this was written"
    lines += ["## Setup", ""]
    mixed = bool(summary.get("mixed_hardware"))
    host = "each run's machine" if mixed else "this host"
    machine = ("**not one machine**: each study's above; a run's latencies and compute minutes are its own "
               "machine's (named under Runs), so they compare only within one machine") if mixed else _machine(hw)
    if merged:
        lines += [f"- merged by `{summary['command']}` from {len(merged)} studies (each run's compute minutes below "
                  "are the seconds its stages took when they were computed):"]
        lines += [f"  - `{m['command']}`: started {m['started']}, "
                  + (f"finished {m['finished']}" if m.get("finished") else "stopped before its end")
                  + f", wall time {float(m.get('wall_seconds') or 0.0) / 60:.1f} min"
                  + (f", on {_machine(m.get('hardware') or {})}" if mixed else "")
                  for m in merged]
    else:
        lines += [f"- study command: `{summary['command']}`",
                  f"- started {summary['started']}, {ended}; this invocation's wall time "
                  f"{summary['wall_seconds'] / 60:.1f} min (stages already in the cache are not recomputed: each "
                  "run's compute minutes below are the seconds its stages took when they were computed)"]
    lines += [f"- hardware: {machine}; device {summary['device']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
              f"- baseline: {baseline}",
              f"- data: {cfg['dataset']}{' ' + cfg['data_dir'] if cfg['data_dir'] else ''}, train subset "
              f"{cfg['train_subset'] or 'all'}, test subset {cfg['test_subset'] or 'all'}",
              f"- one-shot: criterion {cfg['criterion']} on {cfg['rank_samples'] or 'the default'} images, "
              f"compensation {cfg['compensation']} on {cfg['compensation_samples']} images, BN re-estimation on "
              f"{cfg['bn_recalibration']} images",
              f"- fine-tuning: {cfg['finetune_epochs']} epochs on every training image, SGD nesterov lr {cfg['lr']} "
              f"cosine, batch {cfg['batch_size']}, wd {cfg['weight_decay']}, label smoothing {cfg['label_smoothing']}, "
              f"distillation from the dense model alpha {cfg['distill_alpha']} T {cfg['distill_temperature']}"
              f"{_cutout(cfg)}{_ema(cfg)}{_features(cfg)}{_flip(cfg)}",
              f"- latency: ONNX Runtime CPU on {host}, {cfg['bench_runs']} runs, batch 1, p50", ""]
    lines += ["## Runs", ""]
    for r in rows:
        if r["status"] != "ok":
            lines += [f"- **{r['name']}**: FAILED {r.get('error', '?')}"]
            continue
        stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in r["stage_seconds"].items() if v >= 0.05 * 60)
        on = f" on {r['machine']}" if r.get("machine") else ""
        lines += [f"- **{r['name']}** ({r['compute_seconds'] / 60:.1f} min{on}: {stages}):", "",
                  f"  `{r['command']}`", ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


def write_outputs(out_dir: Path, work: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                  levels: list[Level]) -> dict[str, Path]:
    from toolchain.report import write_sweep_report

    out_dir.mkdir(parents=True, exist_ok=True)
    if summary.get("plan") == "headline":
        ok = [r for r in rows if r["status"] == "ok"]
        plot = None
        if ok:
            draw_headline_plot(out_dir / "accuracy_vs_flops.png", rows)
            plot = "accuracy_vs_flops.png"
        runs = [{k: r.get(k) for k in ("name", "group", "status", "budget", "keep_ratio", "criterion", "flops_ratio",
                                        "params_ratio", "channels_removed", "channels_dense", "acc_dense",
                                        "acc_oneshot", "acc_finetuned", "acc_int8", "test_images", "train_images",
                                        "latency_p50_ms", "dense_latency_p50_ms", "compute_seconds", "stage_seconds",
                                        "command", "error", "level", "target_flops", "seed", "study_seed",
                                        "machine")}
                for r in rows]
        (out_dir / "results.json").write_text(json.dumps(
            {**summary, "anchors": list(ANCHORS), "plot": plot, "runs": runs}, indent=1, default=str) + "\n")
        write_headline_markdown(out_dir / "results.md", summary, rows, plot)
        return {"json": out_dir / "results.json", "md": out_dir / "results.md",
                **({"plot": out_dir / plot} if plot else {})}
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


# -- merging studies ---------------------------------------------------------------------------------------
# a study's config is its base: budgets, keep ratios and the baselines' criteria are set per run, so of its values
# only where the bundles go may differ between studies with one recipe
PER_STUDY_KEYS = ("run_name", "out")
SAME_RUN_KEYS = ("flops_ratio", "acc_oneshot", "acc_finetuned", "acc_int8")  # not the command: a flag added later


def merge_results(paths: Sequence[Path], command: str, *,
                  mixed_hardware: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One headline table from the ``results.json`` of several headline studies run with one recipe: a table
    whose runs took several sessions (the stage cache does not outlive a checkout), or probes that each added
    runs. Every run once (by name), in the order given; the setup lists each source study's command.

    Refused (``UserError``, nothing written) when a file is not a headline study's results, the recipes differ
    (every config value but where the bundles go, and the baseline's training when a checkpoint is given; a
    value missing from an older file is the default), the hardware or library versions differ (latencies and
    minutes would not compare; ``mixed_hardware`` allows it, and every run then names its machine), a run reads
    differently in two files, or a baseline is matched to FLOPs other than the first budget run's (the findings
    compare the first budget with the baselines)."""
    defaults = build_config({}, {}).to_dict()
    sources: list[tuple[Path, dict[str, Any]]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--merge: cannot read {path}: {e}") from None
        if not isinstance(data, dict) or data.get("plan") != "headline" or not isinstance(data.get("runs"), list) \
                or not isinstance(data.get("config"), dict) or "started" not in data:
            raise UserError(f"--merge: {path} is not the results.json of a headline study")
        sources.append((Path(path), data))

    def recipe(data: dict[str, Any]) -> dict[str, Any]:
        cfg = {k: v for k, v in {**defaults, **data["config"]}.items() if k not in (*PER_STUDY_KEYS, "seed")}
        if cfg.get("checkpoint"):  # how a baseline would be trained does not matter when it is given
            cfg = {k: v for k, v in cfg.items() if not k.startswith("baseline_")}
        return cfg

    (first_path, first) = sources[0]
    for path, data in sources[1:]:
        for what, mine, theirs in (("recipe", recipe(first), recipe(data)),
                                   ("distillation", first.get("distill_modes"), data.get("distill_modes")),
                                   ("hardware", first.get("hardware"), data.get("hardware")),
                                   ("library versions", first.get("versions"), data.get("versions"))):
            if mine != theirs and not (what == "hardware" and mixed_hardware):
                diff = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k)) \
                    if isinstance(mine, dict) and isinstance(theirs, dict) else []
                raise UserError(f"--merge: {path} and {first_path} differ in {what}"
                                + (f" ({', '.join(diff)})" if diff else "")
                                + ("; --mixed-hardware merges them, each run naming its machine"
                                   if what == "hardware" else ""))
    mixed = len({json.dumps(data.get("hardware"), sort_keys=True) for _, data in sources}) > 1
    runs: dict[str, dict[str, Any]] = {}
    for path, data in sources:
        # a study repeated with another seed: its runs carry the seed in their names (_seed_tag), and the
        # findings compare each baseline with the budget run of its own study
        study_seed = data["config"].get("seed", defaults["seed"])
        for run in data["runs"]:
            row = {"distill": (data.get("distill_modes") or [True])[0], **run}
            if row.get("study_seed") is None:  # a merged file's rows keep the seed of the study they came from
                row["study_seed"] = study_seed
            if mixed:  # its latencies and minutes are this machine's
                row["machine"] = _machine(data.get("hardware") or {})
            if row.get("flops_ratio") is not None:
                row["flops_reduction"] = 1.0 - row["flops_ratio"]
            if row.get("params_ratio") is not None:
                row["params_reduction"] = 1.0 - row["params_ratio"]
            seen = runs.get(row["name"])
            if seen is None:
                runs[row["name"]] = row
            elif any(seen.get(k) != row.get(k) for k in SAME_RUN_KEYS):
                raise UserError(f"--merge: the run {row['name']!r} reads differently in {path} and an earlier file")
    rows = list(runs.values())
    budgets = [r for r in rows if r.get("group") == "budget" and r.get("status") == "ok"]
    leads = _first_budget_runs(budgets)
    tol = float(first.get("level_tol") or 0.005)
    for r in rows:
        if r.get("group") != "baseline" or r.get("target_flops") is None:
            continue
        lead = leads.get(r.get("study_seed"), budgets[0] if budgets else None)
        if lead is None or abs(r["target_flops"] - lead["flops_ratio"]) > tol:
            raise UserError(f"--merge: {r['name']!r} is matched to {_pct(r['target_flops'])} of the FLOPs, not to "
                            "the first budget run's of its seed; give the file of the run it was matched to first")
    summary = {k: first.get(k) for k in ("study", "plan", "gpu", "quick", "hardware", "versions", "device",
                                         "distill_modes", "level_tol")}
    finished = [data.get("finished") for _, data in sources]
    summary.update({
        "command": command, "config": {**defaults, **first["config"], "run_name": None},
        "started": min(data["started"] for _, data in sources),
        "finished": None if None in finished else max(finished),
        "wall_seconds": round(sum(float(data.get("wall_seconds") or 0.0) for _, data in sources), 1),
        "budgets": [r["budget"] for r in budgets], "planned": [r["name"] for r in rows],
        "merged_from": [{"path": str(path), "command": data["command"], "started": data["started"],
                         "finished": data.get("finished"), "wall_seconds": data.get("wall_seconds"),
                         "hardware": data.get("hardware")} for path, data in sources],
        "mixed_hardware": mixed})
    return summary, rows


def _machine(hw: dict[str, Any]) -> str:
    gpus = ", ".join(hw.get("gpus") or []) or "none"
    return f"CPU {hw.get('cpu')} ({hw.get('cpu_count')} logical CPUs), GPU {gpus}; {hw.get('system')}"


# -- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from toolchain.cli import add_config_flags

    parser = argparse.ArgumentParser(
        prog="experiments/vgg16_cifar10.py",
        description="VGG16-BN / CIFAR-10 study from one baseline: the default criterion under budgets against L1 "
                    "and random at matched FLOPs (headline), or CMI and MIPP against L1/random/BN-scale (cmi). "
                    "Every build-edge option is accepted and applies to every variant (budgets, keep ratios and, "
                    "in the cmi plan, criteria and their options are set per variant).")
    parser.add_argument("--plan", choices=PLANS, default=None,
                        help="headline (default; cmi with --quick): the configuration's criterion (recon unless "
                             "--criterion) at "
                             f"--budget {', '.join(HEADLINE_BUDGETS)}, then {' and '.join(HEADLINE_MATCHED)} at the "
                             "FLOPs the first budget reached, all fine-tuned with distillation; cmi: the CMI/MIPP "
                             "variants against L1/random/BN-scale (issue 7)")
    parser.add_argument("--budgets", default=None,
                        help=f"headline budgets, comma-separated (default {','.join(HEADLINE_BUDGETS)}; "
                             f"--gpu: {','.join(GPU_BUDGETS)}); the first is the one the baselines match")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU plan: train the baseline by the recipe (100 epochs), then the headline plan at "
                             f"{', '.join(GPU_BUDGETS)} without matched baselines; {GPU_PRESET} unless given")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset on the CPU in minutes: cmi per-layer/forward/scree, cmi flops=0.4, "
                             "L1 and random matched to the first, L1 matched to the second; "
                             f"{QUICK_PRESET} unless given")
    parser.add_argument("--config", default=os.path.relpath(DEFAULT_RECIPE),
                        help="YAML recipe (baseline and fine-tuning; flags override it), default %(default)s")
    parser.add_argument("--out-dir", default="docs/study", help="summary files (results.md/json, plots)")
    parser.add_argument("--groups", default=None,
                        help="groups to run, of cmi,cmi-budget,mipp,baseline (default: all; --quick: all but mipp)")
    parser.add_argument("--baselines", default=None,
                        help=f"baseline criteria (default: headline {','.join(HEADLINE_MATCHED)}, --gpu none, "
                             f"cmi {','.join(BASELINES)})")
    parser.add_argument("--random-seeds", type=int, default=1,
                        help="seeds of the random baseline, from --seed on (default %(default)s); the first reuses "
                             "the single-seed run")
    parser.add_argument("--level-tol", type=float, default=0.005,
                        help="FLOPs fractions closer than this share one matched level (default %(default)s)")
    parser.add_argument("--plan-only", action="store_true", help="print the primary variants and exit")
    parser.add_argument("--mixed-hardware", action="store_true",
                        help="--merge: allow studies run on different machines (each run then names its machine; "
                             "latencies and minutes compare only within one)")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", default=None,
                        help="write one table to --out-dir from the results.json of headline studies run with one "
                             "recipe (each run once, in the order given; the baselines' budget first; studies may "
                             "differ in --seed, their runs named after it); runs nothing "
                             "and takes no other option but -q and --mixed-hardware")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    add_config_flags(parser)
    return parser


def resolve_base(args: argparse.Namespace) -> tuple[Config, list[bool]]:
    """defaults <- recipe YAML <- mode preset <- CIFAR-10 data defaults <- flags; returns (config, distill modes)."""
    from toolchain.cli import flag_values

    if any(k.startswith("opt_") and v is not None for k, v in vars(args).items()):
        raise UserError("criterion options (--formulation, --cutoff, --budget, --mipp-estimator, ...) are set per "
                        "variant by the study; they cannot be given")
    flags = flag_values(args)
    per_variant = ("keep_ratio", "keep", "budget") if args.plan == "headline" else ("criterion", "keep_ratio", "keep")
    for key in per_variant:
        if flags.get(key) is not None:
            raise UserError(f"--{key.replace('_', '-')} is set per variant by the study")
    if args.gpu and (args.quick or args.plan != "headline"):
        raise UserError("--gpu runs the headline plan; it cannot be combined with --quick or --plan cmi")
    distill_flag = flags.pop("distill", None)
    file_values = load_yaml(args.config) if args.config else {}
    preset = GPU_PRESET if args.gpu else QUICK_PRESET if args.quick else FULL_PRESET
    values: dict[str, Any] = {**STUDY_DEFAULTS, **file_values, **preset}
    if flags.get("dataset") is None and "dataset" not in file_values:
        values.update(CIFAR_DATA)
    checkpoint = flags.pop("checkpoint", None)
    if checkpoint is None and args.gpu:  # the GPU plan trains its own (>= 93.5%) baseline
        pass
    elif checkpoint is None:  # the shared baseline when it fits, else the recipe trains one
        model = flags.get("model") or values["model"]
        dataset = flags.get("dataset") or values["dataset"]
        if model == "vgg16_bn" and dataset in ("imagefolder", "cifar10") and SHARED_CHECKPOINT.is_file():
            checkpoint = os.path.relpath(SHARED_CHECKPOINT)
    elif checkpoint.lower() in ("", "none"):
        checkpoint = None
    values["checkpoint"] = checkpoint
    values.pop("distill", None)
    values.pop("run_name", None)
    if distill_flag is not None:
        distill = [distill_flag]
    elif args.plan == "headline":
        distill = [True]
    else:
        distill = [False] if args.quick else [False, True]
    for key in ("distill_features", "distill_flip"):  # both read the teacher: every variant distils
        if flags.get(key):
            if not all(distill):
                raise UserError(f"--{key.replace('_', '-')} needs distillation in every variant (the dense model is "
                                "the teacher): drop --no-distill, or use the headline plan")
            values["distill"] = True  # the base is checked like a run; each variant sets its own distill
    cfg = build_config(values, flags)
    return cfg, distill


def main(argv: list[str] | None = None) -> int:
    from toolchain.train import distributed as dist_utils

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.plan = args.plan or ("cmi" if args.quick else "headline")
    if args.quiet:
        os.environ["BUILD_EDGE_NO_PROGRESS"] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("build_edge").setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.setLevel(logging.INFO)
    if dist_utils.launched_by_torchrun():
        sys.stderr.write("study: run it as one process; it runs the variants one after another on one device\n")
        return 2
    try:
        if args.merge is not None:
            return merge_studies(args, argv)
        if args.mixed_hardware:
            raise UserError("--mixed-hardware goes with --merge")
        base, distill = resolve_base(args)
        if args.plan == "headline":
            default = "" if args.gpu else ",".join(HEADLINE_MATCHED)
            criteria = [c.strip() for c in (default if args.baselines is None else args.baselines).split(",")
                        if c.strip()]
            budgets = [b.strip() for b in (args.budgets or ",".join(GPU_BUDGETS if args.gpu else HEADLINE_BUDGETS))
                       .split(",") if b.strip()]
            for b in budgets:
                parse_budget(b)
            if not budgets or args.groups:
                raise UserError("the headline plan needs at least one --budgets value and takes no --groups")
            primaries = headline_plan(base, budgets=budgets, distill=distill)
        else:
            groups = {g.strip() for g in (args.groups or ",".join(QUICK_GROUPS if args.quick else GROUP_ORDER))
                      .split(",") if g.strip()}
            unknown = groups - set(GROUP_ORDER)
            criteria = [c.strip() for c in (args.baselines or ",".join(BASELINES)).split(",") if c.strip()]
            primaries = primary_plan(base, quick=args.quick, distill=distill, groups=groups)
            if unknown:
                raise UserError(f"unknown group(s): {sorted(unknown)}")
            criteria = criteria if "baseline" in groups else []
        if args.random_seeds < 1:
            raise UserError(f"--random-seeds must be at least 1, got {args.random_seeds}")
        if not set(criteria) <= set(BASELINES):
            raise UserError(f"unknown baseline(s): {sorted(set(criteria) - set(BASELINES))}")
        if args.plan_only:
            for v in primaries:
                print(f"{v.group:11s} {v.name:35s} {_distill_tag(v.cfg.distill)}  {v.cfg.resolved_run_name}")
            return 0
        return run_study(args, argv, base, distill, primaries, criteria)
    except UserError as e:
        sys.stderr.write(f"study: error: {e}\n")
        return 2


def merge_studies(args: argparse.Namespace, argv: list[str]) -> int:
    defaults = vars(build_parser().parse_args([]))
    extra = sorted(k for k, v in vars(args).items() if k not in ("merge", "mixed_hardware", "out_dir", "quiet", "plan")
                   and v != defaults.get(k))
    if extra:
        raise UserError(f"--merge takes only --out-dir, --mixed-hardware and -q, got --{extra[0].replace('_', '-')}")
    out_dir = Path(args.out_dir)
    if (out_dir / "results.json").resolve() in {Path(p).resolve() for p in args.merge}:
        raise UserError(f"--merge: --out-dir {out_dir} would overwrite one of the files merged")
    script = os.path.relpath(Path(__file__).resolve())
    summary, rows = merge_results([Path(p) for p in args.merge], shlex.join(["python", script, *argv]),
                                  mixed_hardware=args.mixed_hardware)
    written = write_outputs(out_dir, out_dir, summary, rows, [])
    print_rows(f"study: {len(rows)} runs merged from {len(args.merge)} studies", rows, written)
    return 0


def print_rows(title: str, rows: Sequence[dict[str, Any]], written: dict[str, Path]) -> None:
    print(title)
    for r in rows:
        if r["status"] == "ok":
            print(f"  {r['name']:32s} {_distill_tag(r['distill'])}  FLOPs {_pct(r['flops_ratio'])}  "
                  f"top-1 {_pct(r['acc_finetuned'])}  INT8 {_pct(r.get('acc_int8'))}  "
                  f"p50 {_ms(r.get('latency_p50_ms'))} ms")
        else:
            print(f"  {r['name']:32s} {_distill_tag(r['distill'])}  FAILED {r['error']}")
    for name, path in written.items():
        print(f"study {name}: {path}")


def run_study(args: argparse.Namespace, argv: list[str], base: Config, distill: list[bool],
              primaries: list[Variant], criteria: list[str]) -> int:
    from toolchain.pipeline import preflight
    from toolchain.stages.bundle import library_versions

    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    pre = preflight(base)  # bad data dir, checkpoint, target: one line now, not after an hour
    for v in primaries[1:] if args.plan == "headline" else ():  # and each budget's own settings
        preflight(v.cfg)
    work = Path(base.out)
    failures = work / "study-failures"
    script = os.path.relpath(Path(__file__).resolve())
    if args.plan == "headline":
        budgets_run = [v.cfg.budget for v in primaries if v.cfg.distill == distill[0]]
    else:
        budgets_run = [f"flops={b}" for b in (QUICK_BUDGETS if args.quick else BUDGETS)]
    summary = {"study": "vgg16_cifar10", "plan": args.plan, "gpu": args.gpu, "quick": args.quick,
               "command": shlex.join(["python", script, *argv]), "python": sys.executable, "cwd": os.getcwd(),
               "started": started.isoformat(timespec="seconds"), "hardware": hardware(),
               "versions": library_versions(), "device": str(pre.device), "config": base.to_dict(),
               "distill_modes": distill, "level_tol": args.level_tol, "budgets": budgets_run}
    rows: list[dict[str, Any]] = []

    def checkpoint_progress() -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "study-progress.json").write_text(json.dumps({**summary, "rows": rows}, indent=1, default=str))
        if args.plan == "headline" and rows:  # the docs show every finished run, even if the study is stopped
            write_outputs(Path(args.out_dir), work, {**summary, "finished": None,
                                                     "wall_seconds": round(time.perf_counter() - t0, 1)}, rows, [])

    # headline: the baselines match the first budget's FLOPs and run right after it (the comparison first)
    headline = args.plan == "headline"
    first, rest = (primaries[:1], primaries[1:]) if headline else (primaries, [])
    summary["planned"] = [v.name for v in primaries]  # the baselines join once their keep ratios are known
    plan_total = len(primaries)
    for i, v in enumerate(first, 1):
        log.info("study %d/%d+: %s (%s)", i, plan_total, v.name, _distill_tag(v.cfg.distill))
        rows.append(run_variant(v, failures))
        checkpoint_progress()

    # matched FLOPs levels: what the primaries reached, and the nominal budgets (full cmi run)
    reached = {}
    for r in rows:
        if r["status"] == "ok":
            reached.setdefault(r["name"], (r["name"], r["group"], float(r["flops_ratio"])))
    budgets = [] if args.quick or headline else list(BUDGETS)  # else only the levels the variants reached
    levels = flops_levels(list(reached.values()), budgets, args.level_tol)
    baselines: list[Variant] = []
    if criteria and levels:
        model = create_model(base.model, num_classes=pre.num_classes)
        flops = FlopsModel(model, (3, base.image_size, base.image_size), round_to=base.round_to or 1)
        baselines = baseline_plan(base, levels, criteria=criteria, distill=distill,
                                  ratio_for=lambda f: matched_keep_ratio(flops, f), predict=flops.fraction,
                                  quick=args.quick, random_seeds=args.random_seeds)
    summary["planned"] = [v.name for v in (*first, *baselines, *rest)]
    for i, v in enumerate(baselines, 1):
        log.info("study baseline %d/%d: %s (%s) for %s", i, len(baselines), v.name, _distill_tag(v.cfg.distill),
                 v.level)
        rows.append(run_variant(v, failures))
        checkpoint_progress()
    for i, v in enumerate(rest, len(first) + 1):
        log.info("study %d/%d: %s (%s)", i, plan_total, v.name, _distill_tag(v.cfg.distill))
        rows.append(run_variant(v, failures))
        checkpoint_progress()

    summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    written = write_outputs(Path(args.out_dir), work, summary, rows, levels)
    ok = sum(r["status"] == "ok" for r in rows)
    print_rows(f"study: {ok}/{len(rows)} runs ok in {summary['wall_seconds'] / 60:.1f} min", rows, written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
