"""Roofline lower bound of a model's latency on a target profile (an ESTIMATE, not a measurement).

Per layer: FLOPs and bytes moved (weights + input and output activations at the precision's
element size: fp32 4, fp16 2, int8 1 byte), then

    t_compute = flops / peak          (dense peak of the device the target's runtime uses)
    t_memory  = bytes / bandwidth
    latency   = max(t_compute, t_memory)

and the total is the sum over layers. It is a lower bound under its assumptions: every byte
comes from DRAM once (a model whose weights fit in a big cache, e.g. a 32 MB L3 on an x86 host,
can run faster than this "bound"), perfect overlap of compute and memory traffic, peak clocks,
no launch overhead. It only counts layers that a deployment
runtime cannot fuse away: convolutions and fully connected layers (compute), and pooling
(memory only). BatchNorm, activations and element-wise ops are left out because TensorRT and
ONNX Runtime fold/fuse them into the neighbouring convolution; counting their traffic would make
the "lower bound" too high.

Two inputs: a torch ``nn.Module`` (forward hooks, with an example input size) or an ONNX model
(path or ModelProto; onnx shape inference). A layer's FLOPs are the cost model's
(``toolchain.cost.layer_flops``, what the budgets and the reported ``flops_ratio`` count) on the
torch path; the ONNX path applies the same rule to the graph's shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.errors import UserError

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from toolchain.targets import TargetProfile

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}
KIND = "estimate"


@dataclass(frozen=True)
class LayerEstimate:
    name: str
    op: str  # Conv2d / Linear / MaxPool2d ... (torch) or the ONNX op type
    flops: float  # 2 x multiply-accumulates (int8: integer ops)
    bytes: float  # weights + input + output activations at the precision
    t_compute: float  # s
    t_memory: float  # s
    bound: str  # "compute" | "memory"
    latency: float  # s, max(t_compute, t_memory)


@dataclass
class RooflineResult:
    target: str
    precision: str
    batch: int
    device: str  # "gpu" | "cpu": whose peak was used
    peak_ops_per_s: float
    bandwidth_bytes_per_s: float
    layers: list[LayerEstimate]
    source: str  # "torch" | "onnx"
    skipped: list[str] = field(default_factory=list)  # layers without shapes (not counted)
    kind: str = KIND

    @property
    def total_latency_s(self) -> float:
        return math.fsum(layer.latency for layer in self.layers)

    @property
    def total_flops(self) -> float:
        return math.fsum(layer.flops for layer in self.layers)

    @property
    def total_bytes(self) -> float:
        return math.fsum(layer.bytes for layer in self.layers)

    @property
    def throughput_ips(self) -> float:
        """Upper bound on images/s implied by the lower-bound latency."""
        t = self.total_latency_s
        return self.batch / t if t > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            total_latency_s=self.total_latency_s,
            total_flops=self.total_flops,
            total_bytes=self.total_bytes,
            throughput_ips_upper_bound=self.throughput_ips,
            note="roofline lower bound (estimate): max(flops/peak, bytes/bandwidth) per layer, summed",
        )
        return out

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})

    def format_table(self, width: int | None = None) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=(
                f"Roofline estimate (lower bound): {self.target}, {self.precision}, batch {self.batch}, "
                f"{self.device} peak {self.peak_ops_per_s / 1e12:.4g} T/s, "
                f"{self.bandwidth_bytes_per_s / 1e9:.4g} GB/s"
            ),
            title_justify="left",
        )
        for col in ("layer", "op", "MFLOP", "KB", "t_compute us (est.)", "t_memory us (est.)", "bound",
                    "latency us (est.)"):  # fmt: skip
            table.add_column(col, no_wrap=True)
        for ly in self.layers:
            table.add_row(
                ly.name, ly.op, f"{ly.flops / 1e6:.3f}", f"{ly.bytes / 1e3:.1f}", f"{ly.t_compute * 1e6:.3f}",
                f"{ly.t_memory * 1e6:.3f}", ly.bound, f"{ly.latency * 1e6:.3f}",
            )  # fmt: skip
        table.add_row(
            "total (estimate)", "", f"{self.total_flops / 1e6:.3f}", f"{self.total_bytes / 1e3:.1f}", "", "",
            "", f"{self.total_latency_s * 1e6:.3f}",
        )  # fmt: skip
        import io

        buf = io.StringIO()
        Console(file=buf, width=width or 1000, color_system=None, force_terminal=False).print(table)
        return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


@dataclass
class RooflineComparison:
    dense: RooflineResult
    pruned: RooflineResult
    kind: str = KIND

    @property
    def speedup(self) -> float:
        """Estimated dense / pruned lower-bound latency."""
        p = self.pruned.total_latency_s
        return self.dense.total_latency_s / p if p > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        pruned = {ly.name: ly for ly in self.pruned.layers}
        per_layer = []
        for ly in self.dense.layers:
            q = pruned.get(ly.name)
            per_layer.append({
                "name": ly.name,
                "dense_latency": ly.latency,
                "pruned_latency": None if q is None else q.latency,
                "dense_bound": ly.bound,
                "pruned_bound": None if q is None else q.bound,
            })  # fmt: skip
        return {
            "kind": self.kind,
            "speedup_estimate": self.speedup,
            "dense_total_latency_s": self.dense.total_latency_s,
            "pruned_total_latency_s": self.pruned.total_latency_s,
            "layers": per_layer,
            "dense": self.dense.to_dict(),
            "pruned": self.pruned.to_dict(),
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})


# -- helpers --------------------------------------------------------------------------------------
def _layer(name: str, op: str, flops: float, nbytes: float, peak: float, bw: float) -> LayerEstimate:
    t_c = flops / peak
    t_m = nbytes / bw
    return LayerEstimate(
        name=name, op=op, flops=float(flops), bytes=float(nbytes), t_compute=t_c, t_memory=t_m,
        bound="compute" if t_c >= t_m else "memory", latency=max(t_c, t_m),
    )  # fmt: skip


def _check_precision(precision: str) -> int:
    if precision not in BYTES_PER_ELEMENT:
        raise UserError(f"unknown precision {precision!r}; valid: {', '.join(BYTES_PER_ELEMENT)}")
    return BYTES_PER_ELEMENT[precision]


# -- torch path -------------------------------------------------------------------------------------
def _torch_layers(model: nn.Module, input_size: Sequence[int], batch: int) -> list[tuple[str, str, int, int]]:
    """(name, op, flops, elements moved) per counted layer call, in execution order."""
    import torch
    from torch import nn

    from toolchain.cost import layer_flops

    compute = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    memory_only = (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    )  # fmt: skip
    records: list[tuple[str, str, int, int]] = []
    calls: dict[str, int] = {}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
                return
            calls[name] = calls.get(name, 0) + 1
            label = name if calls[name] == 1 else f"{name}#{calls[name]}"
            params = sum(p.numel() for p in module.parameters(recurse=False))
            elements = x.numel() + output.numel()
            flops = 0
            if isinstance(module, compute):  # counted as the cost model counts them
                flops = layer_flops(module, output)
                elements += params
            records.append((label, type(module).__name__, int(flops), int(elements)))

        return fn

    handles = [
        m.register_forward_hook(hook(name or type(m).__name__))
        for name, m in model.named_modules()
        if isinstance(m, compute + memory_only)
    ]
    if not handles:
        raise UserError("roofline: the model has no Conv/Linear/pooling layers to estimate")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((batch, *input_size), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records


# -- ONNX path ----------------------------------------------------------------------------------------
_ONNX_COMPUTE = {"Conv", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"}
_ONNX_MEMORY = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


def load_onnx(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise UserError(f"ONNX model {str(path)!r} not found")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"cannot read ONNX model {str(path)!r}: {type(e).__name__}: {e}") from None


def onnx_shapes(
    model: str | Path | onnx.ModelProto, batch: int = 1, input_size: Sequence[int] | None = None
) -> tuple[onnx.ModelProto, dict[str, tuple[tuple[int, ...], int]]]:
    """Shape-inferred copy of `model` with the batch dim of every graph input set to `batch`
    (and symbolic non-batch dims to `input_size`); returns (model, {value name: (dims, elem_type)}).
    Values whose shape stays unknown are left out."""
    import onnx

    model = load_onnx(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    init_names = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in init_names or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if i == 0:
                d.ClearField("dim_param")
                d.dim_value = batch
            elif not d.HasField("dim_value"):
                if input_size is None or len(input_size) != len(dims) - 1:
                    raise UserError(
                        f"ONNX input {inp.name!r} has a symbolic dim {d.dim_param!r}: pass input_size"
                    )
                d.ClearField("dim_param")
                d.dim_value = int(input_size[i - 1])
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception as e:
        raise UserError(f"ONNX shape inference failed: {type(e).__name__}: {e}") from None
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for t in m.graph.initializer:
        shapes[t.name] = (tuple(t.dims), t.data_type)
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes.setdefault(vi.name, (tuple(d.dim_value for d in dims), vi.type.tensor_type.elem_type))
    for node in m.graph.node:  # Constant nodes carry their tensors as attributes
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t is not None:
                    shapes.setdefault(node.output[0], (tuple(a.t.dims), a.t.data_type))
    return m, shapes


def _numel(dims: Sequence[int]) -> int:
    return math.prod(dims) if dims else 1


def _onnx_layers(
    model: str | Path | onnx.ModelProto, input_size: Sequence[int] | None, batch: int
) -> tuple[list[tuple[str, str, int, int]], list[str]]:
    m, shapes = onnx_shapes(model, batch, input_size)
    records: list[tuple[str, str, int, int]] = []
    skipped: list[str] = []
    for i, node in enumerate(m.graph.node):
        op = node.op_type
        if op not in _ONNX_COMPUTE and op not in _ONNX_MEMORY:
            continue
        name = node.name or f"{op}_{i}"
        names = [n for n in [*node.input, *node.output] if n]
        if any(n not in shapes for n in names):
            skipped.append(name)
            continue
        # Q/DQ-style inputs (scales, zero points) are scalars or per-channel vectors: counted too
        elements = sum(_numel(shapes[n][0]) for n in names)
        out = _numel(shapes[node.output[0]][0])
        flops = 0
        if op in ("Conv", "ConvInteger"):
            w = shapes[node.input[1]][0]  # (Cout, Cin/groups, k...)
            flops = 2 * out * _numel(w[1:])
        elif op == "QLinearConv":
            w = shapes[node.input[3]][0]
            flops = 2 * out * _numel(w[1:])
        elif op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
            a = shapes[node.input[0]][0]
            trans_a = any(at.name == "transA" and at.i for at in node.attribute) if op == "Gemm" else False
            k = a[0] if trans_a else a[-1]
            flops = 2 * out * k
        records.append((name, op, int(flops), int(elements)))
    if not records:
        raise UserError("roofline: the ONNX graph has no Conv/Gemm/MatMul/pooling nodes with known shapes")
    return records, skipped


# -- public entry ---------------------------------------------------------------------------------------
def estimate(
    model_or_onnx: nn.Module | str | Path | onnx.ModelProto,
    target: TargetProfile,
    precision: str,
    batch: int = 1,
    input_size: Sequence[int] | None = (3, 32, 32),
) -> RooflineResult:
    """Roofline lower-bound latency of a torch model (run once on zeros of (batch, *input_size))
    or an ONNX model (path or ModelProto) on `target` at `precision` ("fp32" | "fp16" | "int8").

    Uses the GPU peak for TensorRT targets and the CPU peak for ONNX Runtime targets."""
    bpe = _check_precision(precision)
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    peak = target.peak_ops_per_s(precision)
    bw = target.memory_bandwidth_bytes_per_s
    skipped: list[str] = []
    if isinstance(model_or_onnx, str | Path) or type(model_or_onnx).__name__ == "ModelProto":
        records, skipped = _onnx_layers(model_or_onnx, input_size, batch)  # type: ignore[arg-type]
        source = "onnx"
    else:
        if input_size is None:
            raise UserError("roofline of a torch model needs input_size, e.g. (3, 32, 32)")
        records = _torch_layers(model_or_onnx, input_size, batch)
        source = "torch"
    layers = [_layer(name, op, flops, elements * bpe, peak, bw) for name, op, flops, elements in records]
    return RooflineResult(
        target=target.name, precision=precision, batch=batch, device=target.compute_device,
        peak_ops_per_s=peak, bandwidth_bytes_per_s=bw, layers=layers, source=source, skipped=skipped,
    )  # fmt: skip


def compare(
    dense: nn.Module | str | Path | onnx.ModelProto,
    pruned: nn.Module | str | Path | onnx.ModelProto,
    target: TargetProfile,
    precision: str,
    batch: int = 1,
    input_size: Sequence[int] | None = (3, 32, 32),
) -> RooflineComparison:
    """Roofline estimates of the dense and the pruned model side by side (estimated speed-up)."""
    return RooflineComparison(
        dense=estimate(dense, target, precision, batch, input_size),
        pruned=estimate(pruned, target, precision, batch, input_size),
    )


__all__ = [
    "BYTES_PER_ELEMENT", "LayerEstimate", "RooflineComparison", "RooflineResult", "compare", "estimate",
    "load_onnx", "onnx_shapes",
]  # fmt: skip
