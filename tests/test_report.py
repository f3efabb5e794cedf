"""The bundle report: report.md + self-contained report.html + plots/*.png, from a manifest dict."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest

from toolchain.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

LAYERS = {"features.0": 64, "features.4": 128, "features.8": 256, "features.11": 256, "features.15": 512,
          "features.18": 512, "features.22": 512, "features.25": 512}
KEPT = {"features.0": 40, "features.4": 77, "features.8": 131, "features.11": 120, "features.15": 200,
        "features.18": 180, "features.22": 96, "features.25": 64}


def _batch(p50: float, batch: int, rss: float) -> dict:
    return {"p50_ms": p50, "p90_ms": p50 * 1.12, "p99_ms": p50 * 1.3, "mean_ms": p50 * 1.02, "std_ms": p50 * 0.07,
            "throughput_ips": batch * 1000 / (p50 * 1.02), "peak_rss_mb": rss}


def _latency(backend_precision: str | None, p50_1: float, p50_8: float, rss: float) -> dict:
    entry = {"backend": "onnxruntime", "device": "AMD EPYC", "threads": 2, "status": "ok",
             "batches": {"1": _batch(p50_1, 1, rss), "8": _batch(p50_8, 8, rss + 40)}}
    if backend_precision:
        entry["precision"] = backend_precision
    return entry


def make_manifest() -> dict:
    """Same structure as a real bundle's manifest.json (tiny digits/vgg11_bn run), plus the newer sections."""
    flops_dense, flops_pruned = 305539072, 98765432
    params_dense, params_pruned = 9231114, 2890123
    return {
        "tool": "build-edge",
        "versions": {"python": "3.11.7", "torch": "2.15.0", "onnxruntime": "1.31.1", "build-edge": "0.1.0"},
        "host": {"machine": "x86_64", "system": "Linux", "cpus": 2, "cuda": None},
        "target": {"name": "jetson-orin-nano-8gb", "runtime": "tensorrt", "memory_gb": 8.0,
                   "memory_bandwidth_gbs": 68.0, "supports_int8": True, "supports_fp16": True,
                   "default_precision": "int8", "batch_sizes": [1, 8, 32], "memory_budget_mb": 150, "threads": 6,
                   "aliases": ["jetson"]},
        "config": {"target": "jetson", "seed": 0, "dataset": "digits", "model": "vgg11_bn", "criterion": "cmi",
                   "criterion_options": {"cutoff": "scree"}, "bn_recalibration": 128, "finetune_epochs": 3},
        "data": {"name": "digits", "classes": [str(i) for i in range(10)], "train": 300, "test": 100,
                 "input_shape": [3, 32, 32]},
        "architecture": {"model": "vgg11_bn", "kept_counts": dict(KEPT), "dense_channels": dict(LAYERS)},
        "metrics": {
            "acc_dense": 0.9312, "acc_pruned": 0.412, "acc_pruned_bn_recalibrated": 0.8015,
            "acc_finetuned": 0.9187, "acc_onnxruntime": 0.9186, "acc_int8": 0.915,
            "onnx_parity_max_abs_diff": 5.2e-06,
            "flops_dense": flops_dense, "flops_pruned": flops_pruned, "flops_ratio": flops_pruned / flops_dense,
            "params_dense": params_dense, "params_pruned": params_pruned,
            "params_ratio": params_pruned / params_dense,
            "channels_dense": sum(LAYERS.values()), "channels_removed": sum(LAYERS.values()) - sum(KEPT.values()),
            "latency": {"dense/fp32": _latency("fp32", 14.83, 92.4, 165.2),
                        "pruned/fp32": _latency("fp32", 6.18, 35.1, 91.0),
                        "pruned/int8": _latency("int8", 4.02, 21.7, 84.5)},
            "memory": {
                "dense/fp32": {"fits": False, "status": "does_not_fit", "peak_rss_mb": None,
                               "reason": "killed under the 150 MB budget: out of memory",
                               "weights_bytes": 36924456, "largest_activation_bytes": 2097152,
                               "memory_budget_mb": 150},
                "pruned/fp32": {"fits": True, "status": "ok", "peak_rss_mb": 131.0, "weights_bytes": 11560492,
                                "largest_activation_bytes": 1310720, "memory_budget_mb": 150},
                "pruned/int8": {"fits": True, "status": "ok", "peak_rss_mb": 124.5, "weights_bytes": 2890123,
                                "largest_activation_bytes": 327680, "memory_budget_mb": 150},
            },
            "roofline": {
                "jetson-orin-nano-8gb": {"fp32": {"dense_ms": 0.52, "pruned_ms": 0.19},
                                         "int8": {"dense_ms": 0.0412, "pruned_ms": 0.0187}},
                "raspberry-pi-5": {"fp32": {"dense_ms": 13.1, "pruned_ms": 4.26},
                                   "int8": {"dense_ms": 3.37, "pruned_ms": 1.12}},
            },
            "finetune_history": [{"loss": 2.05, "train_acc": 0.11, "test_acc": 0.1, "epoch": 1, "secs": 6.08}],
        },
        "engine": {"built": False, "reason": "TensorRT is not installed on this host"},
    }


def make_rankings() -> dict:
    """CMI rankings: per layer order/scores/keep and info with a decreasing CMI curve (C-1 values)."""
    out = {}
    for i, (name, channels) in enumerate(LAYERS.items()):
        total = 1.5 - 0.1 * i
        curve = [total * math.exp(-k / (4 + 3 * i)) + 1e-3 for k in range(1, channels)]
        out[name] = {"order": list(range(channels)), "scores": [float(channels - c) for c in range(channels)],
                     "keep": KEPT[name],
                     "info": {"cmi": curve, "cmi_total": total, "cutoff": "scree", "saturated": i >= 6,
                              "keep": KEPT[name]}}
    return out


def make_sweep() -> list[dict]:
    return [
        {"label": "l1-0.5", "criterion": "l1", "flops_ratio": 0.2529, "params_ratio": 0.2504,
         "acc_finetuned": 0.901, "acc_pruned_bn_recalibrated": 0.52, "acc_dense": 0.9312},
        {"label": "cmi-scree", "criterion": "cmi", "flops_ratio": 0.3232, "params_ratio": 0.3131,
         "acc_finetuned": 0.9187, "acc_pruned_bn_recalibrated": 0.8015, "acc_dense": 0.9312},
        {"label": "cmi-knee", "criterion": "cmi", "flops_ratio": 0.1805, "params_ratio": 0.1712,
         "acc_finetuned": 0.884, "acc_pruned_bn_recalibrated": 0.611, "acc_dense": 0.9312},
    ]


def make_device_results() -> dict:
    """The shape merge_device_results writes (results + summary rows)."""
    summary = []
    for precision, base in (("int8", 0.61), ("fp16", 0.93)):
        for batch in (1, 8):
            p50 = base * (1 if batch == 1 else 4.2)
            summary.append({"device": "NVIDIA Jetson Orin Nano", "backend": "tensorrt", "power_mode": "15W",
                            "jetson_clocks": True, "precision": precision, "batch": batch, "p50_ms": p50,
                            "p90_ms": p50 * 1.05, "p99_ms": p50 * 1.2, "throughput_ips": batch * 1000 / p50,
                            "device_used_mb": 38.5})
    return {"schema": "build-edge-device-results/1", "manifest_sha256": "0" * 64,
            "results": [{"source": "orin.json", "runs": []}], "summary": summary}


def _summary_rows(md: str) -> list[str]:
    section = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def _row(rows: list[str], starts: str) -> str:
    hits = [r for r in rows if r.startswith(f"| {starts}")]
    assert hits, f"no summary row starting with {starts!r} in:\n" + "\n".join(rows)
    return hits[0]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, list[Path], dict]:
    folder = tmp_path_factory.mktemp("bundle")
    manifest = make_manifest()
    written = write_report(folder, copy.deepcopy(manifest), rankings=make_rankings(), sweep=make_sweep(),
                           device_results=make_device_results())
    return folder, written, manifest


def test_report_files_and_plots(full_report):
    folder, written, _ = full_report
    md_path, html_path = folder / "report.md", folder / "report.html"
    assert md_path.is_file() and html_path.is_file()
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    pngs = sorted(p.relative_to(folder).as_posix() for p in (folder / "plots").glob("*.png"))
    expected = {"accuracy_vs_flops", "channels_per_layer", "cmi_curves", "latency", "device_latency", "memory",
                "roofline"}
    assert pngs == sorted(f"plots/{name}.png" for name in expected)
    assert sorted(written) == sorted([md_path, html_path, *(folder / p for p in pngs)])
    for rel in pngs:
        data = (folder / rel).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, rel
        assert f'href="{rel}"' in page, f"{rel} not linked from report.html"
        assert re.search(rf"\]\({re.escape(rel)}\)", md), f"{rel} not referenced from report.md"
    # every image is embedded, so the page shows its plots without the plots/ folder
    assert page.count('src="data:image/png;base64,') == len(pngs)


def test_html_is_self_contained(full_report):
    page = (full_report[0] / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|link|iframe)\b", page)
    for url in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert url.startswith("data:image/png;base64,") or url.startswith("plots/"), url


def test_estimates_are_labelled(full_report):
    md = (full_report[0] / "report.md").read_text(encoding="utf-8")
    section = md.split("## Roofline latency (estimate)", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| target"))
    numeric = [h.strip() for h in header.strip("|").split("|")][2:]
    assert numeric and all("estimate" in h for h in numeric), header
    # the chosen target at its default precision only, the others at every precision present
    assert "| jetson-orin-nano-8gb (this bundle) | int8 | 0.041 | 0.019 | 2.20× faster |" in section
    assert "| jetson-orin-nano-8gb (this bundle) | fp32 |" not in section
    assert "| raspberry-pi-5 | fp32 | 13.1" in section and "| raspberry-pi-5 | int8 | 3.370 |" in section
    # measured numbers are said to be measured, and where
    assert "## Latency on this host (measured)" in md and "this host (x86_64 Linux, 2 CPUs, AMD EPYC)" in md


def test_summary_matches_manifest(full_report):
    folder, _, manifest = full_report
    m = manifest["metrics"]
    rows = _summary_rows((folder / "report.md").read_text(encoding="utf-8"))
    top1 = _row(rows, "top-1 accuracy")
    assert f"| {100 * m['acc_dense']:.2f}% | {100 * m['acc_finetuned']:.2f}% | −1.25 pp |" in top1
    assert "| 41.20% |" in _row(rows, "top-1 right after channel removal")
    assert "| 80.15% |" in _row(rows, "top-1 after BN re-estimation")
    assert "| 91.86% |" in _row(rows, "top-1 of the exported ONNX")
    assert "| 91.50% |" in _row(rows, "top-1 INT8 (pruned")
    flops = _row(rows, "FLOPs per image")
    assert "305.54 M" in flops and "98.77 M" in flops and f"{100 * m['flops_ratio']:.2f}% of dense" in flops
    assert f"{100 * m['params_ratio']:.2f}% of dense" in _row(rows, "parameters")
    removed = m["channels_removed"]
    assert f"{removed} removed" in _row(rows, "conv channels")
    latency = _row(rows, "latency p50, batch 1 (this host")
    assert "14.83 ms" in latency and "6.180 ms" in latency and f"{14.83 / 6.18:.2f}× faster" in latency
    assert "4.020 ms" in _row(rows, "latency p50, batch 1, INT8")
    memory = _row(rows, "peak memory")
    assert "131.0 MB" in memory and "dense does NOT fit" in memory
    engine = _row(rows, "TensorRT engine")
    assert "not built here: TensorRT is not installed" in engine and "kit/build_engine.sh" in engine
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "<td>93.12%</td>" in page and f"<td>{100 * m['flops_ratio']:.2f}% of dense</td>" in page


def test_tables_cover_layers_latency_memory_sweep_device(full_report):
    md = (full_report[0] / "report.md").read_text(encoding="utf-8")
    assert "| features.22 | 512 | 96 | 416 | 18.8% | 96 |" in md
    assert "| pruned/int8 | onnxruntime | int8 | 2 | 8 | 21.70 | 24.30 |" in md
    assert "| dense/fp32 | **NO** | - |" in md and "out of memory" in md
    assert "| cmi-knee | cmi | 18.05% | 17.12% | 61.10% | - | 88.40% | −4.72 pp |" in md
    assert "| NVIDIA Jetson Orin Nano | tensorrt | 15W | yes | int8 | 1 | 0.610 |" in md
    assert "cmi[keep-1]" in md  # the cutoff convention of the CMI plot is spelled out


def test_minimal_manifest_still_reports(tmp_path):
    """No INT8, no CMI, no sweep, no device results, no memory/roofline/engine: fewer plots, no crash."""
    manifest = make_manifest()
    for key in ("acc_int8", "memory", "roofline"):
        del manifest["metrics"][key]
    del manifest["engine"]
    manifest["metrics"]["latency"] = {"dense": {"backend": "onnxruntime", "device": "AMD EPYC", "threads": 2,
                                                "status": "ok", "batches": {"1": _batch(14.83, 1, 165.2)}},
                                      "pruned": {"backend": "onnxruntime", "device": "AMD EPYC", "threads": 2,
                                                 "status": "error", "batches": {}}}
    l1 = {name: {"order": list(range(c)), "scores": [1.0] * c, "keep": None, "info": {}} for name, c in LAYERS.items()}
    written = write_report(tmp_path, manifest, rankings=l1)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["accuracy_vs_flops.png", "channels_per_layer.png", "latency.png"]
    assert len(written) == 5
    for name in pngs:
        assert f'href="plots/{name}"' in page and f"](plots/{name})" in md
    for absent in ("INT8", "CMI curves", "Roofline", "Memory vs", "On-device", "TensorRT engine"):
        assert absent not in md, absent
    assert "not measured: error" in md
    assert "93.12%" in _row(_summary_rows(md), "top-1 accuracy")

    # the bundle stage's old two-argument call, on a manifest with hardly anything in it
    bare = tmp_path / "bare"
    written = write_report(bare, {"metrics": {}, "config": {}, "architecture": {}, "target": "x86-cpu"})
    assert [p.name for p in written] == ["report.md", "report.html"]
    assert "x86-cpu" in (bare / "report.md").read_text() and not (bare / "plots").exists()


def test_odd_values_and_a_failing_plot_do_not_fail_the_bundle(tmp_path, monkeypatch):
    from toolchain import report

    manifest = make_manifest()
    m = manifest["metrics"]
    m["roofline"] = {"x86-cpu": "n/a", "raspberry-pi-5": {"fp32": {"dense_ms": None, "pruned_ms": None}}}
    m["memory"] = {"pruned/fp32": {"fits": None, "status": "error", "peak_rss_mb": None, "weights_bytes": None}}
    m["latency"]["pruned/int8"]["batches"]["1"]["p50_ms"] = "n/a"
    m["acc_finetuned"] = float("nan")

    def boom(_manifest):
        raise RuntimeError("no luck")

    monkeypatch.setattr(report.plots, "channels_per_layer", boom)
    written = write_report(tmp_path, manifest, rankings={"features.0": {"info": {"cmi": []}}}, sweep=[{"label": "x"}])
    md = (tmp_path / "report.md").read_text()
    assert "could not be drawn: RuntimeError: no luck" in md
    assert not (tmp_path / "plots" / "channels_per_layer.png").exists()
    assert "Roofline" not in md and "| pruned/fp32 | unknown | - |" in md
    assert {p.name for p in written} >= {"report.md", "report.html", "latency.png", "memory.png"}


@pytest.mark.parametrize("host, note", [(0.80, True), (0.912, False)])
def test_a_host_int8_figure_far_below_the_exact_one_is_explained(tmp_path, host, note):
    """The digits demo on an x86 CPU without VNNI: 98.89% exact int8, 86.11% through ONNX Runtime's fused kernels
    (the same kernels give 98.89% once the weights use 7 bits: 16-bit sums saturate). The report says so."""
    manifest = make_manifest()
    manifest["metrics"]["acc_int8_host"] = host
    write_report(tmp_path, manifest)
    md = (tmp_path / "report.md").read_text()
    assert f"| {100 * host:.2f}% |" in _row(_summary_rows(md), "top-1 INT8 with ONNX Runtime")
    assert ("The INT8 model keeps 91.50% with exact int8 arithmetic; the 11.50 pp lower figure" in md) is note
    assert ("VPMADDUBSW" in md) is note
    assert ("`int8_weight_bits: 7`" in md) is note  # the way out, for a build quantized with 8-bit weights
    manifest["precision"] = "int8"
    manifest["quantization"] = {**manifest.get("quantization", {}), "method": "minmax", "per_channel": True,
                                "reduce_range": True}
    write_report(tmp_path, manifest)
    md = (tmp_path / "report.md").read_text()
    assert "per-channel 7-bit weights" in md and "`int8_weight_bits: 7`" not in md


@pytest.mark.parametrize("acc, kept", [(0.945, True), (0.93, True), (0.929, False)])
def test_verdict_says_whether_the_accuracy_was_kept(acc, kept):
    from toolchain.report import verdict

    text = verdict({"acc_finetuned": acc, "acc_dense": 0.94, "flops_ratio": 0.25})
    assert ("keeps the dense model's accuracy" in text) is kept
    assert ("loses" in text) is not kept and "25.00% of the dense FLOPs" in text
    assert f"{100 * acc:.2f}%" in text
    assert verdict({"acc_dense": 0.94, "flops_ratio": 0.25}) == ""  # nothing fine-tuned: nothing to say


@pytest.mark.parametrize("name, parts", [("dense/fp32", ("dense", None, "fp32")),
                                         ("pruned/int8", ("pruned", None, "int8")),
                                         ("pruned-tensorrt/fp16", ("pruned", "tensorrt", "fp16")),
                                         ("dense", ("dense", None, None))])
def test_variant_names_parse_and_print_back(name, parts):
    from toolchain.report import Variant

    variant = Variant.parse(name)
    assert (variant.model, variant.backend, variant.precision) == parts
    assert str(variant) == name and Variant(*parts) == variant
