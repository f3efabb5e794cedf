"""The run configuration: one flat typed dataclass; defaults <- YAML file <- CLI flags.

The resolved config is saved in the bundle, and stage cache keys hash the fields each stage
reads, so changing a fine-tuning flag re-runs fine-tuning and what follows, not ranking.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from toolchain.errors import UserError


@dataclass
class Config:
    # where and what for
    target: str = "jetson"
    out: str = "runs"
    run_name: str | None = None  # default: <dataset>-<model>-<criterion>-<target>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # data
    dataset: str = "digits"  # digits | cifar10 | imagefolder
    data_dir: str | None = None
    normalization: str = "auto"  # auto (dataset default / train-split stats) | cifar10 | imagenet
    train_subset: int | None = None  # use only this many (class-balanced) training images
    test_subset: int | None = None
    image_size: int = 32
    batch_size: int = 128
    # model and baseline
    model: str = "vgg16_bn"
    checkpoint: str | None = None  # a state dict; without it the baseline is trained first
    num_classes: int | None = None  # the checkpoint's head size (None: the data's classes); when it differs, the
    # head is replaced by one for the data's classes and the baseline trained from the checkpoint
    baseline_epochs: int = 30
    baseline_lr: float = 0.05
    baseline_cutout: int = 0  # the baseline's cutout square (see cutout; 0: off)
    # ranking and pruning
    criterion: str = "recon"  # measured best one-shot with compensation (benchmarks/bench_quality.py)
    criterion_options: dict[str, Any] = field(default_factory=dict)
    rank_samples: int | None = None  # class-balanced training images for data-driven criteria (None: the
    # criterion's own default, 256 (the CMI papers' N) for all of today's)
    keep_ratio: float = 0.5  # uniform fraction of channels kept per layer
    keep: dict[str, float] = field(default_factory=dict)  # per-layer: ratio (<=1) or count (>1)
    protect: str = "auto"  # layers kept whole: names/fnmatch patterns, stem, none or auto (toolchain.protect)
    round_to: int | None = None  # round kept counts to a multiple; default 1, or 8 for a latency budget on a GPU
    # with tensor cores (pipeline.resolve_round_to)
    budget: str | None = None  # "flops=0.4" / "params=0.2" / "channels=0.67" / "latency=0.5x" / "latency=12ms":
    # counts from the measured sensitivity
    sensitivity_fractions: list[float] | None = None  # kept fractions a budget's sensitivity probes per layer
    # (None: 0.75, 0.5, 0.25, 0.1; toolchain.allocation); each point costs one cut per layer, about 2 s for VGG16
    latency_source: str = "auto"  # a latency budget's table: auto | host | estimate (toolchain.latency)
    latency_levels: int = 16  # kept counts a latency budget chooses from per layer (the table's grid)
    bn_recalibration: int = 2000  # training images to re-estimate BN statistics after pruning
    fold: str = "none"  # none: plain removal | masked: fold removed channels' constants (pruned == masked)
    compensation: str = "lstsq"  # none | lstsq: refit each consumer towards the dense network's outputs
    compensation_samples: int = 2048  # class-balanced training images for the refit (measured at 40% removal:
    # 256 -> 1024 about +1 pt, 1024 -> 2048 +0.3 pt for recon and L1, benchmarks/bench_quality.py)
    # fine-tuning
    finetune_epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    distill: bool = False
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    cutout: int = 0  # fine-tune augmentation: zero one random SIZE x SIZE square per image (0: off)
    ema_decay: float | None = None  # fine-tune ends on an exponential moving average of its weights (None: off)
    distill_features: float | None = None  # weight of matching each cut layer's output to the dense one's (None: off)
    distill_flip: bool = False  # the teacher's logits: the mean over the image and its mirror
    amp: str = "auto"  # auto (bf16 on GPUs, and on CPUs with native bf16) | bf16 | off
    # export, deployable artifacts and checks
    opset: int | None = None  # default: 18, or the target's max_onnx_opset where its TensorRT parses less
    parity_tolerance: float = 1e-3
    precision: str | None = None  # fp32 | fp16 | int8; default: the target's
    calibration_samples: int = 512  # class-balanced training images for INT8 calibration
    calibration_method: str = "minmax"  # minmax | entropy | percentile
    # benchmarks
    bench_runs: int = 100
    bench_batch_sizes: list[int] | None = None  # default: 1 and the target's batch sizes

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.dataset}-{self.model}-{self.criterion}-{self.target}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# the exporters' range: the TorchScript exporter writes 13-17 (Jetson Nano's TensorRT 8.2 parses up to 13),
# the dynamo exporter 18 and up to the newest opset the installed onnx package knows
OPSET_MIN = 13
OPSET_MAX = 25
OPSET_DEFAULT = 18  # the dynamo exporter's own opset

_HINTS = get_type_hints(Config)
FIELD_NAMES = [f.name for f in fields(Config)]


def base_type(name: str) -> type:
    """The field's type without ``| None`` (int, float, bool, str or dict)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return typing.get_origin(hint) or hint


def list_item_type(name: str) -> type:
    """The element type of a list field (``list[float] | None`` -> float)."""
    hint = _HINTS[name]
    lists = [a for a in (*typing.get_args(hint), hint) if typing.get_origin(a) is list]
    return typing.get_args(lists[0])[0]


def _coerce(name: str, value: Any) -> Any:
    """Check a YAML/flag value against the field's type; one clear line when it does not fit."""
    kind = base_type(name)
    if value is None:
        if type(None) in typing.get_args(_HINTS[name]):
            return None
        raise UserError(f"config: {name} must not be empty")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config: {name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config: {name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config: {name} must be a number, got {value!r}")
        return float(value)
    if kind is list:
        item = list_item_type(name)
        noun = "numbers" if item is float else "integers"
        if isinstance(value, str):  # from a flag: "1,8,32"
            try:
                value = [item(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise UserError(f"config: {name} must be a comma-separated list of {noun}, got {value!r}") from None
        if item is float and isinstance(value, list):
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not isinstance(value, list) or not value or not all(isinstance(v, item) and not isinstance(v, bool)
                                                               and v > 0 for v in value):
            raise UserError(f"config: {name} must be a non-empty list of positive {noun}, got {value!r}")
        return list(value)
    if kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"config: {name} must be a mapping, got {value!r}")
        return dict(value)
    if not isinstance(value, str):
        raise UserError(f"config: {name} must be a string, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"invalid YAML in {p}{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {p} must be a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> Config:
    """defaults <- file <- flags (flags whose value is None were not given)."""
    merged: dict[str, Any] = {}
    for source in (file_values, {k: v for k, v in flag_values.items() if v is not None}):
        for key, value in source.items():
            if key not in _HINTS:
                raise UserError(f"config: unknown option {key!r}")
            if key in ("criterion_options", "keep") and key in merged:
                merged[key] = {**merged[key], **_coerce(key, value)}  # flags refine the file
            else:
                merged[key] = _coerce(key, value)
    cfg = Config(**merged)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if not 0.0 < cfg.keep_ratio <= 1.0:
        raise UserError(f"keep_ratio must be in (0, 1], got {cfg.keep_ratio}")
    for name, value in cfg.keep.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"keep[{name!r}] must be a ratio in (0, 1] or a channel count >= 1")
    positive = ("batch_size", "num_classes", "rank_samples", "round_to", "latency_levels", "bench_runs", "image_size",
                "calibration_samples", "compensation_samples")
    for name in positive:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("baseline_epochs", "finetune_epochs", "bn_recalibration"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("train_subset", "test_subset"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1")
    if cfg.lr <= 0 or cfg.baseline_lr <= 0:
        raise UserError("learning rates must be > 0")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise UserError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0.0 <= cfg.distill_alpha <= 1.0:
        raise UserError(f"distill_alpha must be in [0, 1], got {cfg.distill_alpha}")
    if cfg.opset is not None and not OPSET_MIN <= cfg.opset <= OPSET_MAX:
        raise UserError(f"opset must be in {OPSET_MIN}..{OPSET_MAX} (what the ONNX exporter writes), got {cfg.opset}")
    if cfg.run_name is not None and (cfg.run_name in ("", ".", "..") or "/" in cfg.run_name or "\\" in cfg.run_name
                                     or cfg.run_name.startswith(".")):
        raise UserError(f"run_name must be one folder name inside --out (no '/', not '.' or '..', not hidden), "
                        f"got {cfg.run_name!r}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise UserError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.weight_decay < 0:
        raise UserError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if not cfg.parity_tolerance > 0:
        raise UserError(f"parity_tolerance must be > 0, got {cfg.parity_tolerance}")
    for name in ("cutout", "baseline_cutout"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name} must be >= 0 (0: off), got {getattr(cfg, name)}")
        if getattr(cfg, name) >= cfg.image_size:  # a square as wide as the image blanks most images, or all
            raise UserError(f"{name} must be smaller than image_size ({cfg.image_size}), got {getattr(cfg, name)}")
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        raise UserError(f"ema_decay must be in (0, 1) (e.g. 0.999), got {cfg.ema_decay}")
    if cfg.distill_features is not None:
        if not cfg.distill_features > 0:
            raise UserError(f"distill_features must be > 0 (e.g. 1.0), got {cfg.distill_features}")
        if not cfg.distill:
            raise UserError("distill_features needs distill (the dense model is the teacher): add --distill")
    if cfg.distill_flip and not cfg.distill:
        raise UserError("distill_flip needs distill (the dense model is the teacher): add --distill")
    if not cfg.distill_temperature > 0:
        raise UserError(f"distill_temperature must be > 0, got {cfg.distill_temperature}")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.precision not in (None, "fp32", "fp16", "int8"):
        raise UserError(f"precision must be fp32, fp16 or int8, got {cfg.precision!r}")
    if cfg.calibration_method not in ("minmax", "entropy", "percentile"):
        raise UserError(f"calibration_method must be minmax, entropy or percentile, got {cfg.calibration_method!r}")
    if cfg.budget is not None:
        from toolchain.ranking.cutoffs import parse_budget

        parse_budget(cfg.budget)
        if cfg.keep:
            raise UserError("keep (per-layer counts) and budget are exclusive: the budget chooses every layer's count")
    from toolchain.protect import check_spec

    check_spec(cfg.protect)
    if cfg.sensitivity_fractions is not None and not all(0.0 < f < 1.0 for f in cfg.sensitivity_fractions):
        raise UserError(f"sensitivity_fractions must be kept fractions in (0, 1), got {cfg.sensitivity_fractions}")
    if cfg.latency_source not in ("auto", "host", "estimate"):
        raise UserError(f"latency_source must be auto, host or estimate, got {cfg.latency_source!r}")
    if cfg.fold not in ("none", "masked"):
        raise UserError(f"fold must be none or masked, got {cfg.fold!r}")
    if cfg.compensation not in ("none", "lstsq"):
        raise UserError(f"compensation must be none or lstsq, got {cfg.compensation!r}")
    if cfg.amp not in ("auto", "bf16", "off"):
        raise UserError(f"amp must be auto, bf16 or off, got {cfg.amp!r}")
    if cfg.normalization not in ("auto", "cifar10", "imagenet"):
        raise UserError(f"normalization must be auto, cifar10 or imagenet, got {cfg.normalization!r}")
