"""Child side of ``toolchain.backends.benchmark``: ``python -m toolchain.backends.runner REQ OUT``.

Reads the request (JSON), imports the backend's library, applies the memory budget as
``RLIMIT_AS``, loads the model, then per batch size warms up and times the runs. The result JSON
is rewritten (atomically) after every batch size, so a child killed half-way still leaves what it
measured. Exit code 0 whenever a result was written, including "does not fit".
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_MEMORY_PATTERNS = (
    "bad_alloc", "bad allocation", "cannot allocate memory", "out of memory", "failed to allocate",
    "unable to allocate", "memoryerror", "pthread_create failed", "resource temporarily unavailable",
    "std::length_error", "mmap failed",
)  # fmt: skip


def _status_mb() -> dict[str, float]:
    """VmSize / VmRSS / VmHWM / VmPeak of this process in MiB (Linux)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmSize", "VmRSS", "VmHWM", "VmPeak"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _ru_maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20  # KiB on Linux, bytes on macOS


def is_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(p in text for p in _MEMORY_PATTERNS)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _limit_address_space(budget_mb: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = budget_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _time_batch(backend, bs: int, request: dict[str, Any], dtype):
    """`warmup` untimed then `runs` timed inferences of one batch size: the BatchStats."""
    import numpy as np

    from toolchain.backends.base import BatchStats, make_input

    warmup, runs = int(request["warmup"]), int(request["runs"])
    x = make_input(bs, request["input_shape"], dtype, request["seed"])
    y = None
    for _ in range(warmup):
        y = backend.infer(x)
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        y = backend.infer(x)
        times[i] = (time.perf_counter_ns() - t0) / 1e6
    y = np.asarray(y)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return BatchStats(
        batch_size=bs, runs=runs, warmup=warmup, p50_ms=float(p50), p90_ms=float(p90),
        p99_ms=float(p99), mean_ms=mean, std_ms=float(times.std(ddof=1)) if runs > 1 else 0.0,
        min_ms=float(times.min()), max_ms=float(times.max()),
        throughput_ips=bs / (mean / 1e3) if mean > 0 else float("inf"),
        peak_rss_mb=_status_mb().get("VmHWM", _ru_maxrss_mb()), output_shape=list(y.shape),
        output_head=[float(v) for v in y[0].reshape(-1)[:64]] if y.ndim and len(y) else [],
        times_ms=[float(t) for t in times],
    )  # fmt: skip


def _new_result(request: dict[str, Any]) -> dict[str, Any]:
    return dict(
        backend=request["backend"], model_path=request["model_path"], status="running", fits=None,
        reason=None, batches=[], threads=request["threads"], threads_used=None,
        memory_budget_mb=request.get("memory_budget_mb"), budget_enforced=None, input_shape=request["input_shape"],
        input_dtype=None, seed=request["seed"], warmup=request["warmup"], runs=request["runs"], weights_bytes=None,
        largest_activation_bytes=None, largest_activation_name=None, baseline_vm_mb=None, baseline_rss_mb=None,
        peak_rss_mb=None, peak_vm_mb=None, ru_maxrss_mb=None, device_peak_mb=None, device=None, versions={},
    )  # fmt: skip


def run(request: dict[str, Any], out_path: Path) -> dict[str, Any]:
    import numpy as np

    from toolchain.backends import BACKENDS

    budget = request.get("memory_budget_mb")
    result = _new_result(request)

    def finish(status: str, fits: bool | None, reason: str | None = None) -> dict[str, Any]:
        st = _status_mb()
        result.update(status=status, fits=fits, reason=reason, peak_rss_mb=st.get("VmHWM"),
                      peak_vm_mb=st.get("VmPeak"), ru_maxrss_mb=_ru_maxrss_mb())  # fmt: skip
        _write(out_path, result)
        return result

    cls = BACKENDS.get(request["backend"])
    ok, why = cls.available()  # imports the library: part of the baseline, not of the model
    if not ok:
        return finish("error", None, f"backend unavailable: {why}")
    backend = cls()
    result["device"] = backend.device()
    result["versions"] = backend.versions()
    st = _status_mb()
    result["baseline_vm_mb"], result["baseline_rss_mb"] = st.get("VmSize"), st.get("VmRSS")

    stage = "load"
    try:
        if budget is not None and cls.enforces_address_limit:
            result["budget_enforced"] = "rlimit_as"
            base_vm = st.get("VmSize", 0.0)
            if base_vm >= budget:
                return finish(
                    "does_not_fit", False,
                    f"the runtime alone maps {base_vm:.0f} MB of address space, over the {budget} MB budget",
                )  # fmt: skip
            _limit_address_space(budget)
        elif budget is not None:
            result["budget_enforced"] = "checked_after_run"

        backend.load(request["model_path"], int(request["threads"]))
        result["threads_used"] = backend.threads_used()
        dtype = backend.input_dtype()
        result["input_dtype"] = str(np.dtype(dtype))
        _write(out_path, result)

        for bs in request["batch_sizes"]:
            stage = f"batch {bs}"
            result["batches"].append(_time_batch(backend, bs, request, dtype).__dict__)
            _write(out_path, result)
        stage = "close"
        result["device_peak_mb"] = backend.device_peak_bytes() / 2**20
        backend.close()
    except BaseException as exc:  # noqa: BLE001 - everything becomes a result
        if isinstance(exc, KeyboardInterrupt):
            raise
        if is_memory_error(exc) and budget is not None:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            return finish(
                "does_not_fit", False,
                f"{stage}: {type(exc).__name__} under the {budget} MB address-space budget: {first}",
            )  # fmt: skip
        if is_memory_error(exc):
            return finish("does_not_fit", False, f"{stage}: out of memory: {type(exc).__name__}: {exc}"[:400])
        traceback.print_exc()
        return finish("error", None, f"{stage}: {type(exc).__name__}: {exc}"[:400])

    if budget is not None and result["budget_enforced"] == "checked_after_run":
        used = (_status_mb().get("VmHWM") or 0.0) + result["device_peak_mb"]
        if used > budget:
            return finish(
                "does_not_fit", False,
                f"peak host RSS + device memory {used:.0f} MB exceeds the {budget} MB budget "
                "(checked after the run)",
            )  # fmt: skip
    return finish("ok", True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m toolchain.backends.runner REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    run(request, Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
