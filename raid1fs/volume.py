"""The mirror engine: one volume over its members.

Owns the rules of guarantee 1 to 4 and 6:
- every write and sync goes to all writable members at once and returns when
  all have finished; a member that fails is recorded failed on the others'
  metadata *before* the caller hears success, so a crash can never bring a
  member that missed a write back as in sync;
- reads come from the member `read_balance` chooses; a read that fails is
  retried on the next member and the bad copy rewritten from the good one;
- the last in-sync member is never failed by an I/O error: the caller gets
  the error instead (like md), so the volume never fails itself to death;
- every state change bumps the event counter on every online member.

Overlapping writes are serialised by a range lock so every member applies
them in the same order. Nothing here imports pyfuse3.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from raid1fs import member as m
from raid1fs.assemble import Plan
from raid1fs.errors import MemberIOError, MemberTimeoutError, Raid1fsError, VolumeIOError
from raid1fs.events import EventSink
from raid1fs.member import Member, fanout, pwrite_full
from raid1fs.superblock import FAILED, MISSING, REMOVED, Superblock, write_superblock

log = logging.getLogger("raid1fs.volume")

# Volume states.
CLEAN = "clean"
DEGRADED = "degraded"
REBUILDING = "rebuilding"
VFAILED = "failed"

STREAM_WINDOW = 4 << 20  # reads this close to the last one belong to its stream


class RangeLock:
    """Serialises operations on overlapping byte ranges.

    `entry = await lock.acquire(start, end)` ... `lock.release(entry)`.
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    async def acquire(self, start: int, end: int) -> tuple[int, int, trio.Event]:
        while True:
            for s, e, ev in self._held:
                if s < end and start < e:
                    await ev.wait()
                    break
            else:
                break
        entry = (start, end, trio.Event())
        self._held.append(entry)
        return entry

    def release(self, entry: tuple[int, int, trio.Event]) -> None:
        self._held.remove(entry)
        entry[2].set()


def read_balance(candidates: list[Member], offset: int) -> list[Member]:
    """Order in which members are asked for a read (guarantee 2).

    Only in-sync members are candidates (the caller filters). Among them:
      1. fewer recent errors first (a decaying count, half-life 60 s);
      2. then members that are not slow: a member whose recent read latency
         is more than twice the best (plus 1 ms of slack) goes last; the
         estimate of an unused member decays, so a slow one is tried again;
      3. then the member whose last read ended near where this one starts
         (within 4 MiB), so a sequential stream, readahead included, stays on
         one member and keeps that member's own readahead working;
      4. then the member with fewer reads in flight, so concurrent reads
         spread over equally healthy members;
      5. then the lowest slot, for a stable order.
    """
    if len(candidates) <= 1:
        return list(candidates)
    now = time.monotonic()
    latency = {c: c.stats.recent_latency(now) for c in candidates}
    best_latency = min(latency.values())

    def key(c: Member) -> tuple[int, int, int, int, int]:
        s = c.stats
        slow = latency[c] > 2 * best_latency + 0.001
        near = abs(offset - s.next_offset) < STREAM_WINDOW
        return (round(s.error_score(now)), int(slow), 0 if near else 1, s.inflight, c.slot)

    return sorted(candidates, key=key)


class Volume:
    """A running volume: its members, its metadata and its I/O."""

    def __init__(self, plan: Plan, io_timeout: float = 30.0, sync: bool = False,
                 readonly: bool = False, events: EventSink | None = None) -> None:
        self.sb: Superblock = plan.authority.copy()  # the roster as the volume sees it
        self.size = self.sb.size
        self.io_timeout = io_timeout
        self.sync = sync
        self.readonly = readonly
        self.events = events or EventSink(self.sb.volume_uuid)
        self.members = [Member(f.path, f.fd, f.sb, io_timeout, f.state) for f in plan.members]
        self.missing = list(plan.missing)
        self._meta_lock = trio.Lock()
        self._ranges = RangeLock()
        self.mounted = False

    # ----- states -----------------------------------------------------------

    def online(self) -> list[Member]:
        return [x for x in self.members if x.state == m.ONLINE]

    def writable(self) -> list[Member]:
        return [x for x in self.members if x.state in (m.ONLINE, m.REBUILDING)]

    @property
    def state(self) -> str:
        online = len(self.online())
        if online == 0:
            return VFAILED
        if any(x.state == m.REBUILDING for x in self.members):
            return REBUILDING
        if online < self.sb.members_expected:
            return DEGRADED
        return CLEAN

    def find_member(self, path: str) -> Member:
        p = os.path.abspath(path)
        for x in self.members:
            if x.path == p or x.uuid == path:
                return x
        raise Raid1fsError(f"{path}: not a member of this volume")

    # ----- metadata ---------------------------------------------------------

    async def _commit(self, change: Callable[[Superblock], object] | None = None,
                      clean: bool | None = None) -> None:
        """Apply `change` to the roster, bump events, persist on every online member.

        A member whose metadata write fails is failed in turn and the commit
        repeated, so the survivors always agree. A change that returns False
        changed nothing (say, a member another write already failed): then
        nothing is written, but the caller has still waited for the commit in
        progress, so what it relies on is durable when it returns.
        """
        async with self._meta_lock:
            if change is not None and change(self.sb) is False and clean is None:
                return
            if clean is not None:
                self.sb.clean = clean
            while True:
                self.sb.events += 1
                targets = self.writable()
                copies = {x: self._sb_for(x) for x in targets}

                def call(x: Member, copies: dict[Member, Superblock] = copies
                         ) -> tuple[Callable[..., object], tuple]:
                    return write_superblock, (x.fd, copies[x])

                _, errors = await fanout(targets, "metadata write", call)
                for x in targets:
                    if x not in errors:
                        x.sb = copies[x]
                if not errors:
                    return
                if len(errors) == len(targets):
                    raise VolumeIOError(
                        "metadata write failed on every member: "
                        + "; ".join(str(e) for e in errors.values()))
                for x, e in errors.items():
                    self._mark_failed(x, e.reason)

    def _failer(self, errors: dict[Member, MemberIOError]) -> Callable[[Superblock], bool]:
        """A roster change failing every member in `errors`; True if any was new."""
        def change(sb: Superblock) -> bool:
            return any([self._mark_failed(x, e.reason) for x, e in errors.items()])
        return change

    def _sb_for(self, x: Member) -> Superblock:
        """The volume's superblock as member x stores it (its identity, its seq)."""
        sb = self.sb.copy()
        sb.member_uuid, sb.slot, sb.seq = x.sb.member_uuid, x.sb.slot, x.sb.seq
        return sb

    def _mark_failed(self, x: Member, reason: str) -> bool:
        """In-memory part of failing a member; the caller commits.

        Idempotent: concurrent writes that all failed on one member fail it
        once. Returns whether anything changed.
        """
        if x.state == m.FAILED:
            return False
        was = self.state
        x.state = m.FAILED
        x.fail_reason = reason
        entry = self.sb.roster_entry(x.uuid)
        if entry is not None:
            entry.state = FAILED
        log.error("member %s failed: %s", x.path, reason)
        self.events.emit("member-failed", x.path, reason)
        if was == CLEAN and self.state != CLEAN:
            self.events.emit("degraded", x.path)
        return True

    async def start(self) -> None:
        """Begin a mount: mark every online member dirty with the current roster."""
        for slot, path in self.missing:
            self.sb.roster[slot].state = MISSING
            log.warning("member missing: %s (slot %d)", path or "?", slot)
        if not self.readonly:
            await self._commit(clean=False)
        self.mounted = True
        if self.state != CLEAN:
            self.events.emit("degraded", "", f"volume starts {self.state}")

    async def shutdown(self) -> None:
        """End a mount: make data durable and mark every online member clean."""
        if self.readonly or not self.writable():
            self.mounted = False
            return
        await self.fsync(datasync=False)
        await self._commit(clean=True)
        self.mounted = False

    # ----- I/O --------------------------------------------------------------

    async def _settle(self, targets: list[Member], errors: dict[Member, MemberIOError],
                      what: str) -> None:
        """After a fan-out: fail the members that failed, unless none succeeded.

        Also when nothing failed here, a commit in progress is waited for: the
        targets may have left out a member that another write just failed,
        whose failure is not yet durable; returning now, a crash could bring
        that member back as in sync without this write.
        """
        if not errors:
            if self._meta_lock.locked():
                async with self._meta_lock:
                    pass
            return
        if len(errors) == len(targets):
            # The last members standing are not failed for an I/O error: the
            # caller gets it, and the volume keeps what it has.
            for x in errors:
                x.stats.note_error()
            first = next(iter(errors.values()))
            raise VolumeIOError(f"{what} failed on every member: {first}")
        await self._commit(self._failer(errors))

    async def write(self, offset: int, data: bytes) -> int:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only mount")
        lock = await self._ranges.acquire(offset, offset + len(data))
        try:
            targets = self.writable()
            if not targets:
                raise VolumeIOError("no member is online")
            _, errors = await fanout(targets, "write", lambda x: (
                pwrite_full, (x.fd, data, x.data_offset + offset, self.sync)))
            for x in targets:
                if x in errors:
                    x.stats.write_errors += 1
                else:
                    x.stats.writes += 1
            await self._settle(targets, errors, f"write at {offset}")
        finally:
            self._ranges.release(lock)
        return len(data)

    async def fsync(self, datasync: bool = False) -> None:
        targets = self.writable()
        if not targets:
            raise VolumeIOError("no member is online")
        sync = os.fdatasync if datasync else os.fsync
        _, errors = await fanout(targets, "fsync", lambda x: (sync, (x.fd,)))
        for x in errors:
            x.stats.write_errors += 1
        await self._settle(targets, errors, "fsync")

    async def read(self, offset: int, length: int) -> bytes:
        bad: list[Member] = []
        for x in read_balance(self.online(), offset):
            if x.state != m.ONLINE:
                continue  # failed while we were trying others
            try:
                data = await x.pread(offset, length)
            except MemberTimeoutError as e:
                x.stats.read_errors += 1
                if len(self.online()) > 1:
                    await self._commit(self._failer({x: e}))
                else:
                    x.stats.note_error()
                continue
            except MemberIOError as e:
                x.stats.read_errors += 1
                x.stats.note_error()
                log.warning("read error on %s at %d+%d: %s; trying another member",
                            x.path, offset, length, e.cause)
                bad.append(x)
                continue
            if bad:
                await self._heal(bad, x, offset, length)
            return data
        raise VolumeIOError(f"read at {offset}+{length}: no member could serve it")

    async def _heal(self, bad: list[Member], good: Member, offset: int, length: int) -> None:
        """Rewrite a bad copy from a good one (under the range lock, re-reading
        the good copy there, so a concurrent write is never undone)."""
        lock = await self._ranges.acquire(offset, offset + length)
        try:
            try:
                data = await good.pread(offset, length)
            except MemberIOError:
                return
            targets = [x for x in bad if x.state == m.ONLINE]
            _, errors = await fanout(targets, "rewrite", lambda x: (
                pwrite_full, (x.fd, data, x.data_offset + offset, True)))
        finally:
            self._ranges.release(lock)
        for x in targets:
            if x not in errors:
                log.warning("repaired %d bytes at %d on %s from %s", length, offset, x.path,
                            good.path)
        if errors:
            await self._commit(self._failer(errors))

    # ----- operator actions -------------------------------------------------

    async def fail(self, path: str, reason: str = "failed by the operator") -> Member:
        x = self.find_member(path)
        if x.state == m.FAILED:
            raise Raid1fsError(f"{x.path}: already failed")
        if x.state == m.ONLINE and len(self.online()) == 1:
            raise Raid1fsError(f"{x.path}: refusing to fail the last in-sync member")
        await self._commit(lambda sb: self._mark_failed(x, reason))
        return x

    async def remove(self, path: str) -> str:
        """Drop a failed, stale or missing member from the roster."""
        p = os.path.abspath(path)
        for slot, hint in list(self.missing):
            if hint == p or self.sb.roster[slot].uuid == path:
                def drop(sb: Superblock, slot: int = slot) -> None:
                    sb.roster[slot].state = REMOVED
                    sb.roster[slot].uuid = ""
                await self._commit(drop)
                self.missing.remove((slot, hint))
                return hint
        x = self.find_member(path)
        if x.state in (m.ONLINE, m.REBUILDING):
            raise Raid1fsError(f"{x.path}: is {x.state}; fail it before removing it")

        def drop_member(sb: Superblock) -> None:
            entry = sb.roster_entry(x.uuid)
            if entry is not None:
                entry.state = REMOVED
                entry.uuid = ""
        await self._commit(drop_member)
        # Its fd stays open until exit: an abandoned thread may still use it.
        self.members.remove(x)
        log.warning("member %s removed", x.path)
        return x.path

    # ----- reporting --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        members: list[dict[str, Any]] = []
        for x in self.members:
            s = x.stats
            members.append({
                "path": x.path, "uuid": x.uuid, "slot": x.slot, "state": x.state,
                "events": x.sb.events,
                "errors": {"read": s.read_errors, "write": s.write_errors,
                           "checksum": s.checksum_errors},
                "reads": s.reads, "writes": s.writes, "rebuild": None,
                "data_offset": x.data_offset,
                "latency_ms": round(s.latency * 1000, 3),
                "fail_reason": x.fail_reason or None,
            })
        for slot, hint in self.missing:
            e = self.sb.roster[slot]
            members.append({
                "path": hint, "uuid": e.uuid, "slot": slot, "state": m.MISSING, "events": None,
                "errors": {"read": 0, "write": 0, "checksum": 0}, "reads": 0, "writes": 0,
                "rebuild": None, "data_offset": self.sb.data_offset, "latency_ms": None,
                "fail_reason": None,
            })
        members.sort(key=lambda d: d["slot"])
        return {
            "volume": {
                "uuid": self.sb.volume_uuid, "name": self.sb.name, "kind": self.sb.kind,
                "state": self.state, "members_expected": self.sb.members_expected,
                "mounted": self.mounted, "size": self.size, "events": self.sb.events,
                "checksums": self.sb.checksums, "readonly": self.readonly,
                "io_timeout": self.io_timeout,
            },
            "members": members,
        }
