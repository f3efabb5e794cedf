"""Report stage: a human-readable report.md from the manifest (plots come with the benchmark suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _latency_rows(latency: dict[str, Any]) -> list[str]:
    rows = []
    for variant, result in latency.items():
        for batch, stats in (result.get("batches") or {}).items():
            rows.append(f"| {variant} | {batch} | {stats['p50_ms']:.3f} | {stats['p90_ms']:.3f} | "
                        f"{stats['p99_ms']:.3f} | {stats['throughput_ips']:.1f} |")
    return rows


def write_report(folder: Path, manifest: dict[str, Any]) -> Path:
    m, cfg = manifest["metrics"], manifest["config"]
    target = manifest["target"]
    target_name = target.get("name") if isinstance(target, dict) else target
    lines = [
        f"# build-edge report: {cfg['model']} on {manifest['data']['name']} for {target_name}",
        "",
        f"Criterion `{cfg['criterion']}`, {m['channels_removed']} of {m['channels_dense']} channels removed "
        f"from {len(manifest['architecture']['kept_counts'])} prunable layers.",
        "",
        "| | dense | pruned |",
        "|---|---|---|",
        f"| top-1 (PyTorch) | {_pct(m['acc_dense'])} | {_pct(m['acc_finetuned'])} |",
        f"| top-1 (ONNX Runtime) | | {_pct(m['acc_onnxruntime'])} |",
        f"| FLOPs / image | {m['flops_dense'] / 1e6:.1f} M | {m['flops_pruned'] / 1e6:.1f} M "
        f"({_pct(m['flops_ratio'])}) |",
        f"| parameters | {m['params_dense'] / 1e6:.3f} M | {m['params_pruned'] / 1e6:.3f} M "
        f"({_pct(m['params_ratio'])}) |",
        "",
        "Accuracy along the way: "
        f"right after removal {_pct(m['acc_pruned'])}, after BN re-estimation "
        f"{_pct(m['acc_pruned_bn_recalibrated'])}, after {cfg['finetune_epochs']} fine-tuning epochs "
        f"{_pct(m['acc_finetuned'])}. ONNX vs PyTorch max abs diff {m['onnx_parity_max_abs_diff']:.2e}.",
        "",
        "## Latency on this host (ONNX Runtime CPU, measured)",
        "",
        "| model | batch | p50 ms | p90 ms | p99 ms | images/s |",
        "|---|---|---|---|---|---|",
        *_latency_rows(m.get("latency", {})),
        "",
        "## Kept channels per layer",
        "",
        "| layer | dense | kept |",
        "|---|---|---|",
        *[f"| {name} | {manifest['architecture']['dense_channels'][name]} | {k} |"
          for name, k in manifest["architecture"]["kept_counts"].items()],
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
