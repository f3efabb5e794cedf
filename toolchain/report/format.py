"""How the report writes numbers: every helper takes whatever the manifest holds and never raises.

A value that is missing, None, a string, NaN or a boolean prints as "-" (or "" where an empty cell reads
better), so one odd figure in a manifest costs a cell, not the report.
"""

from __future__ import annotations

import math
from typing import Any


def num(x: Any) -> float | None:
    """A finite float, or None for anything else (missing keys, None, strings, NaN, booleans)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def pct(x: Any) -> str:
    x = num(x)
    return "-" if x is None else f"{100 * x:.2f}%"


def pp(x: Any, ref: Any) -> str:
    """Accuracy change in percentage points."""
    x, ref = num(x), num(ref)
    if x is None or ref is None:
        return ""
    d = 100 * (x - ref)
    return f"{'+' if d >= 0 else '−'}{abs(d):.2f} pp"


def ms(x: Any) -> str:
    x = num(x)
    if x is None:
        return "-"
    return f"{x:.1f} ms" if x >= 100 else f"{x:.2f} ms" if x >= 10 else f"{x:.3f} ms"


def ms_bare(x: Any) -> str:
    return ms(x).removesuffix(" ms")


def mean_std(mean: float, std: float | None) -> str:
    """`mean ± std` with the mean's decimals for both."""
    text = ms_bare(mean)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return text if std is None else f"{text} ± {std:.{decimals}f}"


def mb(x: Any) -> str:
    x = num(x)
    return "-" if x is None else f"{x:.1f} MB" if x >= 1 else f"{x:.3f} MB"


def budget(x: Any) -> str:
    x = num(x)
    return "-" if x is None else f"{x:.0f} MB"


def bytes_mb(x: Any) -> float | None:
    x = num(x)
    return None if x is None else x / 2**20


def count(x: Any) -> str:
    """FLOPs or parameter counts: 305.54 M, 1.23 G."""
    x = num(x)
    if x is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}"
    return f"{x:.0f}"


def speedup(slow: Any, fast: Any) -> str:
    slow, fast = num(slow), num(fast)
    if slow is None or fast is None or fast <= 0:
        return ""
    return f"{slow / fast:.2f}× faster" if slow >= fast else f"{fast / slow:.2f}× slower"


def batch_key(b: Any) -> tuple[int, str]:
    """Batch sizes in numeric order; a batch that is not a number goes last."""
    try:
        return int(b), str(b)
    except (TypeError, ValueError):
        return 1 << 30, str(b)
