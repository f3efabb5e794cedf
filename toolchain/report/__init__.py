"""The bundle report: ``report.md`` and a self-contained ``report.html`` with plots in ``plots/*.png``.

``write_report(folder, manifest, rankings=..., sweep=..., device_results=...)`` turns a bundle's manifest
(plus, optionally, the criterion's rankings, a sweep over pruned variants and on-device results folded in by
``toolchain.kit.merge_device_results``) into one document, rendered twice: as markdown (plots referenced
as ``![..](plots/x.png)``) and as HTML (plots embedded as base64 data URIs, each wrapped in a link to its
PNG file, no external references). Every section is optional: a missing key only drops its plot or table.
A plot that fails to draw is logged and replaced by a sentence in the report; it never fails the bundle.

The parts: ``manifest`` (the typed view of what the report reads), ``sections`` (what each section says),
``plots`` (pure figure functions), ``document`` (markdown and HTML rendering) and ``format`` (numbers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from toolchain.report import plots, sections
from toolchain.report.document import PLOTS_DIR, Doc, draw
from toolchain.report.format import ms, num, pct
from toolchain.report.manifest import DeviceResults, Manifest, Metrics, Variant, read_rankings
from toolchain.report.plots import PLOTS
from toolchain.report.sections import verdict

__all__ = ["PLOTS", "PLOTS_DIR", "Manifest", "Metrics", "Variant", "verdict", "write_report", "write_sweep_report"]


def write_report(folder: Path, manifest: dict[str, Any], *, rankings: dict[str, Any] | None = None,
                 sweep: list[dict[str, Any]] | None = None,
                 device_results: dict[str, Any] | None = None) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into `folder`; returns the paths written.

    `rankings`: ``{layer: {"order", "scores", "keep", "info"}}`` (rankings.json; CMI curves in ``info["cmi"]``).
    `sweep`: one row per pruned variant tried (label, criterion, flops_ratio, params_ratio, acc_finetuned,
    acc_pruned_bn_recalibrated, acc_dense). `device_results`: the table of ``merge_device_results``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mf, ranks = Manifest.parse(manifest), read_rankings(rankings)
    title = f"build-edge report: {mf.model} on {mf.dataset} for {mf.target.name}"
    doc = Doc(folder)
    doc.h1(title)
    sections.intro(doc, mf)
    sections.summary(doc, mf)
    sections.accuracy(doc, mf, [r for r in (sweep or []) if isinstance(r, Mapping)])
    sections.channels(doc, mf, ranks)
    sections.cmi(doc, mf, ranks)
    sections.host_latency(doc, mf)
    sections.latency_budget(doc, mf)
    sections.device(doc, DeviceResults.parse(device_results))
    sections.memory(doc, mf)
    sections.roofline(doc, mf)
    sections.versions(doc, mf)
    written = doc.write(title)
    figures = doc.figures()
    for name in PLOTS:  # a plot of an earlier report of this folder that has no data now would be stale
        stale = folder / PLOTS_DIR / f"{name}.png"
        if stale not in figures:
            stale.unlink(missing_ok=True)
    return written


def write_sweep_report(folder: Path, rows: list[dict[str, Any]], *, title: str,
                       notes: Sequence[str] = ()) -> list[Path]:
    """One table and one accuracy-vs-FLOPs plot for the variants of a sweep (same baseline, same data)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dense = next((r.get("acc_dense") for r in rows if num(r.get("acc_dense")) is not None), None)
    doc = Doc(folder)
    doc.h1(title)
    for note in notes:
        doc.p(note)
    draw(doc, "accuracy_vs_flops", "Accuracy vs FLOPs",
         "Top-1 accuracy vs FLOPs per image (% of dense) for every variant of the sweep: filled markers after "
         "fine-tuning, hollow before it (BN re-estimated). Dashed line and square: the dense model.",
         lambda: plots.accuracy_vs_flops(Metrics(acc_dense=num(dense)), rows))
    sections.sweep_table(doc, rows, dense)
    latency_rows = [[r["label"], ms(r.get("latency_p50_ms")), ms(r.get("dense_latency_p50_ms")),
                     pct(r.get("acc_int8")), r.get("bundle", "-")] for r in rows]
    doc.table(["variant", "pruned p50 batch 1 (measured)", "dense p50 batch 1 (measured)", "top-1 INT8",
               "bundle"], latency_rows)
    return doc.write(title)
