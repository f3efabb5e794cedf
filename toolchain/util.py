"""Small shared helpers: atomic writes, hashing, device choice.

torch is imported where it is used: the benchmark child (toolchain.backends.runner) reaches this module
through the TensorRT backend, and torch there made the child's memory that of torch, not of the runtime
(3.2 GB of address space, ~700 MB resident before any model: nothing fitted a 4 GB target's budget) and
started each timed ONNX Runtime process 2-3 s late.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write_bytes(path: Path, data: bytes | memoryview, mode: int = 0o644) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically and byte-reproducibly.

    torch names the archive's root folder after the file it writes to, so saving to a random temp
    name would put that name inside the file; saving to memory names it ``archive`` every time.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


@contextlib.contextmanager
def out_lock(folder: Path):
    """Hold ``folder/.lock`` (PID and host) for a run; a live holder is a UserError, a dead one's lock is taken over.

    Two runs into one --out would otherwise both compute every stage and race on the bundle rename.
    """
    from toolchain.errors import UserError

    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if the run writes nothing
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, host = int(holder["pid"]), str(holder.get("host", ""))
            except (OSError, ValueError, KeyError, TypeError):  # unreadable: treated as stale
                pid, host = None, ""
            if pid is not None and (host not in ("", me["host"]) or _alive(pid)):
                raise UserError(f"{folder} is in use by another build-edge run (pid {pid} on {host or 'this host'}); "
                                f"wait for it, or delete {lock} if that process is gone") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise UserError(f"could not take {lock}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        for path in created:  # deepest first; a folder holding anything stays
            with contextlib.suppress(OSError):
                path.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only (PermissionError: alive, another user's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from toolchain.errors import UserError

        raise UserError(f"device {name} requested but CUDA is not available")
    return dev
