"""Rebuild progress for people: a bar on a terminal, plain lines otherwise.

Used by `raid1fs rebuild --wait` (polling a mount) and by the offline
`raid1fs rebuild MEMBER...` (watching its own engine).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from raid1fs.sizes import format_size

BAR = 30
PLAIN_EVERY = 10.0  # seconds between lines when not on a terminal


def rebuilding(st: dict[str, Any]) -> list[dict[str, Any]]:
    """Members of a status report whose rebuild is under way."""
    return [mem for mem in st["members"] if mem.get("rebuild") and mem["rebuild"]["running"]]


def summary(st: dict[str, Any]) -> tuple[int, int, float]:
    done = total = 0
    rate = 0.0
    for mem in rebuilding(st):
        rb = mem["rebuild"]
        done += rb["done_bytes"]
        total += rb["total_bytes"] or 0
        rate += rb["rate_bytes_per_s"]
    return done, total, rate


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Printer:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last_line = 0.0
        self.drawn = False

    def update(self, st: dict[str, Any]) -> None:
        done, total, rate = summary(st)
        if not total:
            return
        pct = 100.0 * done / total
        eta = (total - done) / rate if rate else None
        names = ", ".join(mem["path"] for mem in rebuilding(st))
        text = (f"{pct:5.1f}%  {format_size(done)} of {format_size(total)}  "
                f"{format_size(int(rate))}/s  ETA {eta_text(eta)}")
        if self.tty:
            fill = int(BAR * done / total)
            self.out.write(f"\r  [{'#' * fill}{'.' * (BAR - fill)}] {text}  ")
            self.drawn = True
        else:
            now = time.monotonic()
            if now - self.last_line < PLAIN_EVERY:
                return
            self.last_line = now
            self.out.write(f"rebuilding {names}: {text}\n")
        self.out.flush()

    def finish(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


def outcome(st: dict[str, Any], waited: set[str] | None = None) -> tuple[int, list[str]]:
    """Exit status and lines to print once no rebuild runs any more: what
    the rebuilds of the members in `waited` (None: every member) did."""
    lines = []
    for mem in st["members"]:
        last = mem.get("last_rebuild")
        if last and (waited is None or mem["path"] in waited):
            lines.append(f"{mem['path']}: {last['kind']} done, {format_size(last['copied_bytes'])}"
                         f" copied in {last['seconds']:.1f} s")
        rb = mem.get("rebuild")
        if rb and rb.get("error"):
            lines.append(f"{mem['path']}: rebuild stopped: {rb['error']}")
        if mem["state"] in ("failed", "stale", "missing"):
            why = mem.get("fail_reason") if mem["state"] == "failed" else None
            lines.append(f"{mem['path']}: {mem['state']}" + (f" ({why})" if why else ""))
    state = st["volume"]["state"]
    lines.append(f"volume {state}")
    return (0 if state == "clean" else 1), lines


def print_started(started: list[dict[str, Any]]) -> None:
    """What `rebuild` set off: one line per member (or why it did not)."""
    for r in started:
        if "note" in r:
            print(f"{r['path']}: {r['note']}")
            continue
        kind = "full rebuild" if r["kind"] == "full" else "resync"
        print(f"{r['path']}: {kind} {r['action']}, {format_size(r['left_bytes'])} to copy")
