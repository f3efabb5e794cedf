"""Bench stage: latency of the dense and pruned ONNX models on the host with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.backends.base import benchmark

SUMMARY = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_ips", "peak_rss_mb")


def bench_models(models: dict[str, Path], *, input_shape: tuple[int, int, int], threads: int, runs: int,
                 batch_sizes: list[int], memory_budget_mb: int | None = None) -> dict[str, Any]:
    """{variant: full result} for each ONNX model, each measured in its own subprocess."""
    return {name: benchmark("onnxruntime", path, batch_sizes, threads=threads, runs=runs,
                            memory_budget_mb=memory_budget_mb, input_shape=input_shape).to_dict()
            for name, path in models.items()}


def latency_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per variant and batch size, the statistics people read (no per-run times)."""
    return {name: {"backend": r["backend"], "device": r["device"], "threads": r["threads"], "status": r["status"],
                   "batches": {str(b["batch_size"]): {k: b[k] for k in SUMMARY} for b in r["batches"]}}
            for name, r in results.items()}
