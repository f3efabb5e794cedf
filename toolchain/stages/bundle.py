"""Bundle stage: copy the deliverables into a temporary folder, write manifest and report, rename."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from toolchain import kit
from toolchain import report as report_stage
from toolchain.config import Config
from toolchain.data import Dataset
from toolchain.models import create_model
from toolchain.stages.base import Done
from toolchain.stages.prune import PruneRecord, build_pruned
from toolchain.util import atomic_write_json, sha256_file

LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxsim", "onnxscript", "torch-pruning", "numpy",
             "scikit-learn", "build-edge")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = "not installed"
    return versions


def check_destination(dest: Path) -> None:
    """Refuse to replace ``dest`` unless it is absent or a build-edge bundle (its manifest says so)."""
    from toolchain.errors import UserError

    dest = Path(dest)
    if not dest.exists():
        return
    manifest = dest / "manifest.json"
    try:
        tool = json.loads(manifest.read_text()).get("tool") if dest.is_dir() and manifest.is_file() else None
    except (OSError, ValueError, AttributeError):
        tool = None
    if tool != "build-edge":
        raise UserError(f"{dest} exists and is not a build-edge bundle (no manifest.json of build-edge): "
                        f"refusing to replace it; choose another --run-name or --out")


def write_bundle(dest: Path, *, cfg: Config, target, data: Dataset, metrics: dict[str, Any],
                 files: dict[str, Path], extra_writers=(), extra: dict[str, Any] | None = None) -> Path:
    """Assemble the bundle at `dest` atomically. `extra_writers` are callables(folder) adding files."""
    dest = Path(dest)
    check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700: a bundle is for others (a web server, a device) to read
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (tmp / "labels.txt").write_text("\n".join(data.classes) + "\n")
        for writer in extra_writers:
            writer(tmp)
        architecture = json.loads((tmp / "architecture.json").read_text())
        manifest = {
            "tool": "build-edge",
            "versions": library_versions(),
            "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "target": target.to_dict(),
            "config": cfg.to_dict(),
            "data": {"name": data.name, "classes": data.classes, "train": len(data.train), "test": len(data.test),
                     "input_shape": list(data.input_shape), "mean": list(data.mean), "std": list(data.std)},
            "architecture": {"model": architecture["model"], "kept_counts": architecture["kept_counts"],
                             "dense_channels": architecture["channels"]},
            "metrics": metrics,
            **(extra or {}),
        }
        rankings = json.loads((tmp / "rankings.json").read_text()) if (tmp / "rankings.json").exists() else None
        report_stage.write_report(tmp, manifest, rankings=rankings)
        _write_manifest(tmp, manifest)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def collect_metrics(done: dict[str, Done]) -> dict[str, Any]:
    """The manifest's metrics from the stages' results (the keys the report, the sweep and the study read)."""
    base, pruned, ft = done["baseline"].result, done["prune"].result, done["finetune"].result
    exported, quantized, bench = done["export"].result, done["quantize"].result, done["bench"].result
    return {
        "acc_dense": base.test_acc,
        "acc_pruned": pruned.acc_pruned,
        "acc_pruned_bn_recalibrated": pruned.acc_pruned_bn_recalibrated,
        "acc_oneshot": pruned.acc_oneshot,
        **({"compensation_seconds": pruned.compensation["seconds"]} if pruned.compensation else {}),
        "acc_finetuned": ft.test_acc,
        "acc_onnxruntime": exported.pruned["onnxruntime_test_acc"],
        "acc_int8": quantized.acc_int8,
        "acc_int8_host": quantized.acc_int8_host,
        **({"acc_fp16": quantized.acc_fp16} if quantized.acc_fp16 is not None else {}),
        "onnx_parity_max_abs_diff": exported.pruned["parity_max_abs_diff"],
        "flops_dense": pruned.flops_dense, "flops_pruned": pruned.flops_pruned,
        "params_dense": pruned.params_dense, "params_pruned": pruned.params_pruned,
        "channels_dense": pruned.channels_dense, "channels_removed": pruned.channels_removed,
        "flops_ratio": pruned.flops_pruned / pruned.flops_dense,
        "params_ratio": pruned.params_pruned / pruned.params_dense,
        "latency": bench.latency,
        "memory": bench.memory,
        "roofline": bench.roofline,
        "finetune_history": ft.history,
        **({"latency_budget": latency_budget(done)} if "latency" in done else {}),
    }


def latency_budget(done: dict[str, Done]) -> dict[str, Any]:
    """A latency budget's prediction (the table's sum) beside what the bench stage measured at batch 1."""
    alloc, table = done["prune"].result.allocation or {}, done["latency"].result
    bench = done["bench"].result.latency or {}

    def p50(variant: str) -> float | None:
        return ((bench.get(variant) or {}).get("batches") or {}).get("1", {}).get("p50_ms")

    return {"budget": alloc.get("budget"), "budget_ms": alloc.get("budget_ms"),
            "predicted_ms": alloc.get("predicted_ms"), "predicted_dense_ms": alloc.get("dense_ms"),
            "table_budget_ms": alloc.get("table_budget_ms"), "rounds": alloc.get("rounds"),
            "table": table.kind, "table_backend": table.backend, "measured_on": table.measured_on,
            "measured_ms": p50("pruned/fp32"), "measured_dense_ms": p50("dense/fp32")}


def write_run_bundle(dest: Path, *, cfg: Config, target, precision: str, data: Dataset,
                     done: dict[str, Done]) -> Path:
    """The bundle of one pipeline run: the stages' deliverables, the device kit, manifest and report."""
    folder = {name: d.folder for name, d in done.items()}
    quantized, engine = done["quantize"].result, done["engine"].result
    files = {"model.onnx": folder["export"] / "pruned.onnx", "model.pt": folder["finetune"] / "model.pt",
             "architecture.json": folder["prune"] / "architecture.json",
             "rankings.json": folder["rank"] / "rankings.json", "bench.json": folder["bench"] / "bench.json",
             **{name: folder["quantize"] / name for name in quantized.files}}
    if engine.built:
        files[engine.file] = folder["engine"] / engine.file
    if "latency" in done:  # the table the budget read; the kit measures its shapes on the device (--latency-table)
        files["latency_table.json"] = folder["latency"] / "table.json"
    model_files = {"fp32": "model.onnx", "int8": "model.int8.onnx",
                   **({"fp16": "model.fp16.onnx"} if "model.fp16.onnx" in quantized.files else {})}

    def write_kit(into: Path) -> None:
        kit.write_kit(into, model_files=model_files, target=target, labels=data.classes, mean=data.mean,
                      std=data.std, input_size=data.input_shape)

    stages = {name: f.name for name, f in folder.items()}
    sensitivity = done["prune"].result.sensitivity
    if sensitivity and (folder["prune"].parent / sensitivity).is_dir():
        stages = {**{k: v for k, v in stages.items() if k in ("baseline", "rank")}, "sensitivity": sensitivity,
                  **{k: v for k, v in stages.items() if k not in ("baseline", "rank")}}
    return write_bundle(dest, cfg=cfg, target=target, data=data, metrics=collect_metrics(done), files=files,
                        extra_writers=[write_kit],
                        extra={"stages": stages, "precision": precision, "engine": engine.to_manifest(),
                               "quantization": quantized.quantization})


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Hash every file of the bundle (but the manifest) into the manifest and write it atomically."""
    manifest["files"] = {p.relative_to(folder).as_posix(): sha256_file(p)
                         for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    atomic_write_json(folder / "manifest.json", manifest)


def add_device_results(bundle: str | Path, result_paths: list[str]) -> dict[str, Any]:
    """Fold on-device benchmark results into a bundle: device_results.json, the report, the manifest."""
    from toolchain.errors import UserError
    from toolchain.kit import merge_device_results

    bundle = Path(bundle)
    if not (bundle / "manifest.json").is_file():
        raise UserError(f"{bundle} is not a build-edge bundle (no manifest.json)")
    manifest = json.loads((bundle / "manifest.json").read_text())
    # results name the manifest they verified on the device: the one as built, before any merge rewrote it
    build_sha = manifest.get("build_manifest_sha256") or sha256_file(bundle / "manifest.json")
    merged = merge_device_results(bundle, [Path(p) for p in result_paths], build_sha256=build_sha)
    manifest["build_manifest_sha256"] = build_sha
    rankings = json.loads((bundle / "rankings.json").read_text()) if (bundle / "rankings.json").exists() else None
    report_stage.write_report(bundle, manifest, rankings=rankings, device_results=merged)
    manifest["device_results"] = merged.get("summary")
    _write_manifest(bundle, manifest)
    return merged


def load_pruned_model(bundle: str | Path) -> torch.nn.Module:
    """The fine-tuned pruned model of a bundle, rebuilt from architecture.json + model.pt (weights only)."""
    bundle = Path(bundle)
    arch = json.loads((bundle / "architecture.json").read_text())
    dense = create_model(arch["model"], num_classes=arch["num_classes"]).eval()
    model = build_pruned(dense, torch.zeros(2, *arch["input_shape"]), PruneRecord.from_json(arch))
    model.load_state_dict(torch.load(bundle / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()
