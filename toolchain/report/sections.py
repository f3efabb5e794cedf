"""The sections of a bundle's report, in the order they appear; each adds its heading, plot and table.

Every section is optional: one whose data the manifest lacks adds nothing, and a missing figure only costs
its cell. What is measured (on this host, on the device) and what is estimated (the roofline) is said in
the headings and captions, because the two differ by an order of magnitude on a real device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from toolchain.report import plots
from toolchain.report.document import Doc, draw
from toolchain.report.format import batch_key, budget, bytes_mb, count, mb, mean_std, ms, ms_bare, num, pct, pp, speedup
from toolchain.report.manifest import DeviceResults, Manifest, Metrics, Rankings, cmi_layers, pick, precision_of

INT8_HOST_GAP = 0.01  # the host's int8 kernels trailing the exact int8 figure by more than this get a note

Row = list[Any]
_YES_NO: dict[Any, str] = {True: "yes", False: "no"}


# -- the opening paragraph and the summary table ---------------------------------------------------------------
def verdict(m: Metrics | Mapping[str, Any]) -> str:
    """What the run shows, in one plain sentence: did the pruned model keep the dense model's accuracy?"""
    if not isinstance(m, Metrics):
        m = Metrics.parse(m)
    acc, dense, flops = m.acc_finetuned, m.acc_dense, m.flops_ratio
    if acc is None or dense is None or flops is None:
        return ""
    delta = round(100 * (acc - dense), 2)  # as shown: -1.00 is within 1 point
    at = f"at {pct(flops)} of the dense FLOPs"
    if delta >= -1.0:
        return (f"The pruned model keeps the dense model's accuracy {at}: {pct(acc)} top-1 against "
                f"{pct(dense)} ({delta:+.2f} pt{', within 1 point' if delta < 0 else ''}).")
    return f"The pruned model loses {-delta:.2f} points of top-1 {at}: {pct(acc)} against {pct(dense)} dense."


def intro(doc: Doc, mf: Manifest) -> None:
    """The verdict in bold, the criterion and what it removed, the headline numbers, the precision."""
    m, opts = mf.metrics, mf.criterion_options
    text = f"Criterion `{mf.criterion}`" + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
    if m.channels_removed is not None and m.channels_dense is not None:
        text += (f": {m.channels_removed:.0f} of {m.channels_dense:.0f} channels removed from "
                 f"{len(mf.kept)} prunable conv layers.")
    else:
        text += "."
    headline = _headline(m)
    if headline:
        text += " In short: " + ", ".join(headline) + "."
    shows = verdict(m)
    if shows:
        text = f"**{shows}** {text}"
    quant = mf.quantization
    if mf.precision:
        text += f" Deployment precision: {mf.precision}"
        if quant.get("method"):
            text += (f" (INT8 calibration: {quant['method']}, "
                     f"{'per-channel' if quant.get('per_channel') else 'per-tensor'}"
                     + (" 7-bit" if quant.get("reduce_range") else "") + " weights"
                     + (f", {quant['images']} images" if quant.get("images") else "") + ")")
        text += "."
    doc.p(text)


def _headline(m: Metrics) -> list[str]:
    out = []
    if m.flops_ratio is not None:
        out.append(f"the pruned model needs {pct(m.flops_ratio)} of the dense FLOPs")
    if m.acc_finetuned is not None:
        out.append(f"reaches {pct(m.acc_finetuned)} top-1 (dense {pct(m.acc_dense)}"
                   + (f", {pct(m.acc_oneshot)} one-shot before fine-tuning" if m.acc_oneshot is not None else "")
                   + ")")
    d_name, p_name = pick(m.measured, "dense"), pick(m.measured, "pruned")
    if d_name and p_name:
        d1, p1 = m.measured[d_name]["batches"].get("1"), m.measured[p_name]["batches"].get("1")
        if d1 and p1 and speedup(d1["p50_ms"], p1["p50_ms"]):
            out.append(f"runs {speedup(d1['p50_ms'], p1['p50_ms'])} at batch 1 on this host (measured)")
    return out


def summary(doc: Doc, mf: Manifest) -> None:
    """Dense against pruned: accuracy at each step, size, batch-1 latency, memory, the TensorRT engine."""
    d1, p1, latency_rows = _latency_rows(mf.metrics)
    rows = [*_accuracy_rows(mf), *_size_rows(mf.metrics), *latency_rows, *_memory_rows(mf, d1, p1),
            *_engine_rows(mf.engine, doc.folder)]
    doc.h2("Summary")
    doc.table(["", "dense", "pruned", "change"], rows)
    doc.p(f"Accuracy is top-1 on the {mf.test_images} test images. Latency and memory "
          f"are measured on {mf.host}, not on the target; the roofline section holds estimates for the targets, "
          "and on-device measurements appear once the kit's results are folded in.")
    exact, host = mf.metrics.acc_int8, mf.metrics.acc_int8_host
    if exact is not None and host is not None and exact - host > INT8_HOST_GAP:
        # without this line a reader takes the host row for the INT8 model's accuracy and discards a good model
        doc.p(f"The INT8 model keeps {pct(exact)} with exact int8 arithmetic; the {100 * (exact - host):.2f} pp "
              f"lower figure of ONNX Runtime's fused int8 kernels on {mf.host} is that CPU's arithmetic, not the "
              "model's: on x86 CPUs without VNNI those kernels add pairs of 8-bit products in 16 bits (VPMADDUBSW), "
              "which saturate. TensorRT's INT8 kernels, and ONNX Runtime on CPUs with VNNI, accumulate in 32 bits"
              + ("." if mf.quantization.get("reduce_range") else
                 "; for such a CPU, a target profile with `int8_weight_bits: 7` (as x86-cpu has) quantizes the "
                 "weights to 7 bits, which do not saturate."))


def _accuracy_rows(mf: Manifest) -> list[Row]:
    m, dense, epochs = mf.metrics, mf.metrics.acc_dense, mf.finetune_epochs
    rows: list[Row] = [
        ["top-1 accuracy (PyTorch, test set), pruned after fine-tuning"
         + (f" ({epochs} epoch{'s' if epochs != 1 else ''})" if epochs else ""),
         pct(dense), pct(m.acc_finetuned), pp(m.acc_finetuned, dense)],
        ["top-1 right after channel removal", "", pct(m.acc_pruned), pp(m.acc_pruned, dense)],
        ["top-1 after BN re-estimation" + (f" ({mf.bn_recalibration} images)" if mf.bn_recalibration else ""),
         "", pct(m.acc_pruned_bn_recalibrated), pp(m.acc_pruned_bn_recalibrated, dense)],
    ]
    if m.acc_oneshot is not None and mf.compensation != "none":
        rows.append(["top-1 one-shot: compensation refit + BN re-estimation, before any gradient step", "",
                     pct(m.acc_oneshot), pp(m.acc_oneshot, dense)])
    if m.wrote("acc_onnxruntime"):  # the export stage ran: say so even if its figure is lost
        rows.append(["top-1 of the exported ONNX model (ONNX Runtime)", "", pct(m.acc_onnxruntime),
                     pp(m.acc_onnxruntime, dense)])
    for acc, label in ((m.acc_fp16, "top-1 FP16 (pruned, ONNX Runtime)"),
                       (m.acc_int8, "top-1 INT8 (pruned, Q/DQ with exact int8 arithmetic, as TensorRT computes it)"),
                       (m.acc_int8_host, "top-1 INT8 with ONNX Runtime's int8 kernels on this host")):
        if acc is not None:
            rows.append([label, "", pct(acc), pp(acc, dense)])
    return rows


def _size_rows(m: Metrics) -> list[Row]:
    rows: list[Row] = []
    if m.wrote("flops_dense", "flops_pruned"):
        rows.append(["FLOPs per image", count(m.flops_dense), count(m.flops_pruned), f"{pct(m.flops_ratio)} of dense"])
    if m.wrote("params_dense", "params_pruned"):
        rows.append(["parameters", count(m.params_dense), count(m.params_pruned), f"{pct(m.params_ratio)} of dense"])
    cd, cr = m.channels_dense, m.channels_removed
    if cd is not None and cr is not None:
        rows.append(["conv channels (prunable layers)", f"{cd:.0f}", f"{cd - cr:.0f}",
                     f"{cr:.0f} removed ({pct(cr / cd if cd else None)})"])
    return rows


def _latency_rows(m: Metrics) -> tuple[dict[str, Any], dict[str, Any], list[Row]]:
    """The batch-1 stats of dense and pruned (empty if not measured) and their rows, INT8's included."""
    batch1 = lambda name: m.measured[name]["batches"].get("1", {}) if name else {}
    d_name, p_name, i_name = pick(m.measured, "dense"), pick(m.measured, "pruned"), pick(m.measured, "pruned", "int8")
    d1, p1, i1 = batch1(d_name), batch1(p_name), batch1(i_name)
    rows: list[Row] = []
    if d1 or p1:
        rows.append([f"latency p50, batch 1 (this host, measured: {d_name or '-'} vs {p_name or '-'})",
                     ms(d1.get("p50_ms")), ms(p1.get("p50_ms")), speedup(d1.get("p50_ms"), p1.get("p50_ms"))])
    if i1:
        rows.append([f"latency p50, batch 1, INT8 ({i_name}, this host, measured)", "", ms(i1.get("p50_ms")),
                     f"{speedup(d1.get('p50_ms'), i1.get('p50_ms'))} than dense" if d1 else ""])
    return d1, p1, rows


def _memory_rows(mf: Manifest, d1: Mapping[str, Any], p1: Mapping[str, Any]) -> list[Row]:
    """Peak RSS of dense and pruned: the memory check's, else the batch-1 latency run's."""
    memory = mf.metrics.memory
    md, mp = memory.get(pick(memory, "dense") or "", {}), memory.get(pick(memory, "pruned") or "", {})
    peak_d = num(md.get("peak_rss_mb")) if md else num(d1.get("peak_rss_mb"))
    peak_p = num(mp.get("peak_rss_mb")) if mp else num(p1.get("peak_rss_mb"))
    if peak_d is None and peak_p is None and not md and not mp:
        return []
    limit = num(mp.get("memory_budget_mb")) or mf.target.memory_budget_mb
    note = f"budget {limit:.0f} MB" if limit else ""
    if mp.get("fits") is not None:
        note += ("; " if note else "") + ("pruned fits" if mp["fits"] else "pruned does NOT fit")
    if md.get("fits") is False:
        note += ("; " if note else "") + "dense does NOT fit"
    cell = lambda peak, r: "did not fit" if peak is None and r.get("fits") is False else mb(peak)
    return [["peak memory (RSS, this host, measured)", cell(peak_d, md), cell(peak_p, mp), note]]


def _engine_rows(engine: Mapping[str, Any] | None, folder: Path) -> list[Row]:
    if engine is None:  # an older manifest: the kit, if present, still builds the engine
        if (folder / "kit" / "build_engine.sh").is_file():
            return [["TensorRT engine", "", "not built here", "the kit builds it on the device: `kit/build_engine.sh`"]]
        return []
    if engine.get("built"):
        extra = ", ".join(f"{k} {v}" for k, v in engine.items() if k not in ("built", "reason") and
                          isinstance(v, (str, int, float)) and not isinstance(v, bool))
        return [["TensorRT engine", "", "built here" + (f" ({extra})" if extra else ""),
                 str(engine.get("reason") or "")]]
    return [["TensorRT engine", "", "not built here" + (f": {engine['reason']}" if engine.get("reason") else ""),
             f"the kit builds it on the device: `{engine.get('kit') or 'kit/build_engine.sh'}`"]]


# -- accuracy vs FLOPs, the pruned layers ----------------------------------------------------------------------
def accuracy(doc: Doc, mf: Manifest, sweep: list[Mapping[str, Any]]) -> None:
    doc.h2("Accuracy vs FLOPs")
    plotted = any(num(r.get("flops_ratio")) is not None for r in sweep)
    shown = draw(doc, "accuracy_vs_flops", "Accuracy vs FLOPs",
                 ("Top-1 accuracy vs FLOPs per image (% of dense) for every pruned variant tried: filled markers "
                  "after fine-tuning, hollow before it (BN re-estimated). Dashed line and square: the dense model; "
                  "red star: this bundle." if plotted else
                  "Top-1 accuracy vs FLOPs (% of dense) of this bundle's pruned model at each step, with the dense "
                  "model as the dashed reference line (no sweep over other variants was given)."),
                 lambda: plots.accuracy_vs_flops(mf.metrics, sweep))
    if sweep:
        sweep_table(doc, sweep, mf.metrics.acc_dense)
    elif shown is None:
        doc.p("No accuracy or FLOPs figures in the manifest.")


def sweep_table(doc: Doc, sweep: list[Any], dense: Any) -> None:
    """One row per variant of a sweep; each row's own dense accuracy is its reference, else `dense`."""
    rows = []
    for r in sweep:
        if not isinstance(r, Mapping):
            continue
        ref = r.get("acc_dense", dense)
        rows.append([r.get("label", "-"), r.get("criterion", "-"), pct(r.get("flops_ratio")),
                     pct(r.get("params_ratio")), pct(r.get("acc_pruned_bn_recalibrated")),
                     pct(r.get("acc_oneshot")) or "-", pct(r.get("acc_finetuned")),
                     pp(r.get("acc_finetuned"), ref) or "-"])
    if rows:
        doc.table(["variant", "criterion", "FLOPs (% of dense)", "params (% of dense)", "top-1 after BN re-est.",
                   "top-1 one-shot (compensated)", "top-1 fine-tuned", "vs dense"], rows)


def channels(doc: Doc, mf: Manifest, rankings: Rankings | None) -> None:
    """Dense and kept channels per prunable layer, and the keep the criterion chose on its own, if any."""
    if not mf.kept:
        return
    doc.h2("Kept channels per layer")
    draw(doc, "channels_per_layer", "Kept channels per layer",
         "Output channels per prunable conv: grey the dense count, blue what the pruned model keeps.",
         lambda: plots.channels_per_layer(mf.layer_channels()))
    own_keep = rankings is not None and any(num(r.get("keep")) is not None for r in rankings.values())
    rows = []
    for name, k in mf.kept.items():
        d, k_num = num(mf.dense_channels.get(name)), num(k)
        cut = rankings.get(name, {}).get("keep") if rankings is not None else None
        rows.append([name, "-" if d is None else f"{d:.0f}", "-" if k_num is None else f"{k_num:.0f}",
                     "-" if d is None or k_num is None else f"{d - k_num:.0f}",
                     "-" if not d or k_num is None else f"{100 * k_num / d:.1f}%",
                     *(["-" if cut is None else str(cut)] if own_keep else [])])
    doc.table(["layer", "dense", "kept", "removed", "kept %", *(["criterion's own keep"] if own_keep else [])],
              rows)


def cmi(doc: Doc, mf: Manifest, rankings: Rankings | None) -> None:
    layers = cmi_layers(mf.kept, rankings)
    if not layers:
        return
    doc.h2("CMI curves and cutoffs")
    draw(doc, "cmi_curves", "CMI curves",
         "One panel per layer. Point k is cmi[k-1]: the conditional mutual information (nats) that the "
         "channels not yet selected still carry about the labels after the k-th channel of the greedy order "
         "is added (k = 0, when recorded, is the whole layer's CMI). The red dotted line and dot mark the "
         "cutoff at k = keep, i.e. the value cmi[keep-1].",
         lambda: plots.cmi_curves(layers))
    sat = [name for name, _, _, info in layers if info.get("saturated")]
    if sat:
        doc.p(f"Saturated layers (the kernel entropy reached its ceiling ln N before the order ended, so the "
              f"tail of their curve carries little information): {', '.join(sat)}.")


# -- measured: this host, the device, memory ---------------------------------------------------------------------
def host_latency(doc: Doc, mf: Manifest) -> None:
    m = mf.metrics
    if not m.latency:
        return
    doc.h2("Latency on this host (measured)")
    draw(doc, "latency", "Latency per variant and batch size",
         f"Measured on {mf.host}. Bars are the median (p50) latency of one batch, the whisker runs from p50 to "
         "p90; one panel per batch size.",
         lambda: plots.latency(m.measured, mf.host))
    doc.table(["variant", "backend", "precision", "threads", "batch", "p50 ms", "p90 ms", "p99 ms",
               "mean ± std ms", "images/s", "peak RSS MB"], _latency_table(m.latency))


def latency_budget(doc: Doc, mf: Manifest) -> None:
    lb = mf.metrics.latency_budget
    if not lb:
        return
    doc.h2("Latency budget")
    kind = str(lb.get("table"))
    where = {"measured": f"measured on {lb.get('measured_on')}", "device": f"measured on the device "
             f"({lb.get('measured_on')}) with the kit", "estimate": f"an ESTIMATE ({lb.get('measured_on')})"}
    doc.p(f"Budget {lb.get('budget')} at batch 1: the channel counts were chosen against a latency table "
          f"{where.get(kind, kind)}. Predicted is that table's sum for the dense and the pruned model.")
    if lb.get("rounds"):
        doc.p(f"The table's budget was aimed by what the pruned model measured here ({len(lb['rounds'])} round(s): "
              + ", ".join(f"{r['table_budget_ms']:.3f} ms -> measured {r['measured_ms']:.3f}" for r in lb["rounds"])
              + ").")
    rows: list[Row] = [["budget", _ms(lb.get("budget_ms")), ""],
                       ["dense", _ms(lb.get("predicted_dense_ms")), _ms(lb.get("measured_dense_ms"))],
                       ["pruned", _ms(lb.get("predicted_ms")), _ms(lb.get("measured_ms"))]]
    doc.table(["", f"predicted ms ({kind})", "measured ms on this host (ORT p50)"], rows)
    if kind == "estimate":
        doc.p("The host measurement is of this machine, not the target: compare it with the prediction only for "
              "a table measured here.")


def _ms(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _latency_table(latency: Mapping[str, dict[str, Any]]) -> list[Row]:
    """One row per variant and batch; a variant that was not measured gets one row that says why."""
    rows: list[Row] = []
    for name, r in latency.items():
        batches, precision = r["batches"], precision_of(name, r) or "-"
        if not batches or r.get("status", "ok") != "ok":
            rows.append([name, r.get("backend", "-"), precision, r.get("threads", "-"), "-",
                         f"not measured: {r.get('status', '?')}", "", "", "", "", ""])
            continue
        for b in sorted(batches, key=batch_key):
            s = batches[b]
            mean, std, tp = num(s.get("mean_ms")), num(s.get("std_ms")), num(s.get("throughput_ips"))
            rows.append([name, r.get("backend", "-"), precision, r.get("threads", "-"), b,
                         ms_bare(s.get("p50_ms")), ms_bare(s.get("p90_ms")), ms_bare(s.get("p99_ms")),
                         "-" if mean is None else mean_std(mean, std),
                         "-" if tp is None else f"{tp:.1f}", mb(s.get("peak_rss_mb")).removesuffix(" MB")])
    return rows


def device(doc: Doc, dev: DeviceResults) -> None:
    rows = dev.rows
    if not rows:
        return
    doc.h2("On-device results (measured on the device)")
    draw(doc, "device_latency", "On-device latency",
         "Measured on the device by the kit's `bench_on_device.py` (end-to-end per batch, host-to-device "
         "copies included for TensorRT). Bars are p50, whiskers p50 to p90.",
         lambda: plots.device_latency(rows))
    doc.table(["device", "backend", "power mode", "jetson_clocks", "precision", "batch", "p50 ms", "p90 ms",
               "p99 ms", "images/s", "device memory MB"],
              [[r.get("device") or "-", r.get("backend") or "-", r.get("power_mode") or "-",
                _YES_NO.get(r.get("jetson_clocks"), "-"), r.get("precision", "-"),
                r.get("batch", "-"), ms_bare(r.get("p50_ms")), ms_bare(r.get("p90_ms")), ms_bare(r.get("p99_ms")),
                "-" if num(r.get("throughput_ips")) is None else f"{r['throughput_ips']:.1f}",
                mb(r.get("device_used_mb")).removesuffix(" MB")] for r in rows])
    doc.p(f"{dev.files} result file(s) from the device, checked against this bundle's manifest.")


def memory(doc: Doc, mf: Manifest) -> None:
    entries, target = mf.metrics.memory, mf.target
    if not entries:
        return
    doc.h2("Memory vs the target's budget")
    budgets = {num(r.get("memory_budget_mb")) for r in entries.values()} - {None}
    limit = budgets.pop() if len(budgets) == 1 else target.memory_budget_mb
    gb = target.memory_gb
    draw(doc, "memory", "Memory vs budget",
         "Peak resident memory of the benchmark process on this host (measured, ONNX Runtime included) and "
         "the weights, against the memory budget of the target"
         + (f" ({limit:.0f} MB of its {gb:g} GB)" if limit and gb else "")
         + ". A variant that does not fit is drawn in red and hatched.",
         lambda: plots.memory(entries, target.memory_budget_mb, gb, target.profile_name))
    fits: dict[Any, str] = {True: "yes", False: "**NO**"}
    rows = [[name, fits.get(r.get("fits"), "unknown"),
             mb(r.get("peak_rss_mb")), mb(bytes_mb(r.get("weights_bytes"))),
             mb(bytes_mb(r.get("largest_activation_bytes"))),
             budget(r.get("memory_budget_mb") or target.memory_budget_mb), r.get("reason") or ""]
            for name, r in entries.items()]
    doc.table(["variant", "fits", "peak RSS (measured)", "weights", "largest activation", "budget", "note"], rows)


# -- estimated: the roofline; the versions -----------------------------------------------------------------------
def roofline_groups(roofline: Mapping[str, Mapping[str, dict[str, Any]]], chosen: str,
                    default: Any) -> list[plots.RooflineGroup]:
    """(target, precision, {dense_ms, pruned_ms, ...}): the chosen target first at its default precision."""
    groups = []
    names = ([chosen] if chosen in roofline else []) + [n for n in roofline if n != chosen]
    for name in names:
        per = roofline[name]
        precisions = list(per)
        if name == chosen and default in precisions:
            precisions = [default]
        for p in precisions:
            row = per[p]
            if num(row.get("dense_ms")) is not None or num(row.get("pruned_ms")) is not None:
                groups.append((name, p, row))
    return groups


def roofline(doc: Doc, mf: Manifest) -> None:
    target = mf.target.name
    groups = roofline_groups(mf.metrics.roofline, target, mf.target.default_precision)
    if not groups:
        return
    doc.h2("Roofline latency (estimate)")
    draw(doc, "roofline", "Roofline latency estimate",
         f"Roofline estimate (not measured): dense vs pruned per target; `{target}` (this bundle's target) "
         "at its default precision, the other targets at every precision estimated. A lower bound that "
         "assumes peak compute, full memory bandwidth and no launch overhead.",
         lambda: plots.roofline(groups, target))
    bounds = any(g.get("bound_dense") or g.get("bound_pruned") for _, _, g in groups)
    doc.table(["target", "precision", "dense ms (estimate)", "pruned ms (estimate)", "speed-up (estimate)",
               *(["bound, dense / pruned (estimate)"] if bounds else [])],
              [[t + (" (this bundle)" if t == target else ""), p, ms_bare(g.get("dense_ms")),
                ms_bare(g.get("pruned_ms")), speedup(g.get("dense_ms"), g.get("pruned_ms")) or "-",
                *([f"{g.get('bound_dense', '-')} / {g.get('bound_pruned', '-')}"] if bounds else [])]
               for t, p, g in groups])
    doc.p("These are estimates from per-layer FLOPs and bytes against each target's datasheet peaks "
          "(see `toolchain/roofline.py`); real latency on a device is higher.")


def versions(doc: Doc, mf: Manifest) -> None:
    if mf.versions:
        doc.h2("Versions")
        doc.p(", ".join(f"{k} {v}" for k, v in mf.versions.items()) + f". Measured numbers come from {mf.host}.")
