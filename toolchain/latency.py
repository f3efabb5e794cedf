"""Latency tables: what a conv costs on a target at every width a latency budget may choose.

FLOPs do not predict speed on small devices ("FLOPs decreased but FPS got worse", Torch-Pruning #382;
ONNX Runtime CPU slowed down until channel counts were rounded to 16, #38): a late 2x2 layer and an
early 32x32 layer with the same FLOPs differ in memory traffic, kernel choice and fixed cost. So a
latency budget reads a table, as HALP does (NVIDIA, NeurIPS 2022): one entry per conv shape
(batch, c_in, c_out, input size, kernel, stride, padding, groups), measured at exactly the widths
the allocator may choose (``candidate_counts``, the grid; nothing is interpolated), for one
(target, backend, precision, batch, threads).

Three sources, said wherever a figure shows (``LatencyTable.kind``):

- ``measured``: on this host, each conv built as a one-node ONNX model (Conv + ReLU, BatchNorm
  folded as the exporters do) and timed with the benchmark's own backend (``toolchain.backends``:
  ONNX Runtime CPU for ``x86-cpu``, the median of timed runs after warm-up);
- ``estimate``: the roofline of each conv on the target's profile (``toolchain.roofline``), for
  targets this host is not (Jetson, Raspberry Pi);
- ``device``: a table the kit measured on the device (``bench_on_device.py --latency-table``),
  imported with ``bench-edge import-latency-table``; later builds for that target use it.

A model's latency is predicted as the sum of its convs' entries plus ``overhead_ms``: the dense
model's own latency (measured, or the roofline's whole-model estimate) minus its convs' entries,
i.e. what the table does not cover (pooling, the classifier, the runtime's fixed cost), assumed not
to change with the widths.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.errors import BuildError, UserError
from toolchain.ranking.base import PrunableLayer
from toolchain.util import atomic_write_json

KINDS = ("measured", "estimate", "device")
TABLE_FORMAT = 1
LEVELS = 16  # candidate kept counts per layer: 1/16 .. 16/16 of its channels


@dataclass(frozen=True)
class ConvSpec:
    """One conv call: input ``(batch, c_in, h, w)``, ``c_out`` filters, 2-d kernel/stride/padding/dilation."""

    c_in: int
    c_out: int
    h: int
    w: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def key(self) -> str:
        k, s, p, d = self.kernel, self.stride, self.padding, self.dilation
        return (f"{self.c_in}-{self.c_out}-{self.h}x{self.w}-k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-p{p[0]}x{p[1]}"
                f"-d{d[0]}x{d[1]}-g{self.groups}")

    @classmethod
    def from_key(cls, key: str) -> ConvSpec:
        c_in, c_out, hw, k, s, p, d, g = key.split("-")

        def pair(text: str) -> tuple[int, int]:
            a, b = text[1:].split("x")
            return int(a), int(b)

        h, w = (int(v) for v in hw.split("x"))
        return cls(int(c_in), int(c_out), h, w, pair(k), pair(s), pair(p), pair(d), int(g[1:]))

    def out_size(self) -> tuple[int, int]:
        def one(n: int, i: int) -> int:
            return (n + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1

        return one(self.h, 0), one(self.w, 1)

    def flops(self, batch: int = 1) -> float:
        """2 per multiply-accumulate, as ``toolchain.cost.layer_flops`` counts."""
        ho, wo = self.out_size()
        return 2.0 * batch * self.c_out * ho * wo * (self.c_in // self.groups) * self.kernel[0] * self.kernel[1]


@dataclass(frozen=True)
class LatencyTerm:
    """A conv of the model: its dense shape, and the prunable layers (groups) whose kept counts set its output
    and input channels (None: fixed). A depthwise conv follows its own channels: ``inp`` None, groups = out."""

    module: str
    dense: ConvSpec
    out: str | None
    inp: str | None

    def spec(self, counts: dict[str, int]) -> ConvSpec:
        c_out = counts.get(self.out, self.dense.c_out) if self.out else self.dense.c_out
        c_in = counts.get(self.inp, self.dense.c_in) if self.inp else self.dense.c_in
        depthwise = self.dense.groups > 1 and self.dense.groups == self.dense.c_in
        if depthwise:
            c_in = groups = c_out
        else:
            groups = self.dense.groups
        return ConvSpec(c_in, c_out, self.dense.h, self.dense.w, self.dense.kernel, self.dense.stride,
                        self.dense.padding, self.dense.dilation, groups)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_terms(model: nn.Module, input_shape: Sequence[int], layers: Sequence[PrunableLayer]) -> list[LatencyTerm]:
    """Every Conv2d call of `model` on one image of `input_shape`, tied to the prunable `layers` as the cost model
    ties them (``toolchain.cost.CostModel``)."""
    group = {conv: layer.name for layer in layers for conv in (layer.name, *layer.members)}
    producer = {c: layer.name for layer in layers for c in layer.consumers}
    names = {m: n for n, m in model.named_modules()}
    terms: list[LatencyTerm] = []

    def hook(conv: nn.Conv2d, inputs: tuple, _out: Any) -> None:
        name = names[conv]
        x = inputs[0]
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise UserError(f"latency table: conv {name} uses padding {conv.padding!r}/{conv.padding_mode}; only "
                            "explicit zero padding is supported")
        spec = ConvSpec(conv.in_channels, conv.out_channels, int(x.shape[-2]), int(x.shape[-1]),
                        _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation),
                        conv.groups)
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        terms.append(LatencyTerm(name, spec, group.get(name), None if depthwise else producer.get(name)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    p = next(model.parameters())
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return terms


def candidate_counts(channels: int, levels: int = LEVELS, step: int = 1, floor: int = 1) -> list[int]:
    """The kept counts a latency budget may choose for a layer of `channels`: ``levels`` evenly spaced fractions,
    each a multiple of `step` (at least `floor`), and the whole layer; ascending."""
    step = max(1, int(step))
    out = {channels}
    for j in range(1, levels + 1):
        k = int(round(channels * j / levels / step)) * step
        if max(floor, step) <= k <= channels:
            out.add(k)
    return sorted(out)


def needed_specs(terms: Iterable[LatencyTerm], candidates: dict[str, Sequence[int]]) -> list[ConvSpec]:
    """Every conv shape the allocator can ask for: each term at each pair of its layers' candidate counts."""
    specs: dict[str, ConvSpec] = {}
    for term in terms:
        outs = candidates.get(term.out, [None]) if term.out else [None]
        ins = candidates.get(term.inp, [None]) if term.inp else [None]
        for k_out in outs:
            for k_in in ins:
                counts = {n: k for n, k in ((term.out, k_out), (term.inp, k_in)) if n and k is not None}
                s = term.spec(counts)
                specs[s.key()] = s
    return sorted(specs.values(), key=lambda s: s.key())


# -- the table --------------------------------------------------------------------------------------------


@dataclass
class LatencyTable:
    target: str
    backend: str  # "onnxruntime", "torch", "tensorrt" or "roofline"
    precision: str
    batch: int
    threads: int
    kind: str  # KINDS
    entries: dict[str, float] = field(default_factory=dict)  # ConvSpec.key() -> ms
    overhead_ms: float = 0.0  # the dense model minus its convs' entries (module docstring)
    dense_ms: float | None = None  # the whole dense model, as measured (or estimated)
    measured_on: str = ""  # the machine (measured, device) or the profile (estimate)
    levels: int = LEVELS  # the grid the entries cover (candidate_counts)
    weight_gbs: float | None = None  # in the network a conv's weights stream from memory at this rate (below)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"latency table kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def ms(self, spec: ConvSpec) -> float:
        """The conv's entry, and with ``weight_gbs`` at least the time its weights take to stream in."""
        try:
            entry = self.entries[spec.key()]
        except KeyError:
            raise UserError(f"latency table ({self.kind}, {self.target}) has no entry for conv {spec.key()}; "
                            "measure it again for this model") from None
        if self.weight_gbs:
            entry = max(entry, weight_bytes(spec) / (self.weight_gbs * 1e6))
        return entry

    def predict(self, terms: Sequence[LatencyTerm], counts: dict[str, int]) -> float:
        """Predicted latency (ms) of the model pruned to `counts` (missing layers: whole)."""
        return self.overhead_ms + sum(self.ms(t.spec(counts)) for t in terms)

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "latency table") -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise UserError(f"{where}: not a build-edge latency table (format {TABLE_FORMAT})")
        fields = {k: v for k, v in data.items() if k != "format"}
        try:
            table = cls(**fields)
            table.entries = {ConvSpec.from_key(k).key(): float(v) for k, v in table.entries.items()}
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: malformed latency table ({e})") from None
        return table

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read latency table {path}: {e}") from None
        return cls.from_json(data, str(path))


def weight_bytes(spec: ConvSpec, bytes_per_element: int = 4) -> float:
    return float(spec.c_out * (spec.c_in // spec.groups) * spec.kernel[0] * spec.kernel[1] + spec.c_out) \
        * bytes_per_element


def fit_weight_stream(table: LatencyTable, dense_specs: Sequence[ConvSpec], dense_ms: float) -> None:
    """Set ``weight_gbs`` and ``overhead_ms`` so that the dense model's prediction is its measured latency.

    A conv timed alone runs with its weights in cache; inside the network the weights of all layers do not fit,
    so a weight-heavy late conv (512 channels at 2x2) takes as long as streaming its weights (measured on the
    dev machine: 1.68 ms in the network against 0.47 ms alone, ~5.6 GB/s). The rate is the one at which the
    dense convs' ``max(entry, weights / rate)`` add up to the dense model's measured latency (bisection); when
    the entries alone already reach it, no rate, and the difference is the overhead."""
    table.weight_gbs = None
    alone = sum(table.ms(s) for s in dense_specs)
    if alone >= dense_ms:
        table.overhead_ms = 0.0
        return
    lo, hi = 0.01, 1e4  # GB/s; the prediction falls as the rate grows
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        table.weight_gbs = mid
        if sum(table.ms(s) for s in dense_specs) > dense_ms:
            lo = mid
        else:
            hi = mid
    table.weight_gbs = hi
    table.overhead_ms = max(0.0, dense_ms - sum(table.ms(s) for s in dense_specs))


def measure_model(model: nn.Module, input_shape: Sequence[int], backend: str, threads: int, batch: int = 1,
                  runs: int = 200, warmup: int = 10, repeats: int = 3) -> float:
    """p50 ms of a torch model measured as the bench stage measures the deployed file: the median of `repeats`
    child processes.

    The model is exported by the export stage's ``export_onnx`` (BatchNorm folded, onnxsim; opset 17, whose
    TorchScript exporter is several times faster than the dynamo one and writes the same Conv/Relu/Pool/Gemm
    graph) and timed by ``backends.base.benchmark`` in a child process with the thread settings the bench stage
    uses. Timing the export in this process instead (the first version) measured the pruned VGG16 at 9.46 ms
    where the bench stage measured the deployed file at 8.40 ms, so a budget met here was missed there. One
    process's p50 still moves from one process to the next (the same file: 1.95 to 2.21 ms over ten processes
    on the dev machine, 2.88 once): the median of a few keeps one slow process from steering the budget."""
    import statistics

    from toolchain.backends.base import benchmark
    from toolchain.stages.export import export_onnx

    p50s = []
    with tempfile.TemporaryDirectory(prefix="latency-model-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(copy.deepcopy(model), tuple(input_shape), path, opset=17)
        for _ in range(repeats):
            result = benchmark(backend, path, [batch], threads=threads, runs=runs, warmup=warmup,
                               input_shape=tuple(input_shape))
            if result.status != "ok" or not result.batches:
                raise BuildError(f"timing the model with {backend} failed: {result.reason}")
            p50s.append(float(result.batches[0].p50_ms))
    return statistics.median(p50s)


# -- timers: one conv shape -> ms ---------------------------------------------------------------------------


def conv_onnx(spec: ConvSpec, batch: int, seed: int = 0, opset: int = 17):
    """A one-conv ONNX model (Conv with bias + Relu, random weights): what an exported conv + BN + ReLU becomes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((spec.c_out, spec.c_in // spec.groups, *spec.kernel)).astype(np.float32) * 0.05
    b = rng.standard_normal(spec.c_out).astype(np.float32) * 0.05
    ho, wo = spec.out_size()
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(spec.kernel), strides=list(spec.stride),
                            pads=[spec.padding[0], spec.padding[1], spec.padding[0], spec.padding[1]],
                            dilations=list(spec.dilation), group=spec.groups)
    relu = helper.make_node("Relu", ["y"], ["out"])
    graph = helper.make_graph(
        [conv, relu], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, spec.c_in, spec.h, spec.w])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, spec.c_out, ho, wo])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def time_backend(backend_name: str, model_path: str, input_shape: Sequence[int], threads: int, *,
                 warmup: int = 3, runs: int = 15, min_seconds: float = 0.05) -> float:
    """Median ms of ``infer`` of a model file with a registered benchmark backend (after `warmup` calls; at least
    `runs` timed calls and `min_seconds`)."""
    import numpy as np

    from toolchain.backends import BACKENDS
    from toolchain.backends.base import make_input

    with BACKENDS.get(backend_name)() as backend:
        backend.load(model_path, threads)
        x = make_input(int(input_shape[0]), tuple(input_shape[1:]), backend.input_dtype())
        for _ in range(warmup):
            backend.infer(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < runs or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            backend.infer(x)
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3


@dataclass
class BackendTimer:
    """Times each conv as a one-conv ONNX model with a benchmark backend: the ``measured`` kind."""

    backend: str
    threads: int
    batch: int = 1
    runs: int = 15
    warmup: int = 3

    def __call__(self, spec: ConvSpec) -> float:
        import onnx

        with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
            path = Path(tmp) / "conv.onnx"
            onnx.save(conv_onnx(spec, self.batch), str(path))
            return time_backend(self.backend, str(path), (self.batch, spec.c_in, spec.h, spec.w), self.threads,
                                warmup=self.warmup, runs=self.runs)


@dataclass
class TorchTimer:
    """Times each conv (Conv2d + ReLU, input already on the device) with PyTorch: the ``measured`` kind for a
    TensorRT target measured on a host GPU (``--latency-source host``; CUDA events there, wall clock on a CPU).
    fp16 runs the conv in half precision, int8 is not timed this way."""

    device: str = "cuda"
    precision: str = "fp16"
    batch: int = 1
    runs: int = 30
    warmup: int = 5

    def __call__(self, spec: ConvSpec) -> float:
        conv = nn.Sequential(nn.Conv2d(spec.c_in, spec.c_out, spec.kernel, spec.stride, spec.padding, spec.dilation,
                                       spec.groups), nn.ReLU())
        return self.time_module(conv, (self.batch, spec.c_in, spec.h, spec.w))

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Median ms of one forward pass of `module` on a random input of `input_shape`."""
        if self.precision not in ("fp32", "fp16"):
            raise UserError(f"latency tables with torch time fp32 or fp16, not {self.precision}")
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        module = module.to(self.device, dtype).eval()
        x = torch.randn(*input_shape, device=self.device, dtype=dtype)
        cuda = torch.device(self.device).type == "cuda"
        times = []
        with torch.no_grad():
            for _ in range(self.warmup):
                module(x)
            for _ in range(self.runs):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    module(x)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    module(x)
                    times.append((time.perf_counter() - t0) * 1e3)
        return float(sorted(times)[len(times) // 2])


@dataclass
class RooflineTimer:
    """The roofline of each conv on a target profile at a precision: the ``estimate`` kind."""

    peak_ops_per_s: float
    bandwidth_bytes_per_s: float
    bytes_per_element: int
    batch: int = 1

    def __call__(self, spec: ConvSpec) -> float:
        ho, wo = spec.out_size()
        elements = (self.batch * (spec.c_in * spec.h * spec.w + spec.c_out * ho * wo)
                    + spec.c_out * (spec.c_in // spec.groups) * spec.kernel[0] * spec.kernel[1] + spec.c_out)
        seconds = max(spec.flops(self.batch) / self.peak_ops_per_s,
                      elements * self.bytes_per_element / self.bandwidth_bytes_per_s)
        return seconds * 1e3


def measure_entries(specs: Sequence[ConvSpec], timer: Callable[[ConvSpec], float],
                    progress: Callable[[], None] | None = None,
                    known: dict[str, float] | None = None) -> dict[str, float]:
    """``{key: ms}`` for every spec (those in `known` are not timed again)."""
    entries = dict(known or {})
    for spec in specs:
        if spec.key() not in entries:
            ms = float(timer(spec))
            if not math.isfinite(ms) or ms < 0:
                raise RuntimeError(f"latency timer gave {ms} ms for {spec.key()}")
            entries[spec.key()] = ms
        if progress is not None:
            progress()
    return entries


def host_measures(target_cpu_model: str, runtime: str) -> bool:
    """Whether this host can stand in for the target: an ONNX Runtime target on an x86 CPU, and this is one."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "x86")
    return runtime == "onnxruntime" and x86 and "x86" in (target_cpu_model or "").lower()
