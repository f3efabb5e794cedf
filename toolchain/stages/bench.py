"""Bench stage: latency of the dense and pruned ONNX models on the host with ONNX Runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.backends.base import benchmark
from toolchain.report.manifest import Variant
from toolchain.roofline import compare, load_onnx
from toolchain.stages import tensorrt_engine
from toolchain.stages.base import StageContext
from toolchain.targets import list_targets
from toolchain.util import atomic_write_json

NAME = "bench"


@dataclass(frozen=True)
class Inputs:
    export: str  # digests of what is measured
    quantize: str
    engine: str
    threads: int  # the target's threads, at most this host's cores
    memory_budget_mb: int | None  # the target's: does each variant fit
    runs: int
    batch_sizes: tuple[int, ...]


@dataclass
class Result:
    latency: dict[str, Any]
    memory: dict[str, Any]
    roofline: dict[str, Any]


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    export = ctx.folder("export", inputs.export)
    # the variants' names are what the report, the sweep and the study read (report.Variant)
    variants = {str(Variant("dense", None, "fp32")): ("onnxruntime", export / "dense.onnx"),
                str(Variant("pruned", None, "fp32")): ("onnxruntime", export / "pruned.onnx"),
                str(Variant("pruned", None, "int8")): ("onnxruntime", ctx.folder("quantize", inputs.quantize)
                                                       / "model.int8.onnx")}
    engine = ctx.result(tensorrt_engine, inputs.engine)
    if engine.built:
        variants[str(Variant("pruned", "tensorrt", engine.precision))] = (
            "tensorrt", ctx.folder(tensorrt_engine.NAME, inputs.engine) / engine.file)
    results = bench_models(variants, input_shape=ctx.data.input_shape, threads=inputs.threads, runs=inputs.runs,
                           batch_sizes=list(inputs.batch_sizes), memory_budget_mb=inputs.memory_budget_mb)
    atomic_write_json(folder / "bench.json", results)
    return Result(latency=latency_summary(results), memory=memory_summary(results),
                  roofline=roofline_all_targets(export / "dense.onnx", export / "pruned.onnx", ctx.data.input_shape))

SUMMARY = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_ips", "peak_rss_mb")


def bench_models(models: dict[str, tuple[str, Path]], *, input_shape: tuple[int, int, int], threads: int,
                 runs: int, batch_sizes: list[int], memory_budget_mb: int | None = None) -> dict[str, Any]:
    """{variant: full result} for each (backend, model file), each measured in its own subprocess."""
    return {name: benchmark(backend, path, batch_sizes, threads=threads, runs=runs,
                            memory_budget_mb=memory_budget_mb, input_shape=input_shape).to_dict()
            for name, (backend, path) in models.items()}


def latency_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per variant and batch size, the statistics people read (no per-run times)."""
    return {name: {"backend": r["backend"], "device": r["device"], "threads": r["threads"], "status": r["status"],
                   "precision": Variant.parse(name).precision,
                   "batches": {str(b["batch_size"]): {k: b[k] for k in SUMMARY} for b in r["batches"]}}
            for name, r in results.items()}


def memory_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per variant: does it fit the target's memory budget, its peak RSS, weights and largest activation."""
    return {name: {"fits": r["fits"], "status": r["status"], "reason": r["reason"],
                   "peak_rss_mb": r["peak_rss_mb"], "baseline_rss_mb": r["baseline_rss_mb"],
                   "weights_bytes": r["weights_bytes"], "largest_activation_bytes": r["largest_activation_bytes"],
                   "memory_budget_mb": r["memory_budget_mb"]}
            for name, r in results.items()}


def roofline_all_targets(dense_onnx: Path, pruned_onnx: Path, input_shape: tuple[int, int, int],
                         batch: int = 1) -> dict[str, Any]:
    """Roofline ESTIMATES, dense vs pruned, for every target profile at each precision it supports."""
    dense, pruned = load_onnx(dense_onnx), load_onnx(pruned_onnx)
    out: dict[str, Any] = {}
    for target in list_targets():
        out[target.name] = {}
        for precision in target.precisions:
            cmp = compare(dense, pruned, target, precision, batch, input_shape)
            out[target.name][precision] = {"kind": "estimate", "batch": batch,
                                           "dense_ms": cmp.dense.total_latency_s * 1e3,
                                           "pruned_ms": cmp.pruned.total_latency_s * 1e3,
                                           "bound_dense": _dominant_bound(cmp.dense),
                                           "bound_pruned": _dominant_bound(cmp.pruned)}
    return out


def _dominant_bound(result) -> str:
    compute = sum(layer.latency for layer in result.layers if layer.bound == "compute")
    return "compute" if compute >= result.total_latency_s / 2 else "memory"
