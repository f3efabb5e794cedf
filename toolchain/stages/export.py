"""Export stage: ONNX (dynamic batch) -> onnxsim -> onnx.checker -> parity and accuracy with ONNX Runtime."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from toolchain.errors import BuildError
from toolchain.stages import baseline, finetune
from toolchain.stages.base import StageContext
from toolchain.stages.prune import BorderBiasConv2d

log = logging.getLogger("build_edge")
NAME = "export"


@dataclass(frozen=True)
class Inputs:
    finetune: str  # digest
    prune: str  # digest (the pruned architecture)
    baseline: str  # digest (the dense model, exported beside the pruned one for the benchmarks)
    model: str
    opset: int
    tolerance: float  # parity: largest |torch - ONNX Runtime| allowed on the probe images


@dataclass
class Result:
    dense: dict[str, Any]  # export info and parity_max_abs_diff
    pruned: dict[str, Any]  # the same, and onnxruntime_test_acc


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    data = ctx.data
    models = {"dense": baseline.load_model(ctx, inputs.baseline, inputs.model),
              "pruned": finetune.load_model(ctx, inputs.finetune, inputs.prune, inputs.model)}
    probe = data.normalize(data.test.images[:64])
    result: dict[str, Any] = {}
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        info = export_onnx(model, data.input_shape, path, opset=inputs.opset)
        info["parity_max_abs_diff"] = check_parity(model, path, probe, inputs.tolerance)
        result[name] = info
    result["pruned"]["onnxruntime_test_acc"] = onnx_accuracy(folder / "pruned.onnx", data.normalize(data.test.images),
                                                             data.test.labels)
    return Result(**result)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BorderBiasConv2d) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every eval-mode BatchNorm that directly follows a conv folded into that conv.

    Runtimes fold Conv+BN themselves, but not across the border-bias Add that channel removal may
    leave after a conv; folding here keeps the exported graph Conv(+Add)+ReLU for every layer.
    """
    model = copy.deepcopy(model).eval()
    graph = _Tracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and isinstance(modules[prev.target], nn.Conv2d)):
            continue
        conv, bn = modules[prev.target], modules[node.target]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        if isinstance(conv, BorderBiasConv2d):
            conv.border_bias.mul_(scale.view(-1, 1, 1))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path, *, opset: int = 18,
                simplify: bool = True) -> dict:
    """Write a checked, simplified ONNX model with a dynamic batch axis (input 'input', output 'logits')."""
    model = fold_batchnorm(model.float().cpu().eval().to(memory_format=torch.contiguous_format))
    example = torch.randn(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if opset >= 18:
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
            program.save(tmp)
        else:  # the dynamo exporter writes 18+ (its down-conversion fails silently): TorchScript covers 13-17
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(tmp)
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if written != opset:
            raise BuildError(f"the ONNX exporter wrote opset {written} instead of the requested {opset}")
        simplified = False
        if simplify:
            import onnxsim

            candidate, ok = onnxsim.simplify(proto)
            if ok:
                proto, simplified = candidate, True
            else:
                log.warning("onnxsim could not validate its simplification; keeping the unsimplified model")
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"opset": opset, "simplified": simplified, "nodes": len(proto.graph.node),
            "bytes": path.stat().st_size}


def ort_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(model: nn.Module, onnx_path: Path, images: torch.Tensor, tolerance: float) -> float:
    """Max |torch - onnxruntime| over real samples (fp32); BuildError above `tolerance`."""
    model = model.float().cpu().eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        expected = model(images.cpu()).numpy()
    got = ort_session(onnx_path).run(["logits"], {"input": images.cpu().numpy()})[0]
    diff = float(np.abs(expected - got).max())
    if not np.isfinite(diff) or diff > tolerance:
        raise BuildError(f"ONNX parity check failed: max abs diff {diff:.3g} > {tolerance:g} on {len(images)} "
                         f"samples ({onnx_path.name})")
    return diff


def onnx_accuracy(onnx_path: Path, images: torch.Tensor, labels: torch.Tensor, *, batch: int = 500,
                  threads: int | None = None) -> float:
    """Top-1 accuracy of the ONNX model with ONNX Runtime on normalised float images."""
    sess = ort_session(onnx_path, threads)
    correct = 0
    for start in range(0, len(labels), batch):
        x = images[start:start + batch].cpu().numpy().astype(np.float32)
        pred = sess.run(["logits"], {"input": x})[0].argmax(1)
        correct += int((pred == labels[start:start + batch].cpu().numpy()).sum())
    return correct / max(1, len(labels))
