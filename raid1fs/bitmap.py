"""Region bitmaps: one bit per region of the volume, in memory and on disk.

A disk member stores two of them (docs/format.md): the write-intent bitmap
(regions that may have writes in flight; crash recovery) and the
missed-writes bitmap (regions written while some member was away; resync of
only what changed). Bit i is bit (i % 8) of byte (i // 8), so the on-disk
bytes are this object's bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

_SCAN = 4096  # bytes looked at per step when searching for a set bit


class Bitmap:
    def __init__(self, nbits: int, nbytes: int | None = None, data: bytes | None = None) -> None:
        self.nbits = nbits
        size = nbytes if nbytes is not None else -(-nbits // 8)
        self.bytes = bytearray(size)
        if data is not None:
            n = min(len(data), size, -(-nbits // 8))
            self.bytes[:n] = data[:n]
            self._mask_tail()

    def _mask_tail(self) -> None:
        """Bits past nbits are never set (a damaged bitmap cannot invent regions)."""
        full, rest = divmod(self.nbits, 8)
        if rest:
            self.bytes[full] &= (1 << rest) - 1
            full += 1
        for i in range(full, len(self.bytes)):
            self.bytes[i] = 0

    def copy(self) -> Bitmap:
        b = Bitmap(self.nbits, len(self.bytes))
        b.bytes[:] = self.bytes
        return b

    @classmethod
    def full(cls, nbits: int, nbytes: int | None = None) -> Bitmap:
        b = cls(nbits, nbytes)
        b.set_range(0, nbits)
        return b

    def test(self, i: int) -> bool:
        return bool(self.bytes[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> None:
        self.bytes[i >> 3] |= 1 << (i & 7)

    def set_range(self, lo: int, hi: int) -> None:
        """Set bits lo <= i < hi."""
        hi = min(hi, self.nbits)
        i = lo
        while i < hi and i & 7:
            self.set(i)
            i += 1
        if i < hi:
            whole = (hi - i) // 8
            if whole:
                self.bytes[i >> 3 : (i >> 3) + whole] = b"\xff" * whole
                i += whole * 8
            while i < hi:
                self.set(i)
                i += 1

    def clear_range(self, lo: int, hi: int) -> None:
        hi = min(hi, self.nbits)
        i = lo
        while i < hi and i & 7:
            self.bytes[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            i += 1
        if i < hi:
            whole = (hi - i) // 8
            if whole:
                self.bytes[i >> 3 : (i >> 3) + whole] = bytes(whole)
                i += whole * 8
            while i < hi:
                self.bytes[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                i += 1

    def clear_all(self) -> None:
        self.bytes[:] = bytes(len(self.bytes))

    def any_in(self, lo: int, hi: int) -> bool:
        """Is any bit lo <= i < hi set?"""
        n = self.next_set(lo)
        return n is not None and n < hi

    def next_set(self, start: int) -> int | None:
        """The first set bit at or after `start`, or None."""
        if start >= self.nbits:
            return None
        b = start >> 3
        byte = self.bytes[b] >> (start & 7)
        if byte:
            return start + ((byte & -byte).bit_length() - 1)
        b += 1
        end = -(-self.nbits // 8)
        while b < end:
            chunk = bytes(self.bytes[b : min(b + _SCAN, end)])
            stripped = chunk.lstrip(b"\0")
            if stripped:
                b += len(chunk) - len(stripped)
                byte = stripped[0]
                i = b * 8 + ((byte & -byte).bit_length() - 1)
                return i if i < self.nbits else None
            b += len(chunk)
        return None

    def runs(self, start: int = 0, limit: int = 1 << 62) -> Iterator[tuple[int, int]]:
        """(lo, hi) runs of set bits from `start`, each at most `limit` long."""
        i = self.next_set(start)
        while i is not None:
            j = i + 1
            while j < self.nbits and j - i < limit and self.test(j):
                j += 1
            yield i, j
            i = self.next_set(j)

    def count(self) -> int:
        return int.from_bytes(self.bytes, "little").bit_count()

    def __ior__(self, other: Bitmap) -> Bitmap:
        n = min(len(self.bytes), len(other.bytes))
        mine = int.from_bytes(self.bytes[:n], "little") | int.from_bytes(other.bytes[:n], "little")
        self.bytes[:n] = mine.to_bytes(n, "little")
        self._mask_tail()
        return self

    def __bool__(self) -> bool:
        return self.next_set(0) is not None
