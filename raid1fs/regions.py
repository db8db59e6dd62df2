"""The write-intent and missed-writes bitmaps of a running volume.

Rules (docs/write-ordering.md, rules 9-12):
- before a write is issued, the intent bits of the regions it touches are set
  on every writable member, durably; bits are set a whole *group* at a time
  (INTENT_GROUP bytes of regions), so a sequential stream pays one bitmap
  write per group, not per region;
- intent bits are cleared lazily: a group with no write in flight and none
  started for INTENT_LINGER seconds is cleared after an fdatasync of every
  member has made its data durable;
- while some member is away (a roster slot failed or missing),
  every region written is recorded in the missed-writes bitmap, durably,
  before the write is issued; a member that fails also has every region with
  a write in flight, or written since the last sync of every member (not yet
  known durable), recorded; the bitmap is emptied only when every member is
  in sync again;
- the missed-writes bitmap is written before the intent bitmap, so a cleared
  intent bit never reaches the disk before the missed bit that replaces it.

This module keeps the bits and says which blocks changed; the volume writes
them (it owns the members and what a failed write means).
"""

from __future__ import annotations

import os

import trio

from raid1fs.bitmap import Bitmap
from raid1fs.superblock import Superblock

INTENT_GROUP = 64 << 20  # bytes of volume covered by one intent mark
INTENT_LINGER = 5.0  # seconds a group stays marked after its last write
BLOCK = 4096
INTENT, MISSED = 0, 1


class RegionLog:
    def __init__(self, sb: Superblock) -> None:
        self.size = sb.size
        self.region = sb.region_size
        self.nregions = -(-sb.size // sb.region_size)
        self.offset = sb.bitmap_offset
        self.nbytes = sb.bitmap_bytes
        self.group = max(1, INTENT_GROUP // self.region)  # regions per group
        self.intent = Bitmap(self.nregions, self.nbytes)
        self.missed = Bitmap(self.nregions, self.nbytes)
        # Regions written since the last sync of every member, and those of
        # the syncs under way (see sync_begin): not yet known durable.
        self.unsynced = Bitmap(self.nregions, self.nbytes)
        self.syncing: list[Bitmap] = []
        # Regions where the members may differ while mounted: a write there
        # was given up on every in-sync member after a timeout, and a call
        # given up on may still land on one of them. Their intent bits stay
        # set, and the unmount leaves the volume unclean, so the next mount
        # resyncs them (as after a crash).
        self.suspect = Bitmap(self.nregions, self.nbytes)
        self.inflight: dict[int, int] = {}  # group -> writes in flight
        self.inflight_regions: dict[int, int] = {}  # region -> writes in flight
        self.started: dict[int, int] = {}  # group -> writes started (ever)
        self.last: dict[int, float] = {}  # group -> when its last write ended
        self.dirty: set[tuple[int, int]] = set()  # (INTENT|MISSED, block) not yet written
        self.gen = 0  # bumped whenever bits are set
        self.synced = 0  # gen known durable on every writable member
        self.lock = trio.Lock()  # one bitmap write at a time
        self.enabled = os.environ.get("RAID1FS_NO_BITMAP") != "1"  # bench only

    # ----- geometry ---------------------------------------------------------

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """Regions [r0, r1) touched by a byte range."""
        return offset // self.region, (offset + max(length, 1) - 1) // self.region + 1

    def region_bytes(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 * self.region, min(r1 * self.region, self.size)

    def bytes_of(self, bits: Bitmap) -> int:
        """Volume bytes covered by the set bits."""
        n = bits.count() * self.region
        if bits.test(self.nregions - 1):
            n -= self.nregions * self.region - self.size
        return n

    # ----- writes -----------------------------------------------------------

    def begin(self, offset: int, length: int, recording: bool) -> tuple[range, bool]:
        """Account a write; set the bits it needs. Returns its regions and
        whether bitmap blocks must be made durable before it is issued."""
        r0, r1 = self.span(offset, length)
        regions = range(r0, r1)
        for r in regions:
            self.inflight_regions[r] = self.inflight_regions.get(r, 0) + 1
        if r1 - r0 > 1 or not self.unsynced.test(r0):  # (set already: the usual case)
            self.unsynced.set_range(r0, r1)
        groups = range(r0 // self.group, (r1 - 1) // self.group + 1)
        for g in groups:
            self.inflight[g] = self.inflight.get(g, 0) + 1
            self.started[g] = self.started.get(g, 0) + 1
        if not self.enabled:
            return regions, False
        need = False
        for g in groups:
            lo = g * self.group
            if not self.intent.test(lo):
                self._set(INTENT, self.intent, lo, lo + self.group)
                need = True
        if recording:
            for r in range(r0, r1):
                if not self.missed.test(r):
                    self._set(MISSED, self.missed, r, r + 1)
                    need = True
        # A bit another write set may not be durable yet: wait for it too.
        return regions, need or self.synced < self.gen

    def end(self, regions: range, now: float) -> None:
        for r in regions:
            n = self.inflight_regions[r] - 1
            if n:
                self.inflight_regions[r] = n
            else:
                del self.inflight_regions[r]
        for g in range(regions[0] // self.group, (regions[-1]) // self.group + 1):
            n = self.inflight[g] - 1
            if n:
                self.inflight[g] = n
            else:
                del self.inflight[g]
            self.last[g] = now

    def _set(self, which: int, bits: Bitmap, lo: int, hi: int) -> None:
        bits.set_range(lo, hi)
        self._touch(which, lo, hi)
        self.gen += 1

    def _touch(self, which: int, lo: int, hi: int) -> None:
        for b in range((lo // 8) // BLOCK, ((min(hi, self.nregions) - 1) // 8) // BLOCK + 1):
            self.dirty.add((which, b))

    def adopt_intent(self, bits: Bitmap, now: float) -> None:
        """Intent bits found on the members at mount: cleared lazily too."""
        self.intent |= bits
        for r, _ in bits.runs(0, self.group):
            self.last.setdefault(r // self.group, now)
        self._touch(INTENT, 0, self.nregions)
        self.gen += 1

    def touch_all(self) -> None:
        """Every block is to be written (a member joins; bits were merged)."""
        self._touch(INTENT, 0, self.nregions)
        self._touch(MISSED, 0, self.nregions)
        self.gen += 1

    def record_leaving(self) -> None:
        """A member leaves: every region it may lack goes to the missed-writes
        bitmap. That is each write in flight (it may have missed it), and
        each region written since the last sync of every member (`unsynced`,
        and those of syncs under way): that data reached the member but is
        not known durable on it, and may never be (a failed fsync can mean
        lost writeback). Later writes are recorded as they begin."""
        for r in self.inflight_regions:
            if not self.missed.test(r):
                self._set(MISSED, self.missed, r, r + 1)
        for bits in (self.unsynced, *self.syncing):
            for lo, hi in list(bits.runs()):
                self._set(MISSED, self.missed, lo, hi)

    def sync_begin(self) -> Bitmap:
        """A sync of every member starts: what it will cover is what was
        written until now, except writes still in flight (they may land
        after it). Returns the token for sync_end."""
        covered = self.unsynced
        self.syncing.append(covered)
        self.unsynced = Bitmap(self.nregions, self.nbytes)
        for r in self.inflight_regions:
            self.unsynced.set_range(r, r + 1)
        return covered

    def sync_end(self, covered: Bitmap, ok: bool) -> None:
        """That sync ended: if it succeeded on every member still there, its
        regions are durable on them (one that failed it got them as missed);
        if not, they stay not known durable."""
        self.syncing = [b for b in self.syncing if b is not covered]
        if not ok:
            self.unsynced |= covered

    # ----- lazy clearing ----------------------------------------------------

    def idle_groups(self, now: float) -> dict[int, int]:
        """Marked groups with no write in flight for INTENT_LINGER seconds,
        with their started-count (to see later that none began since)."""
        out = {}
        for g, t in list(self.last.items()):
            if g not in self.inflight and now - t >= INTENT_LINGER:
                out[g] = self.started.get(g, 0)
        return out

    def clear_groups(self, groups: dict[int, int]) -> int:
        """Clear the groups no write touched since `idle_groups`; returns how many."""
        n = 0
        for g, started in groups.items():
            lo = g * self.group
            if g in self.inflight or self.started.get(g, 0) != started or \
                    self.suspect.any_in(lo, lo + self.group):
                continue
            self.intent.clear_range(lo, lo + self.group)
            self._touch(INTENT, lo, lo + self.group)
            self.last.pop(g, None)
            n += 1
        if n:
            self.gen += 1
        return n

    def clear_intent(self) -> None:
        """At unmount: every intent bit but the suspect regions'."""
        self.intent.clear_all()
        self.intent |= self.suspect
        self.last.clear()
        self._touch(INTENT, 0, self.nregions)
        self.gen += 1

    def clear_missed(self) -> None:
        self.missed.clear_all()
        self._touch(MISSED, 0, self.nregions)
        self.gen += 1

    # ----- writing ----------------------------------------------------------

    def take_dirty(self) -> list[tuple[int, bytes]]:
        """(member offset, bytes) spans to write, missed-writes bitmap first."""
        spans = []
        for which, bits in ((MISSED, self.missed), (INTENT, self.intent)):
            blocks = sorted(b for w, b in self.dirty if w == which)
            if not blocks:
                continue
            lo, hi = blocks[0] * BLOCK, (blocks[-1] + 1) * BLOCK
            spans.append((self.offset + which * self.nbytes + lo, bytes(bits.bytes[lo:hi])))
        self.dirty.clear()
        return spans


def write_spans(fd: int, spans: list[tuple[int, bytes]]) -> None:
    """Write each span durably (RWF_DSYNC: this range only, not the whole
    file), in order."""
    for offset, data in spans:
        done = 0
        while done < len(data):
            done += os.pwritev(fd, [memoryview(data)[done:]], offset + done, os.RWF_DSYNC)
