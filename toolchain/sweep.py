"""Sweeps: several criteria or budgets on the same baseline and data, compared side by side.

Every variant is a full pipeline run (its own bundle); the stage cache shares what the variants
agree on (data, baseline, and rankings across budgets). The sweep folder holds one table
(sweep.json, report.md/html) and one accuracy-vs-FLOPs plot.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path
from typing import Any

from toolchain.config import Config, build_config
from toolchain.errors import UserError
from toolchain.pipeline import preflight, run_pipeline
from toolchain.report import Manifest, Variant, write_sweep_report
from toolchain.util import atomic_write_json

log = logging.getLogger("build_edge")


def parse_axes(items: list[str], criterion_keys: set[str]) -> dict[str, list[Any]]:
    """``["criterion=l1,random", "keep_ratio=0.5,0.4"]`` -> ordered axes; values parsed as YAML scalars."""
    import yaml

    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise UserError(f"--sweep expects KEY=V1,V2,..., got {item!r}")
        if key not in Config.__dataclass_fields__ and key not in criterion_keys:
            raise UserError(f"--sweep: unknown option {key!r}")
        axes[key] = [yaml.safe_load(v.strip()) for v in values.split(",")]
    return axes


def variant_configs(base: Config, axes: dict[str, list[Any]]) -> list[tuple[str, Config]]:
    """One validated config per combination of the axes' values, each with its own run name."""
    out = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        label = ",".join(f"{k}={v}" for k, v in values.items())
        settings = base.to_dict()
        options = dict(settings["criterion_options"])
        for key, value in values.items():
            if key in settings:
                settings[key] = value
            else:
                options[key] = value
        settings["criterion_options"] = options
        slug = "-".join(f"{v}" for v in combo).replace("=", "").replace("/", "_").replace(" ", "")
        settings["run_name"] = f"{base.resolved_run_name}--{slug}"
        out.append((label, build_config({}, settings)))
    return out


def sweep_row(label: str, bundle: Path) -> dict[str, Any]:
    """A bundle's row of a sweep table, read through the report's typed view of the manifest."""
    raw = json.loads((bundle / "manifest.json").read_text())
    man = Manifest.parse(raw)
    m = man.metrics
    count = (lambda x: None if x is None else int(x))
    return {"label": label, "criterion": man.criterion, "criterion_options": man.criterion_options,
            "keep_ratio": raw["config"]["keep_ratio"], "flops_ratio": m.flops_ratio, "params_ratio": m.params_ratio,
            "channels_removed": count(m.channels_removed), "acc_dense": m.acc_dense, "acc_pruned": m.acc_pruned,
            "acc_pruned_bn_recalibrated": m.acc_pruned_bn_recalibrated, "acc_oneshot": m.acc_oneshot,
            "acc_finetuned": m.acc_finetuned, "acc_int8": m.acc_int8,
            "latency_p50_ms": m.p50_ms(Variant("pruned", None, "fp32")),
            "dense_latency_p50_ms": m.p50_ms(Variant("dense", None, "fp32")), "bundle": bundle.name}


def run_sweep(base: Config, axes: dict[str, list[Any]]) -> Path:
    variants = variant_configs(base, axes)
    checked = [preflight(cfg) for _, cfg in variants]  # every variant's input, before the first one runs
    rows = []
    for i, ((label, cfg), pre) in enumerate(zip(variants, checked), 1):
        log.info("sweep %d/%d: %s", i, len(variants), label)
        rows.append(sweep_row(label, run_pipeline(cfg, pre)))
    folder = Path(base.out) / f"{base.resolved_run_name}--sweep"
    atomic_write_json(folder / "sweep.json", {"axes": axes, "base_config": dataclasses.asdict(base), "rows": rows})
    notes = [f"{len(rows)} variants of {base.model} on {base.dataset} from one baseline, swept over "
             + ", ".join(f"{k} in {v}" for k, v in axes.items()) + ". Each variant's bundle holds its full report."]
    write_sweep_report(folder, rows, title=f"build-edge sweep: {base.model} on {base.dataset}", notes=notes)
    return folder
