"""The on-device kit written into every bundle, and the merge of the results it brings back.

``write_kit`` writes ``<bundle>/kit/``: ``build_engine.sh`` (trtexec, TensorRT 8/10/11),
``bench_on_device.py`` (standalone: checksum check, latency/throughput, power mode), ``labels.txt``,
``preprocess.json``, ``kit.json`` and ``README.md``. Write it before the bundle's manifest so the
manifest covers it. ``merge_device_results`` folds ``bench_on_device.py`` results into
``<bundle>/device_results.json`` (what ``bench-edge BUNDLE RESULT.json ...`` calls).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import stat
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from toolchain.errors import UserError
from toolchain.util import atomic_write_bytes, sha256_file

KIT_DIR = "kit"
KIT_SCHEMA = "build-edge-kit/1"
RESULT_SCHEMA = "build-edge-device-result/1"
RESULTS_SCHEMA = "build-edge-device-results/1"
RESULTS_FILE = "device_results.json"
PRECISIONS = ("fp32", "fp16", "int8")
_EXECUTABLE = stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def _template(name: str) -> str:
    return (resources.files("toolchain.kit") / "templates" / name).read_text(encoding="utf-8")


def _fill(text: str, values: Mapping[str, Any], name: str) -> str:
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", str(value))
    if "@@" in text:
        start = text.index("@@")
        raise RuntimeError(f"template {name}: unfilled placeholder near {text[start:start + 30]!r}")
    return text


def _atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), 0o644 if mode is None else mode)


def _target_dict(target: Any) -> dict[str, Any]:
    if hasattr(target, "to_dict"):
        target = target.to_dict()
    if not isinstance(target, Mapping):
        raise TypeError(f"target must be a mapping or a TargetProfile, got {type(target).__name__}")
    return dict(target)


def _input_name(onnx_path: Path) -> str:
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # unreadable here: the usual export name
        return "input"
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return names[0] if names else "input"


def _hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    size = [int(v) for v in input_size]
    if len(size) == 3:  # C, H, W
        size = size[1:]
    if len(size) != 2:
        raise UserError(f"input size must be an int, (H, W) or (C, H, W), got {list(input_size)}")
    return size[0], size[1]


def _check_kit_request(bundle_dir: Path, model_files: Mapping[str, str], layout: str, mean: Sequence[float],
                       std: Sequence[float], labels: list[str]) -> None:
    unknown = sorted(set(model_files) - set(PRECISIONS))
    if unknown or not model_files:
        raise UserError(f"model_files needs precisions among {', '.join(PRECISIONS)}, got {sorted(model_files)}")
    for precision, rel in model_files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise UserError(f"{precision} model {rel!r} must be a path inside the bundle")
        if not (bundle_dir / rel).is_file():
            raise UserError(f"{precision} model {rel!r} is not in the bundle {bundle_dir}")
    if layout != "NCHW":
        raise UserError(f"only NCHW models are supported, got layout {layout!r}")
    if len(mean) != len(std) or not mean or any(s <= 0 for s in std):
        raise UserError(f"mean and std need one value per channel and std > 0, got {list(mean)} / {list(std)}")
    if not labels or any("\n" in label for label in labels):
        raise UserError("labels must be a non-empty list of one-line class names")


def write_kit(bundle_dir: Path, *, model_files: Mapping[str, str], target: Any, labels: Sequence[str],
              mean: Sequence[float], std: Sequence[float], input_size: int | Sequence[int],
              layout: str = "NCHW") -> list[str]:
    """Write the on-device kit into ``<bundle_dir>/kit``; returns the written paths relative to the bundle.

    `model_files` maps precision (fp32/fp16/int8) to a model path relative to the bundle: the FP32 ONNX,
    the FP16 ONNX (TensorRT 11's fp16) and the symmetric Q/DQ INT8 ONNX. `target` is the target profile
    (a TargetProfile or its dict: name, tensorrt_major, tensorrt_version, workspace_mb, batch_sizes).
    """
    bundle_dir = Path(bundle_dir)
    labels = [str(label) for label in labels]
    _check_kit_request(bundle_dir, model_files, layout, mean, std, labels)

    prof = _target_dict(target)
    batch_sizes = sorted({int(b) for b in prof.get("batch_sizes") or (1,)})
    if batch_sizes[0] <= 0:
        raise UserError(f"batch sizes must be positive, got {batch_sizes}")
    workspace_mb = int(prof.get("workspace_mb") or 1024)
    height, width = _hw(input_size)
    shape = [len(mean), height, width]
    first = model_files.get("fp32") or next(iter(model_files.values()))
    input_name = _input_name(bundle_dir / first)
    precisions = [p for p in PRECISIONS if p in model_files]
    default = [str(prof.get("default_precision"))] if prof.get("default_precision") in precisions else precisions

    kit = bundle_dir / KIT_DIR
    kit_json = {
        "schema": KIT_SCHEMA,
        "target": {key: prof.get(key) for key in ("name", "runtime", "jetpack", "tensorrt_major", "tensorrt_version",
                                                  "workspace_mb", "power_mode")} | {"batch_sizes": batch_sizes},
        "model_files": {p: model_files[p] for p in precisions},
        "default_precisions": default,
        "input": {"name": input_name, "shape": shape, "layout": layout, "dtype": "float32"},
        "labels": "labels.txt",
        "preprocess": "preprocess.json",
        "engines_dir": "engines",
    }
    preprocess = {
        "color": "RGB",
        "layout": layout,
        "input_size": [height, width],
        "scale": 1 / 255,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "dtype": "float32",
        "formula": "x = (pixel_uint8 * scale - mean[c]) / std[c], channels in RGB order, then HWC -> CHW",
        "resize": f"to {height}x{width} (the training resolution)",
    }
    chw = "x".join(str(v) for v in shape)
    mid = batch_sizes[len(batch_sizes) // 2] if len(batch_sizes) > 2 else batch_sizes[-1]
    sh_values = {
        "TARGET": prof.get("name", "?"), "PRECISIONS": " ".join(precisions), "WORKSPACE_MB": workspace_mb,
        "INPUT_NAME": input_name, "INPUT_CHW": chw, "BATCH_MIN": batch_sizes[0], "BATCH_OPT": mid,
        "BATCH_MAX": batch_sizes[-1], "FP32_ONNX": model_files.get("fp32", ""),
        "FP16_ONNX": model_files.get("fp16", ""), "INT8_ONNX": model_files.get("int8", ""),
    }  # fmt: skip
    model_table = "\n".join(f"- {p}: `{model_files[p]}`" for p in precisions)
    readme_values = {
        "MODEL_NAME": Path(first).stem, "TARGET": prof.get("name", "?"), "NUM_CLASSES": len(labels),
        "MODEL_TABLE": model_table, "TRT_VERSION": prof.get("tensorrt_version") or prof.get("tensorrt_major") or "-",
        "PRECISIONS": " ".join(precisions), "BATCH_SIZES": " ".join(map(str, batch_sizes)),
        "PREPROCESS": (f"Resize to {height}x{width}, RGB, scale to [0, 1] (x 1/255), subtract mean "
                       f"{preprocess['mean']} and divide by std {preprocess['std']} per channel, then HWC -> CHW. "
                       "The same numbers are in `preprocess.json`."),
        "LAYOUT": layout, "INPUT_CHW": chw, "INPUT_NAME": input_name,
    }  # fmt: skip

    files = {
        "build_engine.sh": (_fill(_template("build_engine.sh"), sh_values, "build_engine.sh"), _EXECUTABLE),
        "bench_on_device.py": (_template("bench_on_device.py"), _EXECUTABLE),
        "latency_table.py": (_template("latency_table.py"), _EXECUTABLE),  # bench_on_device.py --latency-table
        "labels.txt": ("\n".join(labels) + "\n", None),
        "preprocess.json": (json.dumps(preprocess, indent=2) + "\n", None),
        "kit.json": (json.dumps(kit_json, indent=2) + "\n", None),
        "README.md": (_fill(_template("README.md"), readme_values, "README.md"), None),
    }
    for name, (text, mode) in files.items():
        _atomic_write_text(kit / name, text, mode)
    return [f"{KIT_DIR}/{name}" for name in files]


# -- results from the device ---------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return sha256_file(path)


def _load_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"device result {str(path)!r} not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read device result {str(path)!r}: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != RESULT_SCHEMA:
        raise UserError(f"{path} is not a bench_on_device.py result (schema {RESULT_SCHEMA})")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise UserError(f"{path} has no benchmark runs")
    for i, run in enumerate(runs):
        where = f"{path}: runs[{i}]"
        if not isinstance(run, dict) or not {"precision", "batch", "latency_ms"} <= set(run):
            raise UserError(f"{where} lacks precision, batch or latency_ms")
        if run["precision"] not in ("fp32", "fp16", "int8"):
            raise UserError(f"{where}.precision must be fp32, fp16 or int8, got {run['precision']!r}")
        if isinstance(run["batch"], bool) or not isinstance(run["batch"], int) or run["batch"] < 1:
            raise UserError(f"{where}.batch must be a positive integer, got {run['batch']!r}")
        latency = run["latency_ms"]
        if not isinstance(latency, dict) or not {"p50", "p90", "p99"} <= set(latency):
            raise UserError(f"{where}.latency_ms must be a mapping with p50, p90 and p99, got {latency!r}")
        for key in ("p50", "p90", "p99"):
            _check_number(f"{where}.latency_ms.{key}", latency[key])
        if run.get("throughput_ips") is not None:
            _check_number(f"{where}.throughput_ips", run["throughput_ips"])
        if run.get("memory") is not None and not isinstance(run["memory"], dict):
            raise UserError(f"{where}.memory must be a mapping, got {run['memory']!r}")
    for key in ("device", "power", "backend"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise UserError(f"{path}: {key} must be a mapping, got {data[key]!r}")
    bundle = data.get("bundle")
    if not isinstance(bundle, dict) or not isinstance(bundle.get("models_sha256", bundle.get("manifest_sha256")), str):
        raise UserError(f"{path} does not say which bundle it measured")
    return data


def _check_number(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{where} must be a finite number >= 0, got {value!r}")


def bundle_identity(files: Mapping[str, str]) -> str:
    """The sha256 over a bundle's model files (the kit's own rule, so both sides agree)."""
    return _kit_script().models_sha256(dict(files))


@functools.cache
def _kit_script():
    import importlib.util

    path = resources.files("toolchain.kit") / "templates" / "bench_on_device.py"
    spec = importlib.util.spec_from_file_location("build_edge_bench_on_device", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary_row(result: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    device = result.get("device") or {}
    power = result.get("power") or {}
    latency = run["latency_ms"]
    return {
        "device": device.get("model") or device.get("hostname"),
        "backend": (result.get("backend") or {}).get("name"),
        "power_mode": (power.get("nvpmodel") or {}).get("mode"),
        "jetson_clocks": (power.get("jetson_clocks") or {}).get("ran"),
        "precision": run["precision"],
        "batch": run["batch"],
        "p50_ms": latency["p50"],
        "p90_ms": latency["p90"],
        "p99_ms": latency["p99"],
        "throughput_ips": run.get("throughput_ips"),
        "device_used_mb": (run.get("memory") or {}).get("device_used_mb"),
    }


def merge_device_results(bundle_dir: Path, result_json_paths: Sequence[Path], *,
                         build_sha256: str | None = None) -> dict[str, Any]:
    """Fold on-device results into ``<bundle>/device_results.json`` (deduplicated); returns the merged table.

    A result must come from this very bundle: the manifest.json sha256 it verified on the device must be
    the bundle's (UserError otherwise, e.g. a result of an older build). `build_sha256` is the sha256 of the
    manifest as built, for bundles whose manifest was rewritten since (merging results re-renders the report).
    """
    bundle_dir = Path(bundle_dir)
    manifest = bundle_dir / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{bundle_dir} is not a bundle (no manifest.json)")
    if not result_json_paths:
        raise UserError("no device result given")
    manifest_sha = build_sha256 or _sha256(manifest)
    try:
        models_sha = bundle_identity(json.loads(manifest.read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{manifest} has no 'files' table of sha256 sums") from None
    out_path = bundle_dir / RESULTS_FILE
    merged: dict[str, Any] = {"schema": RESULTS_SCHEMA, "models_sha256": models_sha, "results": []}
    if out_path.is_file():
        try:
            previous = json.loads(out_path.read_text(encoding="utf-8"))
            if previous.get("schema") == RESULTS_SCHEMA and models_sha in (previous.get("models_sha256"),
                                                                            previous.get("manifest_sha256")):
                merged["results"] = list(previous.get("results", []))
        except (OSError, ValueError, AttributeError):
            pass  # a damaged table is rebuilt from the results given now
    seen = {r.get("result_sha256") for r in merged["results"]}
    for path in result_json_paths:
        data = _load_result(Path(path))
        # the model files identify the bundle (merges rewrite manifest and report); older kits sent the manifest's sum
        measured = data["bundle"].get("models_sha256")
        if measured is None and data["bundle"].get("manifest_sha256") == manifest_sha:
            measured = models_sha
        if measured != models_sha:
            raise UserError(f"{path} was measured on another bundle (its model files differ from {bundle_dir}'s)")
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        merged["results"].append({**data, "source": Path(path).name, "result_sha256": digest})
    merged["results"].sort(key=lambda r: (str(r.get("device", {}).get("hostname")), str(r.get("created"))))
    merged["summary"] = [_summary_row(r, run) for r in merged["results"] for run in r["runs"]]
    _atomic_write_text(out_path, json.dumps(merged, indent=2) + "\n")
    return merged


__all__ = ["KIT_DIR", "RESULTS_FILE", "merge_device_results", "write_kit"]
