"""Report stage: ``report.md`` and a self-contained ``report.html`` with plots in ``plots/*.png``.

``write_report(folder, manifest, rankings=..., sweep=..., device_results=...)`` turns a bundle's manifest
(plus, optionally, the criterion's rankings, a sweep over pruned variants and on-device results folded in by
``toolchain.kit.merge_device_results``) into one document, rendered twice: as markdown (plots referenced
as ``![..](plots/x.png)``) and as HTML (plots embedded as base64 data URIs, each wrapped in a link to its
PNG file, no external references). Every section is optional: a missing key only drops its plot or table.

Plots are drawn with matplotlib's Agg canvas on ``matplotlib.figure.Figure`` objects (no pyplot, so no
global backend switch and no GUI). A plot that fails to draw is logged and replaced by a sentence in the
report; it never fails the bundle.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("build_edge")

PLOTS_DIR = "plots"
PLOTS = ("accuracy_vs_flops", "channels_per_layer", "cmi_curves", "latency", "device_latency", "memory", "roofline")
DPI = 110
_GREY, _BLUE, _ORANGE, _GREEN, _RED = "#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


# -- numbers ----------------------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (missing keys, None, strings, NaN, booleans)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _pct(x: Any) -> str:
    x = _num(x)
    return "-" if x is None else f"{100 * x:.2f}%"


def _pp(x: Any, ref: Any) -> str:
    """Accuracy change in percentage points."""
    x, ref = _num(x), _num(ref)
    if x is None or ref is None:
        return ""
    d = 100 * (x - ref)
    return f"{'+' if d >= 0 else '−'}{abs(d):.2f} pp"


def _ms(x: Any) -> str:
    x = _num(x)
    if x is None:
        return "-"
    return f"{x:.1f} ms" if x >= 100 else f"{x:.2f} ms" if x >= 10 else f"{x:.3f} ms"


def _ms_bare(x: Any) -> str:
    return _ms(x).removesuffix(" ms")


def _mean_std(mean: float, std: float | None) -> str:
    """`mean ± std` with the mean's decimals for both."""
    text = _ms_bare(mean)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return text if std is None else f"{text} ± {std:.{decimals}f}"


def _mb(x: Any) -> str:
    x = _num(x)
    return "-" if x is None else f"{x:.1f} MB" if x >= 1 else f"{x:.3f} MB"


def _budget(x: Any) -> str:
    x = _num(x)
    return "-" if x is None else f"{x:.0f} MB"


def _bytes_mb(x: Any) -> float | None:
    x = _num(x)
    return None if x is None else x / 2**20


def _count(x: Any) -> str:
    """FLOPs or parameter counts: 305.54 M, 1.23 G."""
    x = _num(x)
    if x is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}"
    return f"{x:.0f}"


def _speedup(slow: Any, fast: Any) -> str:
    slow, fast = _num(slow), _num(fast)
    if slow is None or fast is None or fast <= 0:
        return ""
    return f"{slow / fast:.2f}× faster" if slow >= fast else f"{fast / slow:.2f}× slower"


def _batch_key(b: Any) -> tuple[int, str]:
    try:
        return int(b), str(b)
    except (TypeError, ValueError):
        return 1 << 30, str(b)


def _dict(x: Any) -> dict[str, Any]:
    return dict(x) if isinstance(x, Mapping) else {}


# -- the document: built once, rendered as markdown and as HTML --------------------------------------------
@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class _Fig:
    rel: str  # "plots/x.png"
    alt: str
    caption: str


class _Doc:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.blocks: list[tuple[str, Any]] = []

    def h1(self, text: str) -> None:
        self.blocks.append(("h1", text))

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", _Table(header, [[str(c) for c in r] for r in rows])))

    def fig(self, fig: _Fig) -> None:
        self.blocks.append(("fig", fig))

    # markdown
    def markdown(self) -> str:
        out: list[str] = []
        for kind, item in self.blocks:
            if kind == "h1":
                out += [f"# {item}", ""]
            elif kind == "h2":
                out += [f"## {item}", ""]
            elif kind == "p":
                out += [item, ""]
            elif kind == "table":
                cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
                out.append("| " + " | ".join(cell(h) for h in item.header) + " |")
                out.append("|" + "|".join("---" for _ in item.header) + "|")
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in item.rows]
                out.append("")
            elif kind == "fig":
                out += [f"![{item.alt}]({item.rel})", "", f"*{item.caption}*", ""]
        return "\n".join(out).rstrip() + "\n"

    # HTML
    @staticmethod
    def _inline(text: str) -> str:
        text = html.escape(text, quote=False)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

    def html(self, title: str) -> str:
        body: list[str] = []
        for kind, item in self.blocks:
            if kind in ("h1", "h2"):
                body.append(f"<{kind}>{self._inline(item)}</{kind}>")
            elif kind == "p":
                body.append(f"<p>{self._inline(item)}</p>")
            elif kind == "table":
                head = "".join(f"<th>{self._inline(h)}</th>" for h in item.header)
                rows = "\n".join("<tr>" + "".join(f"<td>{self._inline(c)}</td>" for c in row) + "</tr>"
                                 for row in item.rows)
                body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")
            elif kind == "fig":
                data = base64.b64encode((self.folder / item.rel).read_bytes()).decode("ascii")
                rel, alt = html.escape(item.rel), html.escape(item.alt)
                body.append(f'<figure><a href="{rel}"><img src="data:image/png;base64,{data}" alt="{alt}"></a>'
                            f"<figcaption>{self._inline(item.caption)} (<a href=\"{rel}\">{rel}</a>)"
                            "</figcaption></figure>")
        return "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ])


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
tbody tr:nth-child(even){background:#fafafa}
td:not(:first-child){font-variant-numeric:tabular-nums}
code{background:#f2f2f2;padding:0 .25em;border-radius:3px}
figure{margin:1em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
""".strip()


# -- reading the manifest -----------------------------------------------------------------------------------
def _target_name(manifest: Mapping[str, Any]) -> str:
    target = manifest.get("target")
    if isinstance(target, Mapping):
        return str(target.get("name") or "?")
    return str(target or "?")


def _host_text(manifest: Mapping[str, Any], latency: Mapping[str, Any]) -> str:
    host = _dict(manifest.get("host"))
    parts = [" ".join(str(p) for p in (host.get("machine"), host.get("system")) if p)]
    if host.get("cpus"):
        parts.append(f"{host['cpus']} CPUs")
    parts += sorted({str(r.get("device")) for r in latency.values() if isinstance(r, Mapping) and r.get("device")})
    if host.get("cuda"):
        parts.append(f"GPU {host['cuda']}")
    parts = [p for p in parts if p]
    return f"this host ({', '.join(parts)})" if parts else "this host"


def _ok_latency(latency: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Variants with measured batches only (failed or skipped runs have none)."""
    out = {}
    for name, r in latency.items():
        if not isinstance(r, Mapping):
            continue
        batches = {str(b): s for b, s in _dict(r.get("batches")).items()
                   if isinstance(s, Mapping) and _num(s.get("p50_ms")) is not None}
        if batches and r.get("status", "ok") == "ok":
            out[str(name)] = {**r, "batches": batches}
    return out


def _precision(name: str, entry: Mapping[str, Any]) -> str | None:
    if entry.get("precision"):
        return str(entry["precision"])
    tail = name.rsplit("/", 1)[-1]
    return tail if tail in ("fp32", "fp16", "int8") and "/" in name else None


def _pick(variants: Mapping[str, Any], base: str, precision: str = "fp32") -> str | None:
    """The variant for `base` ("dense"/"pruned"): the exact name, else base/<precision>, else fp32-like."""
    if base in variants:
        return base
    named = [n for n in variants if n.split("/")[0] == base]
    for n in named:
        if _precision(n, _dict(variants[n])) == precision:
            return n
    if precision != "fp32":
        return None
    for n in named:
        if _precision(n, _dict(variants[n])) in (None, "fp32"):
            return n
    return None


def _variant_color(name: str, index: int) -> str:
    low = name.lower()
    if "int8" in low:
        return _ORANGE
    if "fp16" in low:
        return _GREEN
    if low.startswith("dense"):
        return _GREY
    if low.startswith("pruned"):
        return _BLUE
    return _PALETTE[index % len(_PALETTE)]


# -- plots --------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, folder: Path, name: str) -> str:
    rel = f"{PLOTS_DIR}/{name}.png"
    (folder / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / rel, format="png", dpi=DPI, metadata={"Software": None})
    return rel


def _draw(doc: _Doc, name: str, alt: str, caption: str, draw: Callable[[], Any]) -> _Fig | None:
    """Run a plot function returning a Figure (or None to skip); add it to the document."""
    try:
        fig = draw()
        if fig is None:
            return None
        item = _Fig(_save(fig, doc.folder, name), alt, caption)
    except Exception as e:  # a plot never fails the bundle
        log.warning("report: the %s plot could not be drawn: %s", name, e, exc_info=True)
        doc.p(f"(The {alt.lower()} plot could not be drawn: {type(e).__name__}: {e}.)")
        return None
    doc.fig(item)
    return item


def _plot_accuracy(manifest: Mapping[str, Any], sweep: list[dict[str, Any]] | None):
    m = _dict(manifest.get("metrics"))
    rows = [r for r in (sweep or []) if isinstance(r, Mapping) and _num(r.get("flops_ratio")) is not None]
    dense = _num(m.get("acc_dense"))
    if dense is None:
        dense = next((_num(r.get("acc_dense")) for r in rows if _num(r.get("acc_dense")) is not None), None)
    ratio, tuned = _num(m.get("flops_ratio")), _num(m.get("acc_finetuned"))
    if not rows and (ratio is None or (tuned is None and dense is None)):
        return None
    fig = _new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    ys: list[float] = []
    callouts: list[tuple[str, float]] = []  # (text, y) next to this bundle's points (no sweep)
    if dense is not None:
        ax.axhline(100 * dense, color=_GREY, ls="--", lw=1, zorder=1)
        ax.plot([100], [100 * dense], marker="s", ms=8, color=_GREY, ls="none", zorder=3,
                label=f"dense ({_pct(dense)})")
        ys.append(100 * dense)
    if rows:
        criteria = list(dict.fromkeys(str(r.get("criterion", "?")) for r in rows))
        for ci, crit in enumerate(criteria):
            color = _PALETTE[ci % len(_PALETTE)]
            mine = sorted((r for r in rows if str(r.get("criterion", "?")) == crit), key=lambda r: r["flops_ratio"])
            xs = [100 * float(r["flops_ratio"]) for r in mine]
            ft = [_num(r.get("acc_finetuned")) for r in mine]
            bn = [_num(r.get("acc_pruned_bn_recalibrated")) for r in mine]
            pts = [(x, 100 * y) for x, y in zip(xs, ft) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=7, color=color, lw=1.2, zorder=4,
                        label=f"{crit}: fine-tuned")
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
                                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    else:
        for key, label, marker in (("acc_pruned", "right after channel removal", "x"),
                                   ("acc_pruned_bn_recalibrated", "after BN re-estimation", "o"),
                                   ("acc_oneshot", "one-shot: compensated + BN re-estimated", "s"),
                                   ("acc_int8", "INT8 (quantized)", "D")):
            v = _num(m.get(key))
            if v is not None:
                ax.plot([100 * ratio], [100 * v], marker=marker, ms=7, ls="none", zorder=7, label=label,
                        mfc="white" if marker == "o" else None,
                        color=_ORANGE if key == "acc_int8" else _BLUE)
                ys.append(100 * v)
                callouts.append((f"{label}: {_pct(v)}", 100 * v))
    if ratio is not None and tuned is not None:
        ax.plot([100 * ratio], [100 * tuned], marker="*", ms=15, color=_RED, mec="black", mew=0.6, ls="none",
                zorder=6, label=f"this bundle, fine-tuned ({_pct(tuned)})")
        ys.append(100 * tuned)
        if not rows:
            callouts.append((f"fine-tuned: {_pct(tuned)}", 100 * tuned))
    flops_dense = _num(m.get("flops_dense"))
    ax.set_xlabel("FLOPs per image, % of the dense model"
                  + (f" (dense = {_count(flops_dense)}FLOPs)" if flops_dense else ""))
    ax.set_ylabel("top-1 accuracy on the test set (%)")
    ax.set_xlim(0, 105)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max(2.0, 0.12 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) if hi + pad <= 100 else hi + pad)
    if callouts and ratio is not None:
        lo, hi = ax.get_ylim()
        gap = 0.06 * (hi - lo)
        callouts.sort(key=lambda c: c[1])
        pos: list[float] = []
        for _, y in callouts:  # labels in order, at least `gap` apart, leader lines to the points
            pos.append(max(y, pos[-1] + gap) if pos else y)
        shift = max(0.0, pos[-1] - (hi - gap / 2))
        for (text, y), p in zip(callouts, pos):
            ax.annotate(text, xy=(100 * ratio, y), xytext=(100 * ratio + 7, p - shift), textcoords="data",
                        va="center", fontsize=8, arrowprops={"arrowstyle": "-", "color": _GREY, "lw": 0.6},
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy vs FLOPs of the pruned variants" if rows else "Accuracy vs FLOPs: dense and pruned")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return fig


def _plot_channels(manifest: Mapping[str, Any]):
    arch = _dict(manifest.get("architecture"))
    dense, kept = _dict(arch.get("dense_channels")), _dict(arch.get("kept_counts"))
    layers = [n for n in kept if _num(dense.get(n)) is not None and _num(kept.get(n)) is not None]
    if not layers:
        return None
    n = len(layers)
    fig = _new_figure(8.0, max(2.6, 0.34 * n + 1.4))
    ax = fig.add_subplot()
    y = list(range(n))
    d = [float(dense[name]) for name in layers]
    k = [float(kept[name]) for name in layers]
    ax.barh(y, d, color="#d9d9d9", edgecolor=_GREY, height=0.7, label="dense")
    ax.barh(y, k, color=_BLUE, height=0.7, label="kept after pruning")
    top = max(d)
    for yi, di, ki in zip(y, d, k):
        ax.text(di + 0.01 * top, yi, f"{ki:.0f} / {di:.0f} ({100 * ki / di:.0f}%)" if di else f"{ki:.0f}",
                va="center", fontsize=8)
    ax.set_yticks(y, layers, fontsize=8.5 if n <= 30 else 7)
    ax.set_ylim(n - 0.5, -0.5)  # network order, top to bottom, no empty margins
    ax.set_xlim(0, top * 1.28)
    ax.set_xlabel("output channels")
    ax.set_title("Kept channels per prunable conv layer (input side at the top)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8.5, frameon=False)
    return fig


_CMILayer = tuple[str, list[float], "int | None", dict[str, Any]]  # name, cmi curve, keep, info


def _cmi_layers(manifest: Mapping[str, Any], rankings: Mapping[str, Any] | None) -> list[_CMILayer]:
    if not isinstance(rankings, Mapping):
        return []
    kept = _dict(_dict(manifest.get("architecture")).get("kept_counts"))
    names = [n for n in kept if n in rankings] + [n for n in rankings if n not in kept]
    out = []
    for name in names:
        r = _dict(rankings.get(name))
        info = _dict(r.get("info"))
        curve = info.get("cmi")
        if not isinstance(curve, list) or not curve or any(_num(v) is None for v in curve):
            continue
        keep = next((int(v) for v in (r.get("keep"), info.get("keep"), kept.get(name)) if _num(v) is not None),
                    None)
        out.append((str(name), [float(v) for v in curve], keep, info))
    return out


def _plot_cmi(layers: list[_CMILayer]):
    if not layers:
        return None
    n = len(layers)
    ncols = min(4 if n <= 16 else 6, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(3.1 * ncols + 0.4, 2.35 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    values = [v for _, curve, _, info in layers for v in [*curve, _num(info.get("cmi_total")) or 1.0]]
    positive = [v for v in values if v > 0]
    log_y = len(positive) == len(values) and max(positive) / min(positive) > 30
    for idx, (name, curve, keep, info) in enumerate(layers):
        ax = axes[idx // ncols][idx % ncols]
        channels = len(curve) + 1
        xs, ys = list(range(1, channels)), list(curve)
        total = _num(info.get("cmi_total"))
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


def _plot_latency_panels(title: str, bars: list[tuple[str, str, dict[str, Mapping[str, Any]]]],
                         ylabel: str):
    """bars: (label, color, {batch: stats with p50_ms / p90_ms}); one panel per batch size."""
    batches = sorted({b for _, _, per in bars for b in per}, key=_batch_key)
    if not batches:
        return None
    ncols = min(3, len(batches))
    nrows = math.ceil(len(batches) / ncols)
    width = max(4.2, 0.85 * len(bars) + 1.6)
    fig = _new_figure(min(16.0, width * ncols), 3.9 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    long_labels = max(len(label) for label, _, _ in bars) > 10 or len(bars) > 4
    for i, batch in enumerate(batches):
        ax = axes[i // ncols][i % ncols]
        here = [(label, color, per[batch]) for label, color, per in bars if batch in per]
        xs = list(range(len(here)))
        p50 = [float(s["p50_ms"]) for _, _, s in here]
        p90 = [_num(s.get("p90_ms")) for _, _, s in here]
        upper = [max(0.0, (q - p)) if q is not None else 0.0 for p, q in zip(p50, p90)]
        ax.bar(xs, p50, color=[c for _, c, _ in here], edgecolor="black", lw=0.5, width=0.65,
               yerr=[[0.0] * len(xs), upper], capsize=4, error_kw={"lw": 1, "ecolor": "black"})
        top = max(p + u for p, u in zip(p50, upper))
        for x, p, u in zip(xs, p50, upper):
            ax.text(x, p + u + 0.02 * top, _ms_bare(p), ha="center", va="bottom", fontsize=8)
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


def _plot_host_latency(latency: dict[str, dict[str, Any]], host: str):
    if not latency:
        return None
    backends = sorted({str(r.get("backend")) for r in latency.values() if r.get("backend")})
    threads = sorted({str(r.get("threads")) for r in latency.values() if r.get("threads") is not None})
    bars = [(name, _variant_color(name, i), r["batches"]) for i, (name, r) in enumerate(latency.items())]
    how = ", ".join(p for p in (" / ".join(backends), (f"{' / '.join(threads)} threads" if threads else "")) if p)
    return _plot_latency_panels(f"Latency measured on {host}; {how}", bars,
                                "latency per batch (ms)\nbar p50, whisker to p90")


def _device_rows(device_results: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not isinstance(device_results, Mapping):
        return []
    return [dict(r) for r in device_results.get("summary") or []
            if isinstance(r, Mapping) and _num(r.get("p50_ms")) is not None]


def _device_label(row: Mapping[str, Any], vary: set[str]) -> str:
    parts = [str(row.get("precision", "?"))]
    if "device" in vary:
        parts.insert(0, str(row.get("device")))
    if "backend" in vary:
        parts.append(str(row.get("backend")))
    if "power_mode" in vary:
        parts.append(f"mode {row.get('power_mode')}")
    return " ".join(parts)


def _plot_device_latency(rows: list[dict[str, Any]]):
    if not rows:
        return None
    vary = {k for k in ("device", "backend", "power_mode") if len({str(r.get(k)) for r in rows}) > 1}
    groups: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_device_label(r, vary), {})[str(r.get("batch"))] = r
    bars = [(label, _variant_color(label, i), per) for i, (label, per) in enumerate(groups.items())]
    devices = ", ".join(sorted({str(r.get("device")) for r in rows}))
    backends = ", ".join(sorted({str(r.get("backend")) for r in rows}))
    return _plot_latency_panels(f"Latency measured on the device ({devices}; {backends})", bars,
                                "latency per batch (ms)\nbar p50, whisker to p90")


def _plot_memory(memory: Mapping[str, Any], target: Mapping[str, Any]):
    variants = [(str(n), _dict(r)) for n, r in memory.items() if isinstance(r, Mapping)]
    if not variants:
        return None
    fig = _new_figure(max(5.5, 1.5 * len(variants) + 2.5), 4.4)
    ax = fig.add_subplot()
    xs = list(range(len(variants)))
    w = 0.36
    rss = [_num(r.get("peak_rss_mb")) for _, r in variants]
    weights = [_bytes_mb(r.get("weights_bytes")) for _, r in variants]
    fits = [r.get("fits") for _, r in variants]
    budgets = [_num(r.get("memory_budget_mb")) or _num(target.get("memory_budget_mb")) for _, r in variants]
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
    gb = _num(target.get("memory_gb"))
    if len(distinct) == 1:
        b = distinct.pop()
        ax.axhline(b, color=_RED, ls="--", lw=1.3,
                   label=f"memory budget {b:.0f} MB" + (f" (target has {gb:g} GB)" if gb else ""))
    else:
        for x, b in zip(xs, budgets):
            if b is not None:
                ax.hlines(b, x - 0.45, x + 0.45, color=_RED, ls="--", lw=1.3,
                          label="budget (per variant)" if x == xs[0] else None)
    log_y = bool(values) and max(values) / min(values) > 20
    if log_y:
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 3, max(values) * 2.5)
    else:
        ax.set_ylim(0, max(values or [1.0]) * 1.2)
    labels = []
    for (name, _), ok in zip(variants, fits):
        labels.append(name + ("\nDOES NOT FIT" if ok is False else "\n(not measured)" if ok is None else ""))
    ax.set_xticks(xs, labels, fontsize=8.5)
    ax.set_xlim(-0.6, len(xs) - 0.4)
    for tick, ok in zip(ax.get_xticklabels(), fits):
        if ok is False:
            tick.set_color(_RED)
            tick.set_fontweight("bold")
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
        ax.text(x, y, _mb(v), ha="center", va="top" if inside else "bottom", fontsize=7.5,
                color="white" if white else "black",
                bbox=None if white else {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})
    for x, v, ok in zip(xs, rss, fits):
        if v is None:  # nothing measured: say so where the bar would be
            y = bottom * 1.6 if log_y else bottom + 0.03 * (top - bottom)
            ax.text(x - w / 2, y, "no peak RSS:\ndid not fit" if ok is False else "no peak RSS", ha="center",
                    va="bottom", fontsize=7.5, color=_RED if ok is False else _GREY)
    ax.set_ylabel("MB (MiB)" + (", log scale" if log_y else ""))
    ax.set_title(f"Memory vs the budget of {_target_name({'target': target})}")
    ax.grid(axis="y", alpha=0.3, which="both" if not log_y else "major")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _roofline_groups(roofline: Mapping[str, Any], chosen: str, default: str | None) -> list[tuple[str, str, dict]]:
    """(target, precision, {dense_ms, pruned_ms, ...}): the chosen target first at its default precision."""
    groups = []
    names = ([chosen] if chosen in roofline else []) + [n for n in roofline if n != chosen]
    for name in names:
        per = _dict(roofline.get(name))
        precisions = [p for p in per if isinstance(per[p], Mapping)]
        if name == chosen and default in precisions:
            precisions = [default]
        for p in precisions:
            row = _dict(per[p])
            if _num(row.get("dense_ms")) is not None or _num(row.get("pruned_ms")) is not None:
                groups.append((str(name), str(p), row))
    return groups


def _plot_roofline(groups: list[tuple[str, str, dict]], chosen: str):
    if not groups:
        return None
    n = len(groups)
    fig = _new_figure(8.0, max(2.8, 0.5 * n + 1.5))
    ax = fig.add_subplot()
    h = 0.38
    ys = list(range(n))
    dense = [_num(g[2].get("dense_ms")) for g in groups]
    pruned = [_num(g[2].get("pruned_ms")) for g in groups]
    ax.barh([y - h / 2 for y, v in zip(ys, dense) if v is not None], [v for v in dense if v is not None],
            height=h, color="#c7c7c7", edgecolor="black", lw=0.6, label="dense")
    ax.barh([y + h / 2 for y, v in zip(ys, pruned) if v is not None], [v for v in pruned if v is not None],
            height=h, color=_BLUE, edgecolor="black", lw=0.6, label="pruned")
    values = [v for v in (*dense, *pruned) if v is not None and v > 0]
    for y, d, p in zip(ys, dense, pruned):
        for off, v in ((-h / 2, d), (h / 2, p)):
            if v is not None:
                ax.text(v * 1.05, y + off, _ms(v), va="center", fontsize=7)
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


# -- the report -----------------------------------------------------------------------------------------------
def _summary(doc: _Doc, manifest: Mapping[str, Any], latency: dict[str, dict[str, Any]], host: str) -> None:
    m, cfg = _dict(manifest.get("metrics")), _dict(manifest.get("config"))
    dense = m.get("acc_dense")
    rows: list[list[Any]] = [
        ["top-1 accuracy (PyTorch, test set), pruned after fine-tuning"
         + (f" ({cfg['finetune_epochs']} epoch{'s' if cfg['finetune_epochs'] != 1 else ''})"
            if cfg.get("finetune_epochs") else ""),
         _pct(dense), _pct(m.get("acc_finetuned")), _pp(m.get("acc_finetuned"), dense)],
        ["top-1 right after channel removal", "", _pct(m.get("acc_pruned")), _pp(m.get("acc_pruned"), dense)],
        ["top-1 after BN re-estimation" + (f" ({cfg['bn_recalibration']} images)"
                                           if cfg.get("bn_recalibration") else ""),
         "", _pct(m.get("acc_pruned_bn_recalibrated")), _pp(m.get("acc_pruned_bn_recalibrated"), dense)],
    ]
    if _num(m.get("acc_oneshot")) is not None and cfg.get("compensation", "none") != "none":
        rows.append(["top-1 one-shot: compensation refit + BN re-estimation, before any gradient step", "",
                     _pct(m.get("acc_oneshot")), _pp(m.get("acc_oneshot"), dense)])
    if "acc_onnxruntime" in m:
        rows.append(["top-1 of the exported ONNX model (ONNX Runtime)", "", _pct(m.get("acc_onnxruntime")),
                     _pp(m.get("acc_onnxruntime"), dense)])
    for key, label in (("acc_fp16", "top-1 FP16 (pruned, ONNX Runtime)"),
                       ("acc_int8", "top-1 INT8 (pruned, Q/DQ with exact int8 arithmetic, as TensorRT computes it)"),
                       ("acc_int8_host", "top-1 INT8 with ONNX Runtime's int8 kernels on this host")):
        if _num(m.get(key)) is not None:
            rows.append([label, "", _pct(m.get(key)), _pp(m.get(key), dense)])
    if "flops_dense" in m or "flops_pruned" in m:
        rows.append(["FLOPs per image", _count(m.get("flops_dense")), _count(m.get("flops_pruned")),
                     f"{_pct(m.get('flops_ratio'))} of dense"])
    if "params_dense" in m or "params_pruned" in m:
        rows.append(["parameters", _count(m.get("params_dense")), _count(m.get("params_pruned")),
                     f"{_pct(m.get('params_ratio'))} of dense"])
    cd, cr = _num(m.get("channels_dense")), _num(m.get("channels_removed"))
    if cd is not None and cr is not None:
        rows.append(["conv channels (prunable layers)", f"{cd:.0f}", f"{cd - cr:.0f}",
                     f"{cr:.0f} removed ({_pct(cr / cd if cd else None)})"])
    d_name, p_name = _pick(latency, "dense"), _pick(latency, "pruned")
    d1 = _dict(latency.get(d_name, {}).get("batches", {}).get("1")) if d_name else {}
    p1 = _dict(latency.get(p_name, {}).get("batches", {}).get("1")) if p_name else {}
    if d1 or p1:
        rows.append([f"latency p50, batch 1 (this host, measured: {d_name or '-'} vs {p_name or '-'})",
                     _ms(d1.get("p50_ms")), _ms(p1.get("p50_ms")), _speedup(d1.get("p50_ms"), p1.get("p50_ms"))])
    i_name = _pick(latency, "pruned", "int8")
    i1 = _dict(latency.get(i_name, {}).get("batches", {}).get("1")) if i_name else {}
    if i1:
        rows.append([f"latency p50, batch 1, INT8 ({i_name}, this host, measured)", "", _ms(i1.get("p50_ms")),
                     f"{_speedup(d1.get('p50_ms'), i1.get('p50_ms'))} than dense" if d1 else ""])
    memory = _dict(m.get("memory"))
    target = _dict(manifest.get("target"))
    md, mp = _dict(memory.get(_pick(memory, "dense") or "")), _dict(memory.get(_pick(memory, "pruned") or ""))
    peak_d = _num(md.get("peak_rss_mb")) if md else _num(d1.get("peak_rss_mb"))
    peak_p = _num(mp.get("peak_rss_mb")) if mp else _num(p1.get("peak_rss_mb"))
    if peak_d is not None or peak_p is not None or md or mp:
        budget = _num(mp.get("memory_budget_mb")) or _num(target.get("memory_budget_mb"))
        note = f"budget {budget:.0f} MB" if budget else ""
        if mp.get("fits") is not None:
            note += ("; " if note else "") + ("pruned fits" if mp["fits"] else "pruned does NOT fit")
        if md.get("fits") is False:
            note += ("; " if note else "") + "dense does NOT fit"
        cell = lambda peak, r: "did not fit" if peak is None and r.get("fits") is False else _mb(peak)
        rows.append(["peak memory (RSS, this host, measured)", cell(peak_d, md), cell(peak_p, mp), note])
    engine = manifest.get("engine")
    if isinstance(engine, Mapping):
        if engine.get("built"):
            extra = ", ".join(f"{k} {v}" for k, v in engine.items() if k not in ("built", "reason") and
                              isinstance(v, (str, int, float)) and not isinstance(v, bool))
            rows.append(["TensorRT engine", "", "built here" + (f" ({extra})" if extra else ""),
                         str(engine.get("reason") or "")])
        else:
            rows.append(["TensorRT engine", "", "not built here" + (f": {engine['reason']}" if engine.get("reason")
                                                                   else ""),
                         f"the kit builds it on the device: `{engine.get('kit') or 'kit/build_engine.sh'}`"])
    elif (doc.folder / "kit" / "build_engine.sh").is_file():
        rows.append(["TensorRT engine", "", "not built here", "the kit builds it on the device: "
                                                               "`kit/build_engine.sh`"])
    doc.h2("Summary")
    doc.table(["", "dense", "pruned", "change"], rows)
    doc.p(f"Accuracy is top-1 on the {manifest.get('data', {}).get('test', '?')} test images. Latency and memory "
          f"are measured on {host}, not on the target; the roofline section holds estimates for the targets, "
          "and on-device measurements appear once the kit's results are folded in.")


def _sweep_table(doc: _Doc, sweep: list[dict[str, Any]], dense: Any) -> None:
    rows = []
    for r in sweep:
        if not isinstance(r, Mapping):
            continue
        ref = r.get("acc_dense", dense)
        rows.append([r.get("label", "-"), r.get("criterion", "-"), _pct(r.get("flops_ratio")),
                     _pct(r.get("params_ratio")), _pct(r.get("acc_pruned_bn_recalibrated")),
                     _pct(r.get("acc_oneshot")) or "-", _pct(r.get("acc_finetuned")),
                     _pp(r.get("acc_finetuned"), ref) or "-"])
    if rows:
        doc.table(["variant", "criterion", "FLOPs (% of dense)", "params (% of dense)", "top-1 after BN re-est.",
                   "top-1 one-shot (compensated)", "top-1 fine-tuned", "vs dense"], rows)


def verdict(m: Mapping[str, Any]) -> str:
    """What the run shows, in one plain sentence: did the pruned model keep the dense model's accuracy?"""
    acc, dense, flops = _num(m.get("acc_finetuned")), _num(m.get("acc_dense")), _num(m.get("flops_ratio"))
    if acc is None or dense is None or flops is None:
        return ""
    delta = round(100 * (acc - dense), 2)  # as shown: -1.00 is within 1 point
    at = f"at {_pct(flops)} of the dense FLOPs"
    if delta >= -1.0:
        return (f"The pruned model keeps the dense model's accuracy {at}: {_pct(acc)} top-1 against "
                f"{_pct(dense)} ({delta:+.2f} pt{', within 1 point' if delta < 0 else ''}).")
    return f"The pruned model loses {-delta:.2f} points of top-1 {at}: {_pct(acc)} against {_pct(dense)} dense."


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
    m, cfg = _dict(manifest.get("metrics")), _dict(manifest.get("config"))
    arch, target = _dict(manifest.get("architecture")), _dict(manifest.get("target"))
    latency = _ok_latency(_dict(m.get("latency")))
    host = _host_text(manifest, _dict(m.get("latency")))
    target_name = _target_name(manifest)
    model = cfg.get("model") or arch.get("model") or "model"
    dataset = _dict(manifest.get("data")).get("name") or cfg.get("dataset") or "?"
    title = f"build-edge report: {model} on {dataset} for {target_name}"

    doc = _Doc(folder)
    doc.h1(title)
    criterion = cfg.get("criterion") or "?"
    opts = _dict(cfg.get("criterion_options"))
    intro = f"Criterion `{criterion}`" + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
    kept = _dict(arch.get("kept_counts"))
    if _num(m.get("channels_removed")) is not None and _num(m.get("channels_dense")) is not None:
        intro += (f": {m['channels_removed']:.0f} of {m['channels_dense']:.0f} channels removed from "
                  f"{len(kept)} prunable conv layers.")
    else:
        intro += "."
    headline = []
    if _num(m.get("flops_ratio")) is not None:
        headline.append(f"the pruned model needs {_pct(m['flops_ratio'])} of the dense FLOPs")
    if _num(m.get("acc_finetuned")) is not None:
        headline.append(f"reaches {_pct(m['acc_finetuned'])} top-1 (dense {_pct(m.get('acc_dense'))}"
                        + (f", {_pct(m['acc_oneshot'])} one-shot before fine-tuning" if _num(m.get("acc_oneshot"))
                           is not None else "") + ")")
    d_name, p_name = _pick(latency, "dense"), _pick(latency, "pruned")
    if d_name and p_name:
        d1, p1 = latency[d_name]["batches"].get("1"), latency[p_name]["batches"].get("1")
        if d1 and p1 and _speedup(d1["p50_ms"], p1["p50_ms"]):
            headline.append(f"runs {_speedup(d1['p50_ms'], p1['p50_ms'])} at batch 1 on this host (measured)")
    if headline:
        intro += " In short: " + ", ".join(headline) + "."
    shows = verdict(m)
    if shows:
        intro = f"**{shows}** {intro}"
    quant = _dict(manifest.get("quantization"))
    if manifest.get("precision"):
        intro += f" Deployment precision: {manifest['precision']}"
        if quant.get("method"):
            intro += (f" (INT8 calibration: {quant['method']}, "
                      f"{'per-channel' if quant.get('per_channel') else 'per-tensor'} weights"
                      + (f", {quant['images']} images" if quant.get("images") else "") + ")")
        intro += "."
    doc.p(intro)

    _summary(doc, manifest, latency, host)

    # 1. accuracy vs FLOPs (+ sweep table)
    doc.h2("Accuracy vs FLOPs")
    rows = [r for r in (sweep or []) if isinstance(r, Mapping)]
    plotted = any(_num(r.get("flops_ratio")) is not None for r in rows)
    shown = _draw(doc, "accuracy_vs_flops", "Accuracy vs FLOPs",
                  ("Top-1 accuracy vs FLOPs per image (% of dense) for every pruned variant tried: filled markers "
                   "after fine-tuning, hollow before it (BN re-estimated). Dashed line and square: the dense model; "
                   "red star: this bundle." if plotted else
                   "Top-1 accuracy vs FLOPs (% of dense) of this bundle's pruned model at each step, with the dense "
                   "model as the dashed reference line (no sweep over other variants was given)."),
                  lambda: _plot_accuracy(manifest, rows))
    if rows:
        _sweep_table(doc, rows, m.get("acc_dense"))
    elif shown is None:
        doc.p("No accuracy or FLOPs figures in the manifest.")

    # 2. kept channels per layer
    dense_ch = _dict(arch.get("dense_channels"))
    if kept:
        doc.h2("Kept channels per layer")
        _draw(doc, "channels_per_layer", "Kept channels per layer",
              "Output channels per prunable conv: grey the dense count, blue what the pruned model keeps.",
              lambda: _plot_channels(manifest))
        own_keep = isinstance(rankings, Mapping) and any(
            _num(_dict(r).get("keep")) is not None for r in rankings.values())
        layer_rows = []
        for name, k in kept.items():
            d = _num(dense_ch.get(name))
            k_num = _num(k)
            cut = _dict(_dict(rankings).get(name)).get("keep") if isinstance(rankings, Mapping) else None
            layer_rows.append([name, "-" if d is None else f"{d:.0f}", "-" if k_num is None else f"{k_num:.0f}",
                               "-" if d is None or k_num is None else f"{d - k_num:.0f}",
                               "-" if not d or k_num is None else f"{100 * k_num / d:.1f}%",
                               *(["-" if cut is None else str(cut)] if own_keep else [])])
        doc.table(["layer", "dense", "kept", "removed", "kept %", *(["criterion's own keep"] if own_keep else [])],
                  layer_rows)

    # 3. CMI curves
    cmi_layers = _cmi_layers(manifest, rankings)
    if cmi_layers:
        doc.h2("CMI curves and cutoffs")
        _draw(doc, "cmi_curves", "CMI curves",
              "One panel per layer. Point k is cmi[k-1]: the conditional mutual information (nats) that the "
              "channels not yet selected still carry about the labels after the k-th channel of the greedy order "
              "is added (k = 0, when recorded, is the whole layer's CMI). The red dotted line and dot mark the "
              "cutoff at k = keep, i.e. the value cmi[keep-1].",
              lambda: _plot_cmi(cmi_layers))
        sat = [name for name, _, _, info in cmi_layers if info.get("saturated")]
        if sat:
            doc.p(f"Saturated layers (the kernel entropy reached its ceiling ln N before the order ended, so the "
                  f"tail of their curve carries little information): {', '.join(sat)}.")

    # 4. latency on this host, and on the device
    raw_latency = _dict(m.get("latency"))
    if raw_latency:
        doc.h2("Latency on this host (measured)")
        _draw(doc, "latency", "Latency per variant and batch size",
              f"Measured on {host}. Bars are the median (p50) latency of one batch, the whisker runs from p50 to "
              "p90; one panel per batch size.",
              lambda: _plot_host_latency(latency, host))
        lat_rows = []
        for name, r in raw_latency.items():
            r = _dict(r)
            batches = _dict(r.get("batches"))
            precision = _precision(str(name), r) or "-"
            if not batches or r.get("status", "ok") != "ok":
                lat_rows.append([name, r.get("backend", "-"), precision, r.get("threads", "-"), "-",
                                 f"not measured: {r.get('status', '?')}", "", "", "", "", ""])
                continue
            for b in sorted(batches, key=_batch_key):
                s = _dict(batches[b])
                mean, std = _num(s.get("mean_ms")), _num(s.get("std_ms"))
                tp = _num(s.get("throughput_ips"))
                lat_rows.append([name, r.get("backend", "-"), precision, r.get("threads", "-"), b,
                                 _ms_bare(s.get("p50_ms")), _ms_bare(s.get("p90_ms")), _ms_bare(s.get("p99_ms")),
                                 "-" if mean is None else _mean_std(mean, std),
                                 "-" if tp is None else f"{tp:.1f}", _mb(s.get("peak_rss_mb")).removesuffix(" MB")])
        doc.table(["variant", "backend", "precision", "threads", "batch", "p50 ms", "p90 ms", "p99 ms",
                   "mean ± std ms", "images/s", "peak RSS MB"], lat_rows)

    dev_rows = _device_rows(device_results)
    if dev_rows:
        doc.h2("On-device results (measured on the device)")
        _draw(doc, "device_latency", "On-device latency",
              "Measured on the device by the kit's `bench_on_device.py` (end-to-end per batch, host-to-device "
              "copies included for TensorRT). Bars are p50, whiskers p50 to p90.",
              lambda: _plot_device_latency(dev_rows))
        doc.table(["device", "backend", "power mode", "jetson_clocks", "precision", "batch", "p50 ms", "p90 ms",
                   "p99 ms", "images/s", "device memory MB"],
                  [[r.get("device") or "-", r.get("backend") or "-", r.get("power_mode") or "-",
                    {True: "yes", False: "no"}.get(r.get("jetson_clocks"), "-"), r.get("precision", "-"),
                    r.get("batch", "-"), _ms_bare(r.get("p50_ms")), _ms_bare(r.get("p90_ms")),
                    _ms_bare(r.get("p99_ms")),
                    "-" if _num(r.get("throughput_ips")) is None else f"{r['throughput_ips']:.1f}",
                    _mb(r.get("device_used_mb")).removesuffix(" MB")] for r in dev_rows])
        n_results = len(_dict(device_results).get("results") or [])
        doc.p(f"{n_results} result file(s) from the device, checked against this bundle's manifest.")

    # 5. memory
    memory = {str(k): _dict(v) for k, v in _dict(m.get("memory")).items() if isinstance(v, Mapping)}
    if memory:
        doc.h2("Memory vs the target's budget")
        budgets = {_num(r.get("memory_budget_mb")) for r in memory.values()} - {None}
        budget = budgets.pop() if len(budgets) == 1 else _num(target.get("memory_budget_mb"))
        gb = _num(target.get("memory_gb"))
        _draw(doc, "memory", "Memory vs budget",
              "Peak resident memory of the benchmark process on this host (measured, ONNX Runtime included) and "
              "the weights, against the memory budget of the target"
              + (f" ({budget:.0f} MB of its {gb:g} GB)" if budget and gb else "")
              + ". A variant that does not fit is drawn in red and hatched.",
              lambda: _plot_memory(memory, target))
        mem_rows = []
        for name, r in memory.items():
            fits = r.get("fits")
            mem_rows.append([name, {True: "yes", False: "**NO**"}.get(fits, "unknown"),
                             _mb(r.get("peak_rss_mb")), _mb(_bytes_mb(r.get("weights_bytes"))),
                             _mb(_bytes_mb(r.get("largest_activation_bytes"))),
                             _budget(r.get("memory_budget_mb") or target.get("memory_budget_mb")),
                             r.get("reason") or ""])
        doc.table(["variant", "fits", "peak RSS (measured)", "weights", "largest activation", "budget", "note"],
                  mem_rows)

    # 6. roofline
    roofline = _dict(m.get("roofline"))
    groups = _roofline_groups(roofline, target_name, target.get("default_precision"))
    if groups:
        doc.h2("Roofline latency (estimate)")
        _draw(doc, "roofline", "Roofline latency estimate",
              f"Roofline estimate (not measured): dense vs pruned per target; `{target_name}` (this bundle's target) "
              "at its default precision, the other targets at every precision estimated. A lower bound that "
              "assumes peak compute, full memory bandwidth and no launch overhead.",
              lambda: _plot_roofline(groups, target_name))
        bounds = any(g.get("bound_dense") or g.get("bound_pruned") for _, _, g in groups)
        doc.table(["target", "precision", "dense ms (estimate)", "pruned ms (estimate)", "speed-up (estimate)",
                   *(["bound, dense / pruned (estimate)"] if bounds else [])],
                  [[t + (" (this bundle)" if t == target_name else ""), p, _ms_bare(g.get("dense_ms")),
                    _ms_bare(g.get("pruned_ms")), _speedup(g.get("dense_ms"), g.get("pruned_ms")) or "-",
                    *([f"{g.get('bound_dense', '-')} / {g.get('bound_pruned', '-')}"] if bounds else [])]
                   for t, p, g in groups])
        doc.p("These are estimates from per-layer FLOPs and bytes against each target's datasheet peaks "
              "(see `toolchain/roofline.py`); real latency on a device is higher.")

    # footer
    versions = _dict(manifest.get("versions"))
    if versions:
        doc.h2("Versions")
        doc.p(", ".join(f"{k} {v}" for k, v in versions.items()) + f". Measured numbers come from {host}.")

    folder.joinpath("report.md").write_text(doc.markdown(), encoding="utf-8")
    folder.joinpath("report.html").write_text(doc.html(title), encoding="utf-8")
    plots = [folder / item.rel for kind, item in doc.blocks if kind == "fig"]
    for name in PLOTS:  # a plot of an earlier report of this folder that has no data now would be stale
        stale = folder / PLOTS_DIR / f"{name}.png"
        if stale not in plots:
            stale.unlink(missing_ok=True)
    return [folder / "report.md", folder / "report.html", *plots]



def write_sweep_report(folder: Path, rows: list[dict[str, Any]], *, title: str, notes: list[str] = ()) -> list[Path]:
    """One table and one accuracy-vs-FLOPs plot for the variants of a sweep (same baseline, same data)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dense = next((r.get("acc_dense") for r in rows if _num(r.get("acc_dense")) is not None), None)
    doc = _Doc(folder)
    doc.h1(title)
    for note in notes:
        doc.p(note)
    _draw(doc, "accuracy_vs_flops", "Accuracy vs FLOPs",
          "Top-1 accuracy vs FLOPs per image (% of dense) for every variant of the sweep: filled markers after "
          "fine-tuning, hollow before it (BN re-estimated). Dashed line and square: the dense model.",
          lambda: _plot_accuracy({"metrics": {"acc_dense": dense}}, rows))
    _sweep_table(doc, rows, dense)
    latency_rows = [[r["label"], _ms(r.get("latency_p50_ms")), _ms(r.get("dense_latency_p50_ms")),
                     _pct(r.get("acc_int8")), r.get("bundle", "-")] for r in rows]
    doc.table(["variant", "pruned p50 batch 1 (measured)", "dense p50 batch 1 (measured)", "top-1 INT8",
               "bundle"], latency_rows)
    folder.joinpath("report.md").write_text(doc.markdown(), encoding="utf-8")
    folder.joinpath("report.html").write_text(doc.html(title), encoding="utf-8")
    return [folder / "report.md", folder / "report.html", *[folder / item.rel for kind, item in doc.blocks
                                                             if kind == "fig"]]
