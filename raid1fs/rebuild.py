"""Rebuild bookkeeping: what a rebuilding member still lacks, how fast it goes.

The copying itself is `Volume._rebuild` (it needs the volume's locks and
failure rules); this module holds the parts that do not: the progress of one
rebuild, the rate limit, and the copy of one chunk in a member thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import trio

from raid1fs.bitmap import Bitmap
from raid1fs.member import pwrite_full

CHUNK = 8 << 20  # bytes copied under one range lock
CHECKPOINT_EVERY = 2.0  # seconds between checkpoints in the metadata
_ZEROS = bytes(CHUNK)


@dataclass
class Progress:
    """One member's rebuild: the regions it still lacks, and how far it got."""

    pending: Bitmap  # regions still to copy; the member serves reads elsewhere
    full: bool  # a full rebuild (history unknown) or a resync of known regions
    total_bytes: int
    region: int
    size: int
    replaces: str = ""  # member UUID removed from the volume when this one is done
    zeroed: bool = False  # the member is known to read as zeros (a new sparse file)
    done_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    running: bool = False
    error: str = ""
    cancel: trio.CancelScope | None = None
    finished: trio.Event = field(default_factory=trio.Event)

    def holds(self, r0: int, r1: int) -> bool:
        """True if the member already holds regions [r0, r1)."""
        return not self.pending.any_in(r0, r1)

    def copy_again(self, r0: int, r1: int) -> None:
        """Regions [r0, r1) the member holds no longer (a write reached it
        but failed on every in-sync member): copied again."""
        for r in range(r0, r1):
            if not self.pending.test(r):
                self.pending.set_range(r, r + 1)
                self.total_bytes += min(self.region, self.size - r * self.region)

    def position(self) -> int:
        """The checkpoint: every region below it that needed copying was copied."""
        r = self.pending.next_set(0)
        return self.size if r is None else r * self.region

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self.started
        return self.done_bytes / elapsed if elapsed > 0.2 else 0.0

    def as_status(self) -> dict[str, Any]:
        rate = self.rate()
        left = max(0, self.total_bytes - self.done_bytes)
        return {
            "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
            "rate_bytes_per_s": int(rate), "eta_s": round(left / rate, 1) if rate else None,
            "kind": "full" if self.full else "resync", "running": self.running,
            "error": self.error or None,
        }


class Throttle:
    """A rate limit shared by a volume's rebuilds (bytes per second; None: none)."""

    BURST = 0.1  # seconds of rate that may go at once

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._next = 0.0
        self._changed = trio.Event()

    def set(self, rate: int | None) -> None:
        self.rate = rate or None
        self._next = 0.0
        self._changed.set()  # a copy waiting at the old rate re-plans at once
        self._changed = trio.Event()

    async def take(self, nbytes: int) -> None:
        while self.rate:
            now = time.monotonic()
            due = max(self._next, now - self.BURST) + nbytes / self.rate
            if due <= now:
                self._next = due
                return
            changed = self._changed
            with trio.move_on_after(due - now):
                await changed.wait()
                continue  # the rate changed: plan again
            self._next = due
            return


def write_chunk(fd: int, data: bytes, offset: int, skip_zeros: bool) -> None:
    """Write one copied chunk (in the target's thread). A chunk of zeros is
    not written to a member known to read as zeros: a new sparse image
    stays sparse."""
    if skip_zeros and data == _ZEROS[: len(data)]:
        return
    pwrite_full(fd, data, offset, False)
