"""What to prune: the criterion interface (Torch-Pruning's "importance" idea, per layer).

A criterion is a callable ``criterion(ctx: RankContext) -> dict[layer_name, LayerRanking]``
registered in ``CRITERIA``. It knows nothing about surgery (toolchain.stages.prune) or about
when pruning happens (toolchain.pipeline). It owns its options: a frozen dataclass registered
with it (``CRITERIA.register("cmi", options=CMIOptions)``, see toolchain.ranking.options), which
the run's preflight parses (``check_options``) so that a bad or foreign option is refused before
anything is trained or written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from toolchain.registry import Registry


@dataclass
class PrunableLayer:
    """A conv whose output channels can be removed, with the other convs whose outputs are the same channels
    (``members``); its name names the group."""

    name: str  # qualified module name of the conv, e.g. "features.0"
    conv: nn.Conv2d
    bn_name: str | None  # the BatchNorm right after the conv (None if there is none)
    channels: int  # dense output channels
    flops: float  # dense FLOPs of this conv at the model's input size (2 * MACs)
    out_hw: tuple[int, int]  # spatial size of the conv output
    consumers: list[str] = field(default_factory=list)  # modules whose inputs shrink with it
    # other convs whose outputs are the same channels, cut with it: a depthwise conv it feeds, or convs whose
    # outputs are added to its own (a residual stream); `member_bns` their BatchNorms
    members: list[str] = field(default_factory=list)
    member_bns: list[str] = field(default_factory=list)
    residual: bool = False  # a residual stream: other convs' outputs are added to these channels
    # post-BN activation applied when capturing feature maps (ReLU for VGG/ResNet)
    activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu


@dataclass
class RankContext:
    model: nn.Module  # dense model, eval mode, on `device`
    layers: list[PrunableLayer]  # in network order
    images: torch.Tensor  # (N, 3, H, W) normalised, class-balanced training samples, on `device`
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)  # criterion options from the config
    seed: int = 0
    keep_ratio: float | None = None  # the run's uniform keep ratio (for criteria with a "ratio" cutoff)


@dataclass
class LayerRanking:
    order: list[int]  # all channel indices, most important first
    scores: list[float]  # one per channel, indexed by channel, higher = more important
    keep: int | None = None  # count chosen by the criterion itself (cutoffs, MIPP); None = policy
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able extras (curves, widths, flags)


Criterion = Callable[[RankContext], dict[str, LayerRanking]]
CRITERIA: Registry[Criterion] = Registry("criterion")
DEFAULT_SAMPLES = 256  # the CMI papers' N; a criterion may set ``fn.default_samples``


def default_samples(name: str) -> int:
    """Class-balanced images the criterion ``name`` sees when the run does not say."""
    return int(getattr(CRITERIA.get(name), "default_samples", DEFAULT_SAMPLES))


def check_options(name: str, options: Mapping[str, Any]) -> Any:
    """Refuse options criterion ``name`` does not read (naming the criteria that do) or that its options
    class rejects; returns the parsed options (None for a criterion without options)."""
    from toolchain.errors import UserError
    from toolchain.ranking.options import option_keys, parse

    cls = CRITERIA.options(name)
    takes = option_keys(cls)
    if "samples" in options:  # not a criterion's own setting: the rank stage draws the images for all
        raise UserError(f"criterion option samples is not an option of {name}: the ranking images are the run's "
                        "--samples (rank_samples in a YAML config)")
    for key in sorted(set(options) - set(takes)):
        others = [n for n in CRITERIA.names() if key in option_keys(CRITERIA.options(n))]
        where = f"; it is an option of {', '.join(others)}" if others else ""
        reads = f" (it reads {', '.join(takes)})" if takes else " (it takes no options)"
        raise UserError(f"criterion {name} does not take option {key}{reads}{where}")
    return None if cls is None else parse(cls, options, criterion=name)
