"""Latency tables measured on the device: the kit's ``bench_on_device.py --latency-table`` measures every conv
shape of a bundle's table there; ``bench-edge import-latency-table`` checks the result and stores it, and builds
for that target, precision and batch read it instead of the roofline estimate (``pipeline.latency_inputs``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from toolchain.errors import UserError
from toolchain.latency import LatencyTable


def table_store() -> Path:
    """Where imported device tables live: ``$BUILD_EDGE_HOME/latency-tables`` (default ``~/.cache/build-edge``)."""
    home = os.environ.get("BUILD_EDGE_HOME") or str(Path.home() / ".cache" / "build-edge")
    return Path(home) / "latency-tables"


def stored_name(target: str, precision: str, batch: int) -> str:
    return f"{target}-{precision}-b{batch}.json"


def imported_table(target: str, precision: str, batch: int) -> Path | None:
    """The device table imported for this target, precision and batch, if any."""
    path = table_store() / stored_name(target, precision, batch)
    return path if path.is_file() else None


def check_device_table(table: LatencyTable, path: str) -> None:
    """What import_table stores by (target, precision, batch) and what a build sums must be sane: a plain target
    name (it names the stored file), a known precision, a positive batch, finite positive entries."""
    from toolchain.kit import PRECISIONS

    if table.kind != "device":
        raise UserError(f"{path}: a {table.kind} table; only tables measured on the device (kit/bench_on_device.py "
                        "--latency-table) are imported")
    target = table.target
    if not isinstance(target, str) or not target or Path(target).name != target or target.startswith("."):
        raise UserError(f"{path}: target must be a profile name, got {target!r}")
    if table.precision not in PRECISIONS:
        raise UserError(f"{path}: precision must be one of {', '.join(PRECISIONS)}, got {table.precision!r}")
    if isinstance(table.batch, bool) or not isinstance(table.batch, int) or table.batch < 1:
        raise UserError(f"{path}: batch must be a positive integer, got {table.batch!r}")
    bad = next((k for k, v in table.entries.items() if not math.isfinite(v) or v <= 0), None)
    if bad is not None:
        raise UserError(f"{path}: entry {bad} is {table.entries[bad]!r} ms; every entry must be a positive time")
    for name in ("overhead_ms", "dense_ms"):
        value = getattr(table, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or value < 0):
            raise UserError(f"{path}: {name} must be a finite number >= 0, got {value!r}")


def import_table(path: str | Path) -> Path:
    """Check a table the kit measured (``kind`` device) and store it where builds for its target find it."""
    try:
        table = LatencyTable.load(Path(path))
    except (AttributeError, TypeError, ValueError) as e:  # e.g. entries not a mapping
        raise UserError(f"{path}: malformed latency table ({e})") from None
    check_device_table(table, str(path))
    if not table.entries:
        raise UserError(f"{path}: the table has no entries")
    dest = table_store() / stored_name(table.target, table.precision, table.batch)
    dest.parent.mkdir(parents=True, exist_ok=True)
    table.save(dest)
    return dest
