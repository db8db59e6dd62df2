"""Parsing and printing of sizes and rates (K, M, G, T are powers of 1024)."""

from __future__ import annotations

import re

from raid1fs.errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?(/S)?\s*$")


def parse_size(text: str, what: str = "size", rate: bool = False) -> int:
    """Parse '8G', '512M', '4096', '1.5G' (and for a rate '100M/s') into
    bytes; UsageError if malformed or not a whole number of bytes."""
    m = _RE.match(text.upper())
    if not m or (m.group(3) and not rate):
        raise UsageError(f"{what} {text!r}: expected a number with an optional K, M, G or T suffix")
    exact = float(m.group(1)) * _UNITS[m.group(2)]
    value = int(exact)
    if value != exact:
        raise UsageError(f"{what} {text!r}: not a whole number of bytes")
    if value <= 0:
        raise UsageError(f"{what} {text!r}: must be greater than zero")
    return value


def format_size(n: float) -> str:
    """Human form: 8.0G, 312M, 4.0K, 17B."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}B"
