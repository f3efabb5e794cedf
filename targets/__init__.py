"""Hardware target profiles: one YAML per device, shipped as package data of ``toolchain.targets``.

A profile holds the facts later stages need (runtime, GPU/CPU, memory, dense peak throughput,
TensorRT/JetPack versions) and the toolchain's per-target choices (default precision, TensorRT
workspace, batch sizes to benchmark, host memory budget, threads). Every fact carries its source
(``sources``); figures from secondary sources are listed in ``unverified`` and derived ones
(formula in the YAML comment and in ``sources``) in ``estimated``.

Users pass a built-in name (``jetson-orin-nano-8gb``, the alias ``jetson``, ...) or a path to
their own YAML, which may start from a built-in profile with ``base: <name>`` and override any
field (nested blocks ``gpu``/``cpu``/``sources`` are merged key by key).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from toolchain.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")
RUNTIMES = ("tensorrt", "onnxruntime")
_PEAK_FIELD = {"fp32": "fp32_tflops", "fp16": "fp16_tflops", "int8": "int8_tops"}


@dataclass(frozen=True)
class GpuSpec:
    arch: str  # e.g. "Ampere"
    compute_capability: str  # e.g. "8.7"
    cuda_cores: int
    tensor_cores: int
    # dense peaks of the GPU alone (no DLA, no 2:4 sparsity); None = no fast path for it
    fp32_tflops: float
    fp16_tflops: float | None
    int8_tops: float | None
    clock_mhz: float | None = None  # max GPU clock of the power mode the peaks are for


@dataclass(frozen=True)
class CpuSpec:
    model: str
    cores: int
    fp32_tflops: float
    fp16_tflops: float | None
    int8_tops: float | None
    clock_ghz: float | None = None


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    runtime: str  # "tensorrt" | "onnxruntime"
    cpu: CpuSpec
    memory_gb: float
    memory_bandwidth_gbs: float
    supports_int8: bool
    supports_fp16: bool
    default_precision: str  # "fp32" | "fp16" | "int8"
    batch_sizes: tuple[int, ...]
    memory_budget_mb: int  # address-space budget for running the model on the host "as" this target
    threads: int  # ONNX Runtime intra-op threads
    gpu: GpuSpec | None = None
    aliases: tuple[str, ...] = ()
    dla_cores: int | None = None  # NVIDIA Deep Learning Accelerators (None: not an NVIDIA device)
    power_mode: str | None = None  # the power mode the figures are for
    jetpack: str | None = None
    tensorrt_major: int | None = None
    tensorrt_version: str | None = None
    workspace_mb: int | None = None  # TensorRT builder workspace
    max_onnx_opset: int | None = None  # highest ONNX opset its TensorRT parser reads (None: no limit known)
    # bits of the INT8 model's weights: 7 where ONNX Runtime runs int8 on x86 CPUs without VNNI, whose
    # kernels add pairs of 8-bit products in 16 bits (VPMADDUBSW) and saturate with full-range weights
    int8_weight_bits: int = 8
    sources: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    unverified: tuple[str, ...] = ()  # fields taken from secondary sources
    estimated: tuple[str, ...] = ()  # fields derived by a formula (see sources / YAML comments)
    origin: str = ""  # where the profile was read from (package resource or user file)

    # -- derived views -------------------------------------------------------------------------
    @property
    def compute_device(self) -> str:
        """The device the runtime computes on: "gpu" for TensorRT targets, "cpu" for ONNX Runtime."""
        return "gpu" if self.runtime == "tensorrt" else "cpu"

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p == "fp32" or getattr(self, f"supports_{p}"))

    def peak_ops_per_s(self, precision: str) -> float:
        """Dense peak of the compute device at `precision`, in FLOP/s (int8: OP/s)."""
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        spec = self.gpu if self.compute_device == "gpu" else self.cpu
        value = getattr(spec, _PEAK_FIELD[precision])
        if value is None or precision not in self.precisions:
            raise UserError(
                f"target {self.name!r} has no {precision} peak on its {self.compute_device}; "
                f"supported: {', '.join(self.precisions)}"
            )
        return float(value) * 1e12

    @property
    def memory_bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbs * 1e9

    def source_of(self, field_path: str) -> str | None:
        """Source of a dotted field ("gpu.cuda_cores"); the most specific key in `sources` wins."""
        parts = field_path.split(".")
        for i in range(len(parts), 0, -1):
            key = ".".join(parts[:i])
            if key in self.sources:
                return self.sources[key]
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples become lists on dump)."""
        out = dataclasses.asdict(dataclasses.replace(self, sources={}))
        out["sources"] = dict(self.sources)
        return out


# fields that are facts about the hardware/software (need a source), as dotted paths
FACT_FIELDS = (
    "gpu.arch", "gpu.compute_capability", "gpu.cuda_cores", "gpu.tensor_cores", "gpu.clock_mhz",
    "gpu.fp32_tflops", "gpu.fp16_tflops", "gpu.int8_tops",
    "cpu.model", "cpu.cores", "cpu.clock_ghz", "cpu.fp32_tflops", "cpu.fp16_tflops", "cpu.int8_tops",
    "memory_gb", "memory_bandwidth_gbs", "dla_cores", "power_mode", "jetpack", "tensorrt_major",
    "tensorrt_version", "supports_int8", "supports_fp16", "max_onnx_opset",
)  # fmt: skip

_NESTED = {"gpu": GpuSpec, "cpu": CpuSpec}


def _field_paths() -> set[str]:
    paths = set()
    for f in dataclasses.fields(TargetProfile):
        paths.add(f.name)
        if f.name in _NESTED:
            paths.update(f"{f.name}.{g.name}" for g in dataclasses.fields(_NESTED[f.name]))
    return paths


# -- generic typed construction from YAML data -----------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, source: str, path: str) -> Any:
    where = f"{source}: {path}"
    kind = typing.get_origin(tp)
    if kind in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise UserError(f"{where}: must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, source, path)
    if value is None:
        raise UserError(f"{where}: must not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, source, f"{path}.")
    if kind is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {type(value).__name__}")
        inner = typing.get_args(tp)[0]
        return tuple(_convert(v, inner, source, f"{path}[{i}]") for i, v in enumerate(value))
    if kind in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        return types.MappingProxyType({str(k): str(v) for k, v in value.items()})
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported field type {_type_name(tp)} at {where}")  # programming error


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "origin"}
    block = f" in {prefix.rstrip('.')}" if prefix else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown field {unknown[0]!r}{block}; valid: {', '.join(fields)}")
    missing = [
        n for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise UserError(f"{source}: missing required field(s){block}: {', '.join(missing)}")
    kwargs = {n: _convert(v, hints[n], source, f"{prefix}{n}") for n, v in data.items()}
    return cls(**kwargs)


def _positive(value: float | int | None, where: str, name: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{where}: {name} must be > 0, got {value}")


def _validate(p: TargetProfile, where: str) -> None:
    if p.runtime not in RUNTIMES:
        raise UserError(f"{where}: runtime {p.runtime!r} is not one of {', '.join(RUNTIMES)}")
    if p.default_precision not in PRECISIONS:
        raise UserError(
            f"{where}: default_precision {p.default_precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    if p.default_precision not in p.precisions:
        raise UserError(f"{where}: default_precision {p.default_precision} is not supported by the target")
    if p.runtime == "tensorrt":
        for name in ("gpu", "tensorrt_major", "workspace_mb"):
            if getattr(p, name) is None:
                raise UserError(f"{where}: runtime tensorrt needs {name}")
    if p.int8_weight_bits not in (7, 8):
        raise UserError(f"{where}: int8_weight_bits must be 8 or 7 (x86 CPUs without VNNI), got {p.int8_weight_bits}")
    if not p.batch_sizes or any(b <= 0 for b in p.batch_sizes):
        raise UserError(f"{where}: batch_sizes must be a non-empty list of positive integers")
    for name in ("memory_gb", "memory_bandwidth_gbs", "memory_budget_mb", "threads", "workspace_mb"):
        _positive(getattr(p, name), where, name)
    for prefix, spec in (("gpu", p.gpu), ("cpu", p.cpu)):
        if spec is None:
            continue
        for f in dataclasses.fields(spec):
            v = getattr(spec, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and f.name != "tensor_cores":
                _positive(v, where, f"{prefix}.{f.name}")
    # every supported precision needs a peak on the device the runtime computes on
    spec = p.gpu if p.compute_device == "gpu" else p.cpu
    for precision in p.precisions:
        if getattr(spec, _PEAK_FIELD[precision]) is None:
            raise UserError(
                f"{where}: supports {precision} but {p.compute_device}.{_PEAK_FIELD[precision]} is null"
            )
    valid = _field_paths()
    for list_name in ("unverified", "estimated"):
        for path in getattr(p, list_name):
            if path not in valid:
                raise UserError(f"{where}: {list_name} names unknown field {path!r}")


# -- reading -----------------------------------------------------------------------------------------
def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: invalid YAML{pos}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of profile fields, got {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=1)
def _builtin_raw() -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (raw YAML data, origin) for the profiles shipped in the package."""
    out: dict[str, tuple[dict[str, Any], str]] = {}
    root = resources.files("toolchain.targets")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        origin = f"toolchain.targets/{entry.name}"
        data = _parse_yaml(entry.read_text(encoding="utf-8"), origin)
        stem = entry.name[: -len(".yaml")]
        if data.get("name") != stem:
            raise UserError(f"{origin}: name {data.get('name')!r} does not match the file name")
        out[stem] = (data, origin)
    return out


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for name, (data, _) in _builtin_raw().items():
        for alias in data.get("aliases") or ():
            table[str(alias)] = name
    return table


def _resolve_name(name: str) -> str:
    raw = _builtin_raw()
    name = _aliases().get(name, name)
    if name not in raw:
        valid = sorted(raw) + sorted(_aliases())
        raise UserError(f"unknown target {name!r}; valid: {', '.join(valid)} (or a path to a YAML file)")
    return name


def _make(data: dict[str, Any], origin: str) -> TargetProfile:
    if "origin" in data:
        raise UserError(f"{origin}: 'origin' is set by the loader, not by the YAML")
    profile = dataclasses.replace(_build(TargetProfile, data, origin), origin=origin)
    _validate(profile, origin)
    return profile


def profile_from_dict(data: dict[str, Any]) -> TargetProfile:
    """The profile ``TargetProfile.to_dict`` wrote (a stage key holds it whole)."""
    return _make({k: v for k, v in data.items() if k != "origin"}, str(data.get("origin") or data.get("name")))


@functools.cache
def _builtin(name: str) -> TargetProfile:
    data, origin = _builtin_raw()[name]
    return _make(copy.deepcopy(data), origin)


def _merge(base: dict[str, Any], override: dict[str, Any], prefix: str = "") -> tuple[dict, list[str]]:
    """Deep-merge override into a copy of base; returns (merged, dotted paths overridden)."""
    merged = copy.deepcopy(base)
    changed: list[str] = []
    for key, value in override.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key], sub = _merge(merged[key], value, f"{path}.")
            changed += sub
        else:
            merged[key] = copy.deepcopy(value)
            changed.append(path)
    return merged, changed


def _load_file(path: Path) -> TargetProfile:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"target file {where!r} not found") from None
    except OSError as e:
        raise UserError(f"cannot read target file {where!r}: {e.strerror}") from None
    user = _parse_yaml(text, where)
    base_name = user.pop("base", None)
    if base_name is None:
        return _make(user, where)
    if not isinstance(base_name, str):
        raise UserError(f"{where}: base must be a target name, got {base_name!r}")
    base_key = _resolve_name(base_name)
    base_data, _ = _builtin_raw()[base_key]
    base_data = {k: v for k, v in base_data.items() if k != "aliases"}
    user.setdefault("name", path.stem)
    user.setdefault("description", f"{base_data['description']} (overridden by {path.name})")
    merged, changed = _merge(base_data, user)
    facts = [c for c in changed if c not in ("name", "description", "sources", "unverified", "estimated")]
    # an overridden fact is the user's: it is no longer unverified/estimated unless they say so
    for list_name in ("unverified", "estimated"):
        if list_name not in user:
            merged[list_name] = [
                f
                for f in base_data.get(list_name, [])
                if not any(f == c or f.startswith(c + ".") for c in facts)
            ]
    sources = dict(merged.get("sources") or {})
    for c in facts:
        if not c.startswith("sources.") and f"{c}" not in (user.get("sources") or {}):
            sources[c] = f"user override ({path.name}, base {base_key})"
    merged["sources"] = sources
    return _make(merged, f"{where} (base {base_key})")


# -- public API ----------------------------------------------------------------------------------------
def target_names() -> list[str]:
    """Built-in profile names (without aliases)."""
    return sorted(_builtin_raw())


def list_targets() -> list[TargetProfile]:
    """All built-in profiles, sorted by name."""
    return [_builtin(n) for n in target_names()]


def load_target(name_or_path: str | Path) -> TargetProfile:
    """A built-in profile by name or alias, or a user YAML (optionally ``base: <name>`` + overrides)."""
    if isinstance(name_or_path, Path):
        return _load_file(name_or_path)
    text = str(name_or_path).strip()
    if not text:
        raise UserError(f"empty target name; valid: {', '.join(target_names())}")
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text
    if looks_like_path or (text not in _builtin_raw() and text not in _aliases() and Path(text).is_file()):
        return _load_file(Path(text).expanduser())
    return _builtin(_resolve_name(text))


def _fmt(value: float | int | None, field_path: str, p: TargetProfile, digits: int = 4) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    if field_path in p.estimated:
        text += "*"
    if field_path in p.unverified:
        text += "?"
    return text


def format_targets_table(profiles: list[TargetProfile] | None = None, width: int | None = None) -> str:
    """A readable table of the profiles (for ``build-edge --list-targets``); width None: as wide as
    the table needs."""
    from rich.console import Console
    from rich.table import Table

    profiles = list_targets() if profiles is None else profiles
    aliases = ", ".join(f"{a} = {p.name}" for p in profiles for a in p.aliases)
    table = Table(
        title="Target profiles" + (f" (aliases: {aliases})" if aliases else ""),
        title_justify="left",
        caption_justify="left",
        caption=(
            "fp32/fp16 TFLOPS, int8 TOPS: dense peaks of the device the runtime computes on; "
            "* estimated (formula in the YAML), ? unverified (secondary source)"
        ),
    )
    table.add_column("target", no_wrap=True)
    table.add_column("runtime", no_wrap=True)
    table.add_column("compute (CUDA/tensor cores)", min_width=27)
    for col in ("mem GB", "BW GB/s", "fp32", "fp16", "int8", "JetPack/TRT", "default", "batches",
                "budget MB", "threads"):  # fmt: skip
        table.add_column(col, no_wrap=True)
    for p in profiles:
        dev = p.compute_device
        spec = p.gpu if dev == "gpu" else p.cpu
        if p.gpu is not None and dev == "gpu":
            g = p.gpu
            compute = (
                f"GPU {g.arch} {g.compute_capability}, {_fmt(g.cuda_cores, 'gpu.cuda_cores', p)}"
                f"/{_fmt(g.tensor_cores, 'gpu.tensor_cores', p)}"
            )
        else:
            compute = f"CPU {p.cpu.cores}x {p.cpu.model}"
        peaks = [
            _fmt(getattr(spec, _PEAK_FIELD[prec]), f"{dev}.{_PEAK_FIELD[prec]}", p)
            if prec in p.precisions else "-"
            for prec in PRECISIONS
        ]  # fmt: skip
        trt = "-"
        if p.tensorrt_major is not None:
            trt = f"{p.jetpack or '?'} / {p.tensorrt_version or p.tensorrt_major}"
            if "jetpack" in p.unverified or "tensorrt_version" in p.unverified:
                trt += "?"
        table.add_row(
            p.name, p.runtime, compute, _fmt(p.memory_gb, "memory_gb", p),
            _fmt(p.memory_bandwidth_gbs, "memory_bandwidth_gbs", p), *peaks, trt, p.default_precision,
            ",".join(map(str, p.batch_sizes)), str(p.memory_budget_mb), str(p.threads),
        )  # fmt: skip
    buf = io.StringIO()
    Console(file=buf, width=width or 1000, color_system=None, force_terminal=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


__all__ = [
    "PRECISIONS", "RUNTIMES", "FACT_FIELDS", "CpuSpec", "GpuSpec", "TargetProfile",
    "format_targets_table", "list_targets", "load_target", "target_names",
]  # fmt: skip
