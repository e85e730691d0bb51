"""How sizes are written for people, in one place (the calculator, progress lines and summaries).

Example::

    >>> from ftmagic.units import format_bytes
    >>> format_bytes(1536), format_bytes(3 * 1024**3), format_bytes(15.5 * 1024**3), format_bytes(None)
    ('1.50 KiB', '3.00 GiB', '15.5 GiB', '?')
"""

from __future__ import annotations

from typing import Optional


def format_bytes(n: Optional[float]) -> str:
    """Bytes in binary units with three significant digits; ``"?"`` when unknown."""
    if n is None or n != n:
        return "?"
    if n < 0:
        return "-" + format_bytes(-n)
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{digits}f} {unit}"
