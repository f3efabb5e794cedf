"""Latency stage (only for ``--budget latency=...``): the table of what every conv costs on the target at
every width the allocator may choose (``toolchain.latency``).

Its key holds the whole target profile, the backend, precision, batch, threads and grid, so a changed
profile (or another target) measures again; a device table imported from the kit enters the key by its
hash. Measuring VGG16's table on the host is a couple of thousand one-conv timings (about a minute).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolchain.latency import (
    LEVELS,
    BackendTimer,
    LatencyTable,
    RooflineTimer,
    TorchTimer,
    candidate_counts,
    conv_terms,
    fit_weight_stream,
    measure_entries,
    measure_model,
    needed_specs,
)
from toolchain.stages import baseline
from toolchain.stages.base import StageContext

NAME = "latency"
TABLE = "table.json"
log = logging.getLogger("build_edge")


@dataclass(frozen=True)
class Inputs:
    baseline: str  # digest
    model: str
    target: dict[str, Any]  # the whole profile (TargetProfile.to_dict): a changed profile measures again
    backend: str  # "onnxruntime" or "torch" (measured on this host), or "roofline" (estimate)
    precision: str
    batch: int
    threads: int
    round_to: int
    levels: int = LEVELS
    device_table: str | None = None  # path of an imported device table ...
    device_table_sha256: str | None = None  # ... and its content, which is what keys it
    runs: int = 15  # timed calls per conv
    # how whole models are timed (the dense model here, the pruned candidates in the prune stage's closed loop):
    # "bench-median" = the deployed export through the bench stage's child process, median of 3 processes
    # (``latency.measure_model``); tables keyed before timed an in-process export and are measured again
    model_timing: str = "bench-median"


@dataclass
class Result:
    kind: str  # measured | estimate | device
    backend: str
    dense_ms: float
    overhead_ms: float
    entries: int
    measured_on: str


def grid(layers, round_to: int, levels: int) -> dict[str, list[int]]:
    """The kept counts the allocator may choose per layer (``toolchain.knapsack``): what the table covers."""
    return {layer.name: candidate_counts(layer.channels, levels, round_to, round_to) for layer in layers}


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    from toolchain.stages.prune import find_prunable_layers
    from toolchain.train.progress import progress_bar

    dense = baseline.load_model(ctx, inputs.baseline, inputs.model)
    shape = ctx.data.input_shape
    layers = find_prunable_layers(dense, torch.zeros(2, *shape))
    terms = conv_terms(dense, shape, layers)
    specs = needed_specs(terms, grid(layers, inputs.round_to, inputs.levels))
    if inputs.device_table:
        table = LatencyTable.load(Path(inputs.device_table))
        missing = [s for s in specs if s.key() not in table.entries]
        if missing:
            from toolchain.errors import UserError

            raise UserError(f"the device table {inputs.device_table} lacks {len(missing)} of the {len(specs)} conv "
                            f"shapes this model needs (e.g. {missing[0].key()}); measure them on the device with "
                            "the kit of a bundle built with this grid (bench_on_device.py --latency-table)")
    else:
        table = _measure(inputs, dense, shape, specs, [t.dense for t in terms], progress_bar)
    if not table.dense_ms:
        table.dense_ms = table.predict(terms, {})
    if inputs.device_table and not table.overhead_ms:
        table.overhead_ms = max(0.0, table.dense_ms - sum(table.ms(t.dense) for t in terms))
    table.save(folder / TABLE)
    log.info("latency table (%s, %s): %d convs, dense %.3f ms, overhead %.3f ms", table.kind, table.backend,
             len(table.entries), table.dense_ms, table.overhead_ms)
    return Result(table.kind, table.backend, float(table.dense_ms), float(table.overhead_ms), len(table.entries),
                  table.measured_on)


def _measure(inputs: Inputs, dense, shape, specs, dense_specs, progress_bar) -> LatencyTable:
    target = inputs.target
    if inputs.backend == "roofline":
        from toolchain.roofline import BYTES_PER_ELEMENT, estimate
        from toolchain.targets import profile_from_dict

        profile = profile_from_dict(target)
        peak, bw = profile.peak_ops_per_s(inputs.precision), profile.memory_bandwidth_bytes_per_s
        timer = RooflineTimer(peak, bw, BYTES_PER_ELEMENT[inputs.precision], inputs.batch)
        dense_ms = estimate(dense, profile, inputs.precision, inputs.batch, shape).total_latency_s * 1e3
        kind, measured_on = "estimate", f"roofline of {profile.name}"
    elif inputs.backend == "torch":  # a TensorRT target measured on this host's GPU (--latency-source host)
        import copy

        from toolchain.stages.export import fold_batchnorm

        timer = TorchTimer("cuda" if torch.cuda.is_available() else "cpu", inputs.precision, inputs.batch)
        dense_ms = timer.time_module(fold_batchnorm(copy.deepcopy(dense).float()), (inputs.batch, *shape))
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        kind, measured_on = "measured", f"{platform.node()} ({name}, torch)"
    else:
        timer = BackendTimer(inputs.backend, inputs.threads, inputs.batch, inputs.runs, warmup=10)
        dense_ms = _dense_ms(dense, shape, inputs)
        kind, measured_on = "measured", f"{platform.node()} ({platform.processor() or platform.machine()})"
    with progress_bar(len(specs), f"latency table ({kind})") as bar:
        entries = measure_entries(specs, timer, bar.advance)
    table = LatencyTable(target["name"], inputs.backend, inputs.precision, inputs.batch, inputs.threads,
                         kind, entries, 0.0, dense_ms, measured_on, inputs.levels)
    if kind == "measured":  # convs timed alone vs in the network: calibrate on the dense model (fit_weight_stream)
        fit_weight_stream(table, dense_specs, dense_ms)
    else:
        table.overhead_ms = max(0.0, dense_ms - sum(table.ms(s) for s in dense_specs))
    return table


def _dense_ms(dense, shape, inputs: Inputs) -> float:
    """The dense model itself, timed with the table's backend."""
    return measure_model(dense, tuple(shape), inputs.backend, inputs.threads, inputs.batch)


def load_table(ctx: StageContext, digest: str) -> LatencyTable:
    return LatencyTable.load(ctx.folder(NAME, digest) / TABLE)
