"""The report's plots: pure functions from data to a ``matplotlib.figure.Figure``, or None when there is nothing
to draw.

They draw with matplotlib's Agg canvas on ``Figure`` objects (no pyplot, so no global backend switch and
no GUI); ``document.draw`` saves them and turns a failure into a sentence in the report. Each function is
named after the PNG file it becomes (``PLOTS``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from toolchain.report.format import batch_key, bytes_mb, count, mb, ms, ms_bare, num, pct
from toolchain.report.manifest import CMILayer, Metrics

PLOTS = ("accuracy_vs_flops", "channels_per_layer", "cmi_curves", "latency", "device_latency", "memory", "roofline")
DPI = 110
_GREY, _BLUE, _ORANGE, _GREEN, _RED = "#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
_LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"}
RooflineGroup = tuple[str, str, dict[str, Any]]  # target, precision, {dense_ms, pruned_ms, bound_*, batch}


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _color(label: str, index: int) -> str:
    """By precision first, then dense/pruned: the same colour for a variant in every plot."""
    low = label.lower()
    if "int8" in low:
        return _ORANGE
    if "fp16" in low:
        return _GREEN
    if low.startswith("dense"):
        return _GREY
    if low.startswith("pruned"):
        return _BLUE
    return _PALETTE[index % len(_PALETTE)]


# -- accuracy vs FLOPs ----------------------------------------------------------------------------------------
def accuracy_vs_flops(metrics: Metrics, sweep: list[Any] | None):
    """The sweep's variants per criterion, or (no sweep) this bundle's accuracy at each step; the dense line."""
    rows = [r for r in (sweep or []) if isinstance(r, Mapping) and num(r.get("flops_ratio")) is not None]
    dense = metrics.acc_dense
    if dense is None:
        dense = next((num(r.get("acc_dense")) for r in rows if num(r.get("acc_dense")) is not None), None)
    ratio, tuned = metrics.flops_ratio, metrics.acc_finetuned
    if not rows and (ratio is None or (tuned is None and dense is None)):
        return None
    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    ys: list[float] = []
    callouts: list[tuple[str, float]] = []  # (text, y) next to this bundle's points (no sweep)
    if dense is not None:
        ax.axhline(100 * dense, color=_GREY, ls="--", lw=1, zorder=1)
        ax.plot([100], [100 * dense], marker="s", ms=8, color=_GREY, ls="none", zorder=3,
                label=f"dense ({pct(dense)})")
        ys.append(100 * dense)
    if rows:
        ys += _sweep_series(ax, rows)
    elif ratio is not None:  # always, without a sweep (see above)
        callouts = _bundle_steps(ax, metrics, ratio)
        ys += [y for _, y in callouts]
    if ratio is not None and tuned is not None:
        ax.plot([100 * ratio], [100 * tuned], marker="*", ms=15, color=_RED, mec="black", mew=0.6, ls="none",
                zorder=6, label=f"this bundle, fine-tuned ({pct(tuned)})")
        ys.append(100 * tuned)
        if not rows:
            callouts.append((f"fine-tuned: {pct(tuned)}", 100 * tuned))
    ax.set_xlabel("FLOPs per image, % of the dense model"
                  + (f" (dense = {count(metrics.flops_dense)}FLOPs)" if metrics.flops_dense else ""))
    ax.set_ylabel("top-1 accuracy on the test set (%)")
    ax.set_xlim(0, 105)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max(2.0, 0.12 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) if hi + pad <= 100 else hi + pad)
    if callouts and ratio is not None:
        _callouts(ax, callouts, 100 * ratio)
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy vs FLOPs of the pruned variants" if rows else "Accuracy vs FLOPs: dense and pruned")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return fig


def _sweep_series(ax, rows: list[Mapping[str, Any]]) -> list[float]:
    """One line per criterion, fine-tuned (filled) and before fine-tuning (hollow); returns the y values."""
    ys: list[float] = []
    criteria = list(dict.fromkeys(str(r.get("criterion", "?")) for r in rows))
    for ci, crit in enumerate(criteria):
        color = _PALETTE[ci % len(_PALETTE)]
        mine = sorted((r for r in rows if str(r.get("criterion", "?")) == crit), key=lambda r: r["flops_ratio"])
        xs = [100 * float(r["flops_ratio"]) for r in mine]
        ft = [num(r.get("acc_finetuned")) for r in mine]
        bn = [num(r.get("acc_pruned_bn_recalibrated")) for r in mine]
        pts = [(x, 100 * y) for x, y in zip(xs, ft) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=7, color=color, lw=1.2, zorder=4, label=f"{crit}: fine-tuned")
        pts_bn = [(x, 100 * y) for x, y in zip(xs, bn) if y is not None]
        if pts_bn:
            ax.plot(*zip(*pts_bn), marker="o", ms=6, mfc="white", color=color, lw=0.8, ls=":", zorder=3,
                    label=f"{crit}: before fine-tuning (BN re-estimated)")
        ys += [y for _, y in pts + pts_bn]
        if len(rows) <= 16:
            for r, x, y in zip(mine, xs, ft):
                # the legend already names a variant that differs only by criterion
                if y is not None and r.get("label") and r["label"] != f"criterion={crit}":
                    ax.annotate(str(r["label"]), (x, 100 * y), textcoords="offset points", xytext=(7, -7),
                                ha="left", va="top", fontsize=8, color=color, zorder=7,
                                bbox={**_LABEL_BOX, "alpha": 0.8})
    return ys


def _bundle_steps(ax, m: Metrics, ratio: float) -> list[tuple[str, float]]:
    """This bundle's accuracy after each step, at its FLOPs; returns the call-outs (text, y)."""
    callouts = []
    for v, label, marker, color in ((m.acc_pruned, "right after channel removal", "x", _BLUE),
                                    (m.acc_pruned_bn_recalibrated, "after BN re-estimation", "o", _BLUE),
                                    (m.acc_oneshot, "one-shot: compensated + BN re-estimated", "s", _BLUE),
                                    (m.acc_int8, "INT8 (quantized)", "D", _ORANGE)):
        if v is not None:
            ax.plot([100 * ratio], [100 * v], marker=marker, ms=7, ls="none", zorder=7, label=label,
                    mfc="white" if marker == "o" else None, color=color)
            callouts.append((f"{label}: {pct(v)}", 100 * v))
    return callouts


def _callouts(ax, callouts: list[tuple[str, float]], x: float) -> None:
    """Labels right of the points at `x`, in order, at least `gap` apart, with leader lines to the points."""
    lo, hi = ax.get_ylim()
    gap = 0.06 * (hi - lo)
    callouts.sort(key=lambda c: c[1])
    pos: list[float] = []
    for _, y in callouts:
        pos.append(max(y, pos[-1] + gap) if pos else y)
    shift = max(0.0, pos[-1] - (hi - gap / 2))
    for (text, y), p in zip(callouts, pos):
        ax.annotate(text, xy=(x, y), xytext=(x + 7, p - shift), textcoords="data",
                    va="center", fontsize=8, arrowprops={"arrowstyle": "-", "color": _GREY, "lw": 0.6},
                    bbox={**_LABEL_BOX, "alpha": 0.85})


# -- channels and CMI -------------------------------------------------------------------------------------------
def channels_per_layer(layers: list[tuple[str, float, float]]):
    """layers: (name, dense channels, kept channels) in network order."""
    if not layers:
        return None
    n = len(layers)
    fig = new_figure(8.0, max(2.6, 0.34 * n + 1.4))
    ax = fig.add_subplot()
    y = list(range(n))
    d = [dense for _, dense, _ in layers]
    k = [kept for _, _, kept in layers]
    ax.barh(y, d, color="#d9d9d9", edgecolor=_GREY, height=0.7, label="dense")
    ax.barh(y, k, color=_BLUE, height=0.7, label="kept after pruning")
    top = max(d)
    for yi, di, ki in zip(y, d, k):
        ax.text(di + 0.01 * top, yi, f"{ki:.0f} / {di:.0f} ({100 * ki / di:.0f}%)" if di else f"{ki:.0f}",
                va="center", fontsize=8)
    ax.set_yticks(y, [name for name, _, _ in layers], fontsize=8.5 if n <= 30 else 7)
    ax.set_ylim(n - 0.5, -0.5)  # network order, top to bottom, no empty margins
    ax.set_xlim(0, top * 1.28)
    ax.set_xlabel("output channels")
    ax.set_title("Kept channels per prunable conv layer (input side at the top)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8.5, frameon=False)
    return fig


def cmi_curves(layers: list[CMILayer]):
    """One panel per layer: the CMI left after each greedy pick, the cutoff at k = keep."""
    if not layers:
        return None
    n = len(layers)
    ncols = min(4 if n <= 16 else 6, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(3.1 * ncols + 0.4, 2.35 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    values = [v for _, curve, _, info in layers for v in [*curve, num(info.get("cmi_total")) or 1.0]]
    positive = [v for v in values if v > 0]
    log_y = len(positive) == len(values) and max(positive) / min(positive) > 30
    for idx, (name, curve, keep, info) in enumerate(layers):
        ax = axes[idx // ncols][idx % ncols]
        channels = len(curve) + 1
        xs, ys = list(range(1, channels)), list(curve)
        total = num(info.get("cmi_total"))
        if total is not None:
            xs, ys = [0, *xs], [total, *ys]
        ax.plot(xs, ys, color=_BLUE, lw=1.2)
        if keep is not None:
            ax.axvline(keep, color=_RED, ls=":", lw=1.3)
            if 1 <= keep <= channels - 1:
                ax.plot([keep], [curve[keep - 1]], marker="o", ms=5, color=_RED, zorder=5)
        if log_y:
            ax.set_yscale("log")
        title = f"{name}: keep {keep}/{channels}" if keep is not None else name
        if info.get("saturated"):
            title += " (saturated)"
        ax.set_title(title, fontsize=8.5)
        ax.tick_params(labelsize=7.5)
        ax.set_xlim(0, channels)
        ax.grid(alpha=0.3)
        if idx % ncols == 0:
            ax.set_ylabel("CMI (nats)", fontsize=8)
        if idx // ncols == nrows - 1 or idx + ncols >= n:
            ax.set_xlabel("channels kept k", fontsize=8)
    for idx in range(n, nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    cutoffs = sorted({str(info.get("cutoff")) for _, _, _, info in layers if info.get("cutoff")})
    fig.suptitle("CMI left in the unselected channels vs channels kept (red: the cutoff, k = keep"
                 + (f"; cutoff {', '.join(cutoffs)})" if cutoffs else ")"), fontsize=10)
    return fig


# -- latency ----------------------------------------------------------------------------------------------------
def _latency_panels(title: str, bars: list[tuple[str, str, dict[str, Mapping[str, Any]]]], ylabel: str):
    """bars: (label, color, {batch: stats with p50_ms / p90_ms}); one panel per batch size."""
    batches = sorted({b for _, _, per in bars for b in per}, key=batch_key)
    if not batches:
        return None
    ncols = min(3, len(batches))
    nrows = math.ceil(len(batches) / ncols)
    width = max(4.2, 0.85 * len(bars) + 1.6)
    fig = new_figure(min(16.0, width * ncols), 3.9 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    long_labels = max(len(label) for label, _, _ in bars) > 10 or len(bars) > 4
    for i, batch in enumerate(batches):
        ax = axes[i // ncols][i % ncols]
        here = [(label, color, per[batch]) for label, color, per in bars if batch in per]
        xs = list(range(len(here)))
        p50 = [float(s["p50_ms"]) for _, _, s in here]
        p90 = [num(s.get("p90_ms")) for _, _, s in here]
        upper = [max(0.0, (q - p)) if q is not None else 0.0 for p, q in zip(p50, p90)]
        ax.bar(xs, p50, color=[c for _, c, _ in here], edgecolor="black", lw=0.5, width=0.65,
               yerr=[[0.0] * len(xs), upper], capsize=4, error_kw={"lw": 1, "ecolor": "black"})
        top = max(p + u for p, u in zip(p50, upper))
        for x, p, u in zip(xs, p50, upper):
            ax.text(x, p + u + 0.02 * top, ms_bare(p), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [label for label, _, _ in here], fontsize=8,
                      rotation=30 if long_labels else 0, ha="right" if long_labels else "center")
        ax.set_ylim(0, top * 1.15)
        ax.set_title(f"batch {batch}", fontsize=9.5)
        ax.grid(axis="y", alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8.5)
    for idx in range(len(batches), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig


def latency(measured: Mapping[str, Mapping[str, Any]], host: str):
    """measured: {variant: entry with backend, threads and only measured batches}, from this host."""
    if not measured:
        return None
    backends = sorted({str(r.get("backend")) for r in measured.values() if r.get("backend")})
    threads = sorted({str(r.get("threads")) for r in measured.values() if r.get("threads") is not None})
    bars = [(name, _color(name, i), r["batches"]) for i, (name, r) in enumerate(measured.items())]
    how = ", ".join(p for p in (" / ".join(backends), (f"{' / '.join(threads)} threads" if threads else "")) if p)
    return _latency_panels(f"Latency measured on {host}; {how}", bars,
                           "latency per batch (ms)\nbar p50, whisker to p90")


def _device_label(row: Mapping[str, Any], vary: set[str]) -> str:
    parts = [str(row.get("precision", "?"))]
    if "device" in vary:
        parts.insert(0, str(row.get("device")))
    if "backend" in vary:
        parts.append(str(row.get("backend")))
    if "power_mode" in vary:
        parts.append(f"mode {row.get('power_mode')}")
    return " ".join(parts)


def device_latency(rows: list[dict[str, Any]]):
    """rows: the device results' summary rows (device, backend, power_mode, precision, batch, p50_ms, ...)."""
    if not rows:
        return None
    vary = {k for k in ("device", "backend", "power_mode") if len({str(r.get(k)) for r in rows}) > 1}
    groups: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_device_label(r, vary), {})[str(r.get("batch"))] = r
    bars = [(label, _color(label, i), per) for i, (label, per) in enumerate(groups.items())]
    devices = ", ".join(sorted({str(r.get("device")) for r in rows}))
    backends = ", ".join(sorted({str(r.get("backend")) for r in rows}))
    return _latency_panels(f"Latency measured on the device ({devices}; {backends})", bars,
                           "latency per batch (ms)\nbar p50, whisker to p90")


# -- memory -----------------------------------------------------------------------------------------------------
def memory(entries: Mapping[str, Mapping[str, Any]], budget_mb: float | None, memory_gb: float | None,
           target: str):
    """Peak RSS and weights per variant against the budget (each variant's own, else the target's)."""
    variants = list(entries.items())
    if not variants:
        return None
    fig = new_figure(max(5.5, 1.5 * len(variants) + 2.5), 4.4)
    ax = fig.add_subplot()
    xs = list(range(len(variants)))
    w = 0.36
    rss = [num(r.get("peak_rss_mb")) for _, r in variants]
    weights = [bytes_mb(r.get("weights_bytes")) for _, r in variants]
    fits = [r.get("fits") for _, r in variants]
    budgets = [num(r.get("memory_budget_mb")) or budget_mb for _, r in variants]
    values = [v for v in (*rss, *weights, *budgets) if v is not None and v > 0]
    labelled: set[bool] = set()
    for x, v, ok in zip(xs, rss, fits):
        if v is not None:
            bad = ok is False
            label = "peak RSS, does not fit" if bad else "peak RSS (measured on this host)"
            ax.bar(x - w / 2, v, width=w, color="#f4a6a6" if bad else _BLUE, edgecolor=_RED if bad else "black",
                   hatch="//" if bad else None, lw=0.8, label=None if bad in labelled else label)
            labelled.add(bad)
    ax.bar([x + w / 2 for x, v in zip(xs, weights) if v is not None], [v for v in weights if v is not None],
           width=w, color="#c7c7c7", edgecolor="black", lw=0.8, label="weights")
    distinct = {b for b in budgets if b is not None}
    if len(distinct) == 1:
        b = distinct.pop()
        ax.axhline(b, color=_RED, ls="--", lw=1.3,
                   label=f"memory budget {b:.0f} MB" + (f" (target has {memory_gb:g} GB)" if memory_gb else ""))
    else:
        for x, own in zip(xs, budgets):
            if own is not None:
                ax.hlines(own, x - 0.45, x + 0.45, color=_RED, ls="--", lw=1.3,
                          label="budget (per variant)" if x == xs[0] else None)
    log_y = bool(values) and max(values) / min(values) > 20
    if log_y:
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 3, max(values) * 2.5)
    else:
        ax.set_ylim(0, max(values or [1.0]) * 1.2)
    labels = [name + ("\nDOES NOT FIT" if ok is False else "\n(not measured)" if ok is None else "")
              for (name, _), ok in zip(variants, fits)]
    ax.set_xticks(xs, labels, fontsize=8.5)
    ax.set_xlim(-0.6, len(xs) - 0.4)
    for tick, ok in zip(ax.get_xticklabels(), fits):
        if ok is False:
            tick.set_color(_RED)
            tick.set_fontweight("bold")
    _memory_values(ax, xs, w, rss, weights, fits, log_y)
    ax.set_ylabel("MB (MiB)" + (", log scale" if log_y else ""))
    ax.set_title(f"Memory vs the budget of {target}")
    ax.grid(axis="y", alpha=0.3, which="both" if not log_y else "major")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _memory_values(ax, xs: list[int], w: float, rss: list[float | None], weights: list[float | None],
                   fits: list[Any], log_y: bool) -> None:
    """Each bar's value, and where a variant has no peak RSS, why."""
    bottom, top = ax.get_ylim()
    scale = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    for x, v, dark in [(x - w / 2, v, ok is not False) for x, v, ok in zip(xs, rss, fits)] + \
            [(x + w / 2, v, False) for x, v in zip(xs, weights)]:
        if v is None or v <= 0:
            continue
        # the value inside the top of a tall bar (clear of the budget line), above a short one
        inside = (scale(v) - scale(bottom)) / (scale(top) - scale(bottom)) > 0.15
        y = (v / 1.1 if log_y else v - 0.015 * (top - bottom)) if inside else (v * 1.06 if log_y else v + 0.01 * top)
        white = inside and dark
        ax.text(x, y, mb(v), ha="center", va="top" if inside else "bottom", fontsize=7.5,
                color="white" if white else "black",
                bbox=None if white else {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})
    for x, v, ok in zip(xs, rss, fits):
        if v is None:  # nothing measured: say so where the bar would be
            y = bottom * 1.6 if log_y else bottom + 0.03 * (top - bottom)
            ax.text(x - w / 2, y, "no peak RSS:\ndid not fit" if ok is False else "no peak RSS", ha="center",
                    va="bottom", fontsize=7.5, color=_RED if ok is False else _GREY)


# -- roofline ---------------------------------------------------------------------------------------------------
def roofline(groups: list[RooflineGroup], chosen: str):
    """Estimated dense and pruned latency per (target, precision); `chosen` is this bundle's target."""
    if not groups:
        return None
    n = len(groups)
    fig = new_figure(8.0, max(2.8, 0.5 * n + 1.5))
    ax = fig.add_subplot()
    h = 0.38
    ys = list(range(n))
    dense = [num(g[2].get("dense_ms")) for g in groups]
    pruned = [num(g[2].get("pruned_ms")) for g in groups]
    ax.barh([y - h / 2 for y, v in zip(ys, dense) if v is not None], [v for v in dense if v is not None],
            height=h, color="#c7c7c7", edgecolor="black", lw=0.6, label="dense")
    ax.barh([y + h / 2 for y, v in zip(ys, pruned) if v is not None], [v for v in pruned if v is not None],
            height=h, color=_BLUE, edgecolor="black", lw=0.6, label="pruned")
    values = [v for v in (*dense, *pruned) if v is not None and v > 0]
    for y, d, p in zip(ys, dense, pruned):
        for off, v in ((-h / 2, d), (h / 2, p)):
            if v is not None:
                ax.text(v * 1.05, y + off, ms(v), va="center", fontsize=7)
    labels = [f"{t} ({p})" + ("\nthis bundle's target" if t == chosen else "") for t, p, _ in groups]
    ax.set_yticks(ys, labels, fontsize=8)
    for tick, (t, _, _) in zip(ax.get_yticklabels(), groups):
        if t == chosen:
            tick.set_fontweight("bold")
    ax.set_ylim(n - 0.5, -0.5)
    if values and max(values) / min(values) > 20:
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 2, max(values) * 3.5)
        ax.set_xlabel("estimated latency (ms), log scale")
    else:
        ax.set_xlim(0, max(values or [1.0]) * 1.2)
        ax.set_xlabel("estimated latency (ms)")
    batches = sorted({str(g[2].get("batch")) for g in groups if g[2].get("batch") is not None})
    ax.set_title("Roofline latency estimate (a lower bound, not a measurement"
                 + (f"; batch {', '.join(batches)})" if batches else ")"), fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="major")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8.5, frameon=False)
    return fig
