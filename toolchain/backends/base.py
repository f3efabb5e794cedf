"""One benchmark contract for every inference backend (Polygraphy's runner idea).

A backend is a class registered in ``BACKENDS`` with

    available() -> (bool, reason)   classmethod; never raises, imports its library lazily
    load(model_path, threads)       build the session / engine / module
    infer(batch) -> np.ndarray      one synchronous inference (first output)
    close()

``benchmark()`` runs one backend on one model in a child process (``python -m
toolchain.backends.runner``), so the peak memory it reports is the model's own and a memory
budget can be enforced with ``RLIMIT_AS`` without risking the caller. A model that does not fit
comes back as ``BenchResult(fits=False, reason=...)``, never as an exception.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from toolchain.errors import UserError
from toolchain.registry import Registry


class Backend(ABC):
    """One inference backend. Subclasses register themselves with ``@BACKENDS.register(name)``."""

    name: ClassVar[str] = ""
    # False where RLIMIT_AS cannot be used (CUDA maps huge virtual ranges): the budget is then
    # checked after the run against peak host RSS + device memory instead of being enforced.
    enforces_address_limit: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") or (False, why). Must not raise."""

    @abstractmethod
    def load(self, model_path: str, threads: int) -> None: ...

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def input_dtype(self) -> np.dtype:
        """dtype of the model input (after load)."""
        return np.dtype(np.float32)

    def device(self) -> str:
        return cpu_name()

    def versions(self) -> dict[str, str]:
        return {"python": sys.version.split()[0], "numpy": np.__version__}

    def threads_used(self) -> int | None:
        """Thread count the library reports after load (None if it cannot tell)."""
        return None

    def device_peak_bytes(self) -> int:
        """Peak device (GPU) memory, for backends that allocate outside the host process heap."""
        return 0

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BACKENDS: Registry[type[Backend]] = Registry("backend")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def make_input(batch: int, input_shape: Sequence[int], dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    """The benchmark's input: standard normal, reproducible from (batch, shape, seed)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *input_shape), dtype=np.float32).astype(dtype, copy=False)


# -- results ---------------------------------------------------------------------------------------------
@dataclass
class BatchStats:
    batch_size: int
    runs: int
    warmup: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_ips: float  # images/s = batch_size / mean latency
    peak_rss_mb: float  # process high-water mark (VmHWM) after this batch size
    output_shape: list[int]
    output_head: list[float]  # first values of the output for sample 0 (sanity / correctness checks)
    times_ms: list[float]  # every timed run


@dataclass
class BenchResult:
    backend: str
    model_path: str
    status: str  # "ok" | "does_not_fit" | "error"
    fits: bool | None  # None when the run failed for a reason other than memory
    reason: str | None
    batches: list[BatchStats]
    threads: int
    threads_used: int | None
    memory_budget_mb: int | None
    budget_enforced: str | None  # "rlimit_as" | "checked_after_run" | None
    input_shape: list[int]
    input_dtype: str | None
    seed: int
    warmup: int
    runs: int
    weights_bytes: int | None  # sum of ONNX initializer sizes
    largest_activation_bytes: int | None  # at batch 1 (scales with the batch)
    largest_activation_name: str | None
    baseline_vm_mb: float | None  # child address space after importing the runtime, before the model
    baseline_rss_mb: float | None
    peak_rss_mb: float | None  # VmHWM of the child (includes the runtime itself)
    peak_vm_mb: float | None
    ru_maxrss_mb: float | None  # getrusage; Linux carries the parent's RSS over fork+exec: use peak_rss_mb
    device_peak_mb: float | None
    device: str | None
    versions: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    stderr_tail: str = ""
    kind: str = "measured"

    def batch(self, batch_size: int) -> BatchStats:
        for b in self.batches:
            if b.batch_size == batch_size:
                return b
        raise KeyError(batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})


# -- model memory (parent side, from the ONNX file) --------------------------------------------------
def model_memory(model_path: str | Path, input_shape: Sequence[int]) -> dict[str, Any]:
    """Bytes of the weights (sum of initializer sizes) and of the largest activation at batch 1
    (ONNX shape inference)."""
    import onnx
    from onnx import helper

    from toolchain.roofline import onnx_shapes

    model = onnx.load(str(model_path), load_external_data=False)

    def itemsize(elem_type: int) -> int:
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
        except Exception:
            return 4

    init = {t.name for t in model.graph.initializer}
    weights = sum(math.prod(t.dims) * itemsize(t.data_type) for t in model.graph.initializer)
    _, shapes = onnx_shapes(model, 1, input_shape)
    best_name, best = None, 0
    for name, (dims, elem_type) in shapes.items():
        if name in init:
            continue
        size = math.prod(dims) * itemsize(elem_type)
        if size > best:
            best_name, best = name, size
    return {"weights_bytes": int(weights), "largest_activation_bytes": int(best),
            "largest_activation_name": best_name}  # fmt: skip


# -- the parent side of a benchmark -----------------------------------------------------------------
_MEMORY_SIGNALS = {signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS}


def _empty_result(backend: str, model_path: str, **kw: Any) -> BenchResult:
    base: dict[str, Any] = dict(
        backend=backend, model_path=model_path, status="error", fits=None, reason=None, batches=[],
        threads=1, threads_used=None, memory_budget_mb=None, budget_enforced=None, input_shape=[],
        input_dtype=None, seed=0, warmup=0, runs=0, weights_bytes=None, largest_activation_bytes=None,
        largest_activation_name=None, baseline_vm_mb=None, baseline_rss_mb=None, peak_rss_mb=None,
        peak_vm_mb=None, ru_maxrss_mb=None, device_peak_mb=None, device=None,
    )  # fmt: skip
    base.update(kw)
    return BenchResult(**base)


def result_from_dict(data: dict[str, Any]) -> BenchResult:
    data = dict(data)
    data["batches"] = [BatchStats(**b) for b in data.get("batches", [])]
    return BenchResult(**data)


def benchmark(
    backend_name: str,
    model_path: str | Path,
    batch_sizes: Sequence[int],
    *,
    threads: int,
    warmup: int = 10,
    runs: int = 100,
    memory_budget_mb: int | None = None,
    input_shape: Sequence[int] = (3, 32, 32),
    seed: int = 0,
    timeout_s: float | None = None,
) -> BenchResult:
    """Benchmark `model_path` with one backend in a child process: per batch size `warmup`
    untimed runs, then `runs` timed runs (p50/p90/p99, mean, std, throughput, peak RSS).

    Memory figures are in MiB ("MB" throughout). With `memory_budget_mb`, the child runs under
    ``RLIMIT_AS`` = budget (the whole process, runtime included, as on a device with that much
    memory); a model that does not fit comes back with ``fits=False`` and the reason."""
    cls = BACKENDS.get(backend_name)
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be positive integers, got {batch_sizes}")
    if runs < 1 or warmup < 0 or threads < 1:
        raise UserError(f"need runs >= 1, warmup >= 0, threads >= 1 (got {runs}, {warmup}, {threads})")
    if memory_budget_mb is not None and memory_budget_mb <= 0:
        raise UserError(f"memory budget must be > 0 MB, got {memory_budget_mb}")
    ok, why = cls.available()
    if not ok:
        raise UserError(f"backend {backend_name!r} is not available here: {why}")
    is_file = ":" not in str(model_path) or Path(model_path).exists()
    model = str(Path(model_path).resolve()) if is_file else str(model_path)
    if is_file and not Path(model).is_file():
        raise UserError(f"model {str(model_path)!r} not found")

    common: dict[str, Any] = dict(
        threads=threads, memory_budget_mb=memory_budget_mb, input_shape=list(input_shape), seed=seed,
        warmup=warmup, runs=runs,
    )  # fmt: skip
    mem: dict[str, Any] = {}
    if model.endswith(".onnx"):
        try:
            mem = model_memory(model, input_shape)
        except Exception as e:  # corrupt file or shapes onnx cannot infer: the backend will say more
            mem = {}
            common["stderr_tail"] = f"model_memory failed: {type(e).__name__}: {e}"
    common.update(mem)

    if memory_budget_mb is not None and mem.get("weights_bytes", 0) > memory_budget_mb * 2**20:
        return _empty_result(
            backend_name, model, status="does_not_fit", fits=False, **common,
            budget_enforced="rlimit_as" if cls.enforces_address_limit else "checked_after_run",
            reason=(
                f"the weights alone ({mem['weights_bytes'] / 2**20:.1f} MB) exceed the memory budget "
                f"({memory_budget_mb} MB)"
            ),
        )  # fmt: skip

    request = dict(
        backend=backend_name, model_path=model, batch_sizes=batch_sizes, threads=threads, warmup=warmup,
        runs=runs, memory_budget_mb=memory_budget_mb, input_shape=list(input_shape), seed=seed,
    )  # fmt: skip
    rc, stderr, data, wall = _run_child(request, threads, timeout_s)
    result = (
        result_from_dict({**data, **mem})
        if data is not None
        else _empty_result(backend_name, model, **common)
    )
    result.wall_s, result.stderr_tail = wall, stderr[-2000:]
    _explain_exit(result, rc, data is not None, memory_budget_mb, timeout_s)
    return result


def _run_child(request: dict[str, Any], threads: int, timeout_s: float | None):
    """Run the request in ``toolchain.backends.runner``: (exit code or None on timeout, its output, its
    result or None, wall seconds)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    # make `toolchain` importable in the child even when the package is not installed
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        req_path, out_path = Path(tmp, "request.json"), Path(tmp, "result.json")
        req_path.write_text(json.dumps(request))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "toolchain.backends.runner", str(req_path), str(out_path)],
                env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s, text=True,
                errors="replace",
            )  # fmt: skip
            rc, stderr = proc.returncode, (proc.stdout or "") + (proc.stderr or "")
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            rc, stderr = None, (out.decode(errors="replace") if isinstance(out, bytes) else out)
        data = json.loads(out_path.read_text()) if out_path.is_file() else None
    return rc, stderr, data, time.perf_counter() - t0


def _explain_exit(result: BenchResult, rc: int | None, wrote_result: bool, memory_budget_mb: int | None,
                  timeout_s: float | None) -> None:
    """Status, fits and reason of a child that timed out, wrote nothing or died (a memory signal under a
    budget means the model does not fit)."""
    last_line = next((ln for ln in reversed(result.stderr_tail.strip().splitlines()) if ln.strip()), "")[:300]
    if rc is None:
        result.status, result.fits, result.reason = "error", None, f"timed out after {timeout_s} s"
    elif rc == 0 and not wrote_result:
        result.status, result.fits = "error", None
        result.reason = f"the benchmark process wrote no result: {last_line}"
    elif rc != 0:  # crashed: whatever the child wrote is partial
        sig = -rc if rc < 0 else None
        try:
            how = signal.Signals(sig).name if sig else f"exit code {rc}"
        except ValueError:
            how = f"signal {sig}"
        died = f"the benchmark process died ({how})"
        if sig in _MEMORY_SIGNALS and (memory_budget_mb is not None or sig == signal.SIGKILL):
            limit = f" under the {memory_budget_mb} MB budget" if memory_budget_mb is not None else ""
            result.status, result.fits = "does_not_fit", False
            result.reason = f"{died}{limit}: out of memory (allocation failure or OOM killer)"
        else:
            result.status, result.fits = "error", None
            result.reason = f"{died}: {last_line}"


__all__ = [
    "BACKENDS", "Backend", "BatchStats", "BenchResult", "benchmark", "cpu_name", "make_input", "model_memory",
]  # fmt: skip
