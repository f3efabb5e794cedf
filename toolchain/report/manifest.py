"""A typed, read-only view of what the report reads: a bundle's manifest, the rankings, the device results.

The report runs on manifests of every age (an old bundle, a failed stage, a hand-written test dict), so
everything is optional. The guards live here, once: a figure that is missing or not a finite number is None,
a section that is missing or not a mapping is empty, and the report's sections read plain fields. Values
the report prints as they are (config settings, a backend's name) are kept as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from toolchain.report.format import num

PRECISIONS = ("fp32", "fp16", "int8")


def mapping(x: Any) -> dict[str, Any]:
    """A copy of `x` if it is a mapping, else an empty dict."""
    return dict(x) if isinstance(x, Mapping) else {}


@dataclass(frozen=True)
class Variant:
    """A benchmarked variant's name: ``<model>[-<backend>][/<precision>]``.

    The bench stage writes "dense/fp32", "pruned/fp32", "pruned/int8" (ONNX Runtime, the default backend)
    and "pruned-tensorrt/<precision>"; older manifests hold bare "dense" and "pruned". ``str`` gives the
    name back: ``str(Variant.parse(name)) == name`` for every string.
    """

    model: str
    backend: str | None = None
    precision: str | None = None

    @classmethod
    def parse(cls, name: str) -> Variant:
        stem, slash, precision = str(name).partition("/")
        model, dash, backend = stem.partition("-")
        return cls(model, backend if dash else None, precision if slash else None)

    def __str__(self) -> str:
        return (self.model + ("" if self.backend is None else f"-{self.backend}")
                + ("" if self.precision is None else f"/{self.precision}"))


def precision_of(name: str, entry: Mapping[str, Any]) -> str | None:
    """The entry's own precision, else the one its variant name ends with."""
    if entry.get("precision"):
        return str(entry["precision"])
    precision = Variant.parse(name).precision
    return precision if precision in PRECISIONS else None


def pick(variants: Mapping[str, Mapping[str, Any]], model: str, precision: str = "fp32") -> str | None:
    """The variant of `model` ("dense"/"pruned") on the default backend: the bare name, else
    <model>/<precision>, else (for fp32) one whose precision is unknown."""
    if model in variants:
        return model
    named = [n for n in variants if (v := Variant.parse(n)).model == model and v.backend is None]
    for n in named:
        if precision_of(n, variants[n]) == precision:
            return n
    if precision != "fp32":
        return None
    for n in named:
        if precision_of(n, variants[n]) in (None, "fp32"):
            return n
    return None


def _latency(raw: Any) -> dict[str, dict[str, Any]]:
    """Every variant as written, with ``batches`` a dict of dicts (empty where it was anything else)."""
    out = {}
    for name, r in mapping(raw).items():
        r = mapping(r)
        r["batches"] = {str(b): mapping(s) for b, s in mapping(r.get("batches")).items()}
        out[str(name)] = r
    return out


def _measured(latency: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Variants with measured batches only (failed or skipped runs have none)."""
    out = {}
    for name, r in latency.items():
        batches = {b: s for b, s in r["batches"].items() if num(s.get("p50_ms")) is not None}
        if batches and r.get("status", "ok") == "ok":
            out[name] = {**r, "batches": batches}
    return out


@dataclass(frozen=True)
class Metrics:
    """``manifest["metrics"]``: accuracies (top-1, 0..1), sizes, ratios (pruned / dense) and measurements."""

    acc_dense: float | None = None
    acc_pruned: float | None = None  # right after channel removal
    acc_pruned_bn_recalibrated: float | None = None
    acc_oneshot: float | None = None  # compensation refit + BN re-estimation, before fine-tuning
    acc_finetuned: float | None = None
    acc_onnxruntime: float | None = None
    acc_fp16: float | None = None
    acc_int8: float | None = None  # Q/DQ with exact int8 arithmetic
    acc_int8_host: float | None = None  # ONNX Runtime's int8 kernels
    flops_dense: float | None = None
    flops_pruned: float | None = None
    flops_ratio: float | None = None
    params_dense: float | None = None
    params_pruned: float | None = None
    params_ratio: float | None = None
    channels_dense: float | None = None
    channels_removed: float | None = None
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)  # {variant: entry}, as written
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)  # the ok ones, measured batches only
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # {variant: entry}
    roofline: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # {target: {precision: row}}
    finetune_history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch
    latency_budget: dict[str, Any] = field(default_factory=dict)  # a latency budget's predicted vs measured
    keys: frozenset[str] = frozenset()  # the keys written, a null value included

    @classmethod
    def parse(cls, raw: Any) -> Metrics:
        m = mapping(raw)
        scalars = {f.name: num(m.get(f.name)) for f in fields(cls)
                   if f.name.startswith(("acc_", "flops_", "params_", "channels_"))}
        latency = _latency(m.get("latency"))
        history = m.get("finetune_history")
        return cls(**scalars, latency=latency, measured=_measured(latency),
                   memory={str(k): dict(v) for k, v in mapping(m.get("memory")).items() if isinstance(v, Mapping)},
                   roofline={str(t): {str(p): dict(row) for p, row in mapping(per).items()
                                      if isinstance(row, Mapping)}
                             for t, per in mapping(m.get("roofline")).items()},
                   finetune_history=[dict(e) for e in history if isinstance(e, Mapping)]
                   if isinstance(history, list) else [],
                   latency_budget=mapping(m.get("latency_budget")),
                   keys=frozenset(str(k) for k in m))

    def p50_ms(self, variant: Variant | str, batch: int = 1) -> float | None:
        """The measured median latency of a benchmarked variant at one batch size (None if not measured)."""
        return num(self.latency.get(str(variant), {}).get("batches", {}).get(str(batch), {}).get("p50_ms"))

    def wrote(self, *keys: str) -> bool:
        """Whether the manifest has any of these keys, even with a null value (a stage ran, its figure lost)."""
        return any(k in self.keys for k in keys)


@dataclass(frozen=True)
class Target:
    """The target profile the bundle was built for; a manifest may name it only ("x86-cpu")."""

    name: str  # "?" when the manifest names none
    profile: dict[str, Any]  # as written; empty for a bare name
    memory_budget_mb: float | None
    memory_gb: float | None
    default_precision: Any

    @classmethod
    def parse(cls, raw: Any) -> Target:
        profile = mapping(raw)
        name = str(profile.get("name") or "?") if isinstance(raw, Mapping) else str(raw or "?")
        return cls(name, profile, num(profile.get("memory_budget_mb")), num(profile.get("memory_gb")),
                   profile.get("default_precision"))

    @property
    def profile_name(self) -> str:
        """The name in the profile itself ("?" for a target given by name only)."""
        return str(self.profile.get("name") or "?")


def _host_text(host: Mapping[str, Any], latency: Mapping[str, Mapping[str, Any]]) -> str:
    parts = [" ".join(str(p) for p in (host.get("machine"), host.get("system")) if p)]
    if host.get("cpus"):
        parts.append(f"{host['cpus']} CPUs")
    parts += sorted({str(r.get("device")) for r in latency.values() if r.get("device")})
    if host.get("cuda"):
        parts.append(f"GPU {host['cuda']}")
    parts = [p for p in parts if p]
    return f"this host ({', '.join(parts)})" if parts else "this host"


@dataclass(frozen=True)
class Manifest:
    """The bundle's ``manifest.json``, as the report reads it."""

    metrics: Metrics
    target: Target
    host: str  # "this host (x86_64 Linux, 2 CPUs, ...)": where the measured numbers come from
    model: str
    dataset: str
    test_images: Any  # how many test images the accuracies are on ("?" if unknown)
    criterion: str
    criterion_options: dict[str, Any]
    finetune_epochs: int | None
    bn_recalibration: int | None  # images
    compensation: Any  # "none", or the refit method
    kept: dict[str, Any]  # {layer: kept channels}, in network order
    dense_channels: dict[str, Any]  # {layer: dense channels}
    precision: str | None  # the deployment precision
    quantization: dict[str, Any]
    engine: dict[str, Any] | None  # the TensorRT engine stage's result, None if the manifest has none
    versions: dict[str, Any]

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Manifest:
        cfg, arch, data = mapping(raw.get("config")), mapping(raw.get("architecture")), mapping(raw.get("data"))
        metrics = Metrics.parse(raw.get("metrics"))
        engine = raw.get("engine")
        return cls(
            metrics=metrics, target=Target.parse(raw.get("target")),
            host=_host_text(mapping(raw.get("host")), metrics.latency),
            model=str(cfg.get("model") or arch.get("model") or "model"),
            dataset=str(data.get("name") or cfg.get("dataset") or "?"), test_images=data.get("test", "?"),
            criterion=str(cfg.get("criterion") or "?"), criterion_options=mapping(cfg.get("criterion_options")),
            finetune_epochs=cfg.get("finetune_epochs"), bn_recalibration=cfg.get("bn_recalibration"),
            compensation=cfg.get("compensation", "none"),
            kept=mapping(arch.get("kept_counts")), dense_channels=mapping(arch.get("dense_channels")),
            precision=raw.get("precision"), quantization=mapping(raw.get("quantization")),
            engine=dict(engine) if isinstance(engine, Mapping) else None, versions=mapping(raw.get("versions")))

    def layer_channels(self) -> list[tuple[str, float, float]]:
        """(layer, dense, kept) for every prunable layer with both counts, in network order."""
        rows = ((name, num(self.dense_channels.get(name)), num(k)) for name, k in self.kept.items())
        return [(name, d, k) for name, d, k in rows if d is not None and k is not None]


# -- the other inputs -------------------------------------------------------------------------------------------
Rankings = dict[str, dict[str, Any]]  # {layer: {"order", "scores", "keep", "info"}} (rankings.json)
CMILayer = tuple[str, list[float], "int | None", dict[str, Any]]  # name, cmi curve, keep, info


def read_rankings(raw: Any) -> Rankings | None:
    """The criterion's rankings, or None if none were given."""
    return {str(name): mapping(r) for name, r in raw.items()} if isinstance(raw, Mapping) else None


def cmi_layers(kept: Mapping[str, Any], rankings: Rankings | None) -> list[CMILayer]:
    """The layers whose ranking recorded a CMI curve: the pruned ones in network order, then the others."""
    if rankings is None:
        return []
    names = [n for n in kept if n in rankings] + [n for n in rankings if n not in kept]
    out = []
    for name in names:
        r = rankings[name]
        info = mapping(r.get("info"))
        curve = info.get("cmi")
        if not isinstance(curve, list) or not curve or any(num(v) is None for v in curve):
            continue
        keep = next((int(k) for v in (r.get("keep"), info.get("keep"), kept.get(name)) if (k := num(v)) is not None),
                    None)
        out.append((name, [float(v) for v in curve], keep, info))
    return out


@dataclass(frozen=True)
class DeviceResults:
    """What ``toolchain.kit.merge_device_results`` folded in: its summary rows with a measured p50."""

    rows: list[dict[str, Any]]
    files: int  # result files from the device

    @classmethod
    def parse(cls, raw: Any) -> DeviceResults:
        if not isinstance(raw, Mapping):
            return cls([], 0)
        rows = [dict(r) for r in raw.get("summary") or []
                if isinstance(r, Mapping) and num(r.get("p50_ms")) is not None]
        return cls(rows, len(raw.get("results") or []) if rows else 0)
