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

import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from raid1fs import assemble, create, iobatch
from raid1fs import member as m
from raid1fs.assemble import Plan
from raid1fs.bitmap import Bitmap
from raid1fs.errors import MemberIOError, MemberTimeoutError, Raid1fsError, VolumeIOError
from raid1fs.events import EventSink
from raid1fs.member import Member, fanout, pwrite_full
from raid1fs.rebuild import CHECKPOINT_EVERY, CHUNK, Progress, Throttle, write_chunk
from raid1fs.regions import RegionLog, write_spans
from raid1fs.superblock import (
    ABSENT_STATES,
    ACTIVE,
    FAILED,
    MISSING,
    REBUILDING,
    REMOVED,
    SPARE,
    Slot,
    Superblock,
    read_bitmaps,
    write_superblock,
)

log = logging.getLogger("raid1fs.volume")
T = TypeVar("T")


class GivenUp(Raid1fsError):
    """A call on a path did not answer within the I/O timeout; its thread
    may still be running."""


def _drop_new(nm: create.NewMember) -> None:
    """Undo an open_new_member that returned after it was given up."""
    m.close_member(nm.fd)
    if nm.created:  # a sparse image made for it: nothing else uses it
        try:
            os.unlink(nm.path)
        except OSError:
            pass


def _park_fd(fd: int) -> None:
    """Point fd at /dev/null, read-only: the file it named is let go, and a
    late call through the number fails instead of reaching whatever file
    would get the number next. The number stays taken."""
    m.let_go_of_backing_file(fd)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)

# Volume states.
CLEAN = "clean"
DEGRADED = "degraded"
# REBUILDING ("rebuilding") is the roster state of the same name
VFAILED = "failed"

STREAM_WINDOW = 4 << 20  # reads this close to the last one belong to its stream
# Buffered writes up to QUICK_MAX bytes usually finish in microseconds: the
# loop thread waits for them up to QUICK_WAIT seconds before parking the
# task (raid1fs.iobatch.run_batch).
QUICK_MAX = 64 << 10
QUICK_WAIT = 0.0005
LET_GO_GRACE = 2.0  # seconds the exit waits for members' files to close


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
                 readonly: bool = False, events: EventSink | None = None,
                 max_rebuild_rate: int | None = None) -> None:
        self.sb: Superblock = plan.authority.copy()  # the roster as the volume sees it
        self.size = self.sb.size
        self.io_timeout = io_timeout
        self.sync = sync
        self.readonly = readonly
        self.events = events or EventSink(self.sb.volume_uuid)
        self.members = [Member(f.path, f.fd, f.sb, io_timeout, f.state, f.idents)
                        for f in plan.members]
        for x, f in zip(self.members, plan.members, strict=True):
            x.fail_reason = f.note
        self.missing = list(plan.missing)
        self._overruled = [f.sb.member_uuid for f in plan.overruled]
        self._meta_lock = trio.Lock()
        self._fail_gen = self._durable_fail_gen = 0  # failures marked / committed
        self._admin_lock = trio.Lock()  # add, replace, remove, spare takeover: one at a time
        self._ranges = RangeLock()
        self.regions = RegionLog(self.sb)
        self.throttle = Throttle(max_rebuild_rate)
        self._nursery: trio.Nursery | None = None
        self._held: list[Member] = []  # removed, still locked: their I/O hangs
        self._leaving: list[Member] = []  # being removed (see _leave)
        self._joining: set[trio.CancelScope] = set()  # adds reading their member (_join)
        self._stopping = False
        self.mounted = False

    # ----- states -----------------------------------------------------------

    def online(self) -> list[Member]:
        return [x for x in self.members if x.state == m.ONLINE]

    def writable(self) -> list[Member]:
        return [x for x in self.members if x.state in (m.ONLINE, m.REBUILDING)]

    def readers(self, offset: int, length: int) -> list[Member]:
        """Members that may serve a read of this range: the in-sync ones, and
        rebuilding ones that already hold it (guarantee 2)."""
        out = self.online()
        r0, r1 = self.regions.span(offset, length)
        for x in self.members:
            if x.state == m.REBUILDING and x.rebuild is not None and x.rebuild.holds(r0, r1):
                out.append(x)
        return out

    def _recording(self) -> bool:
        """Are writes recorded in the missed-writes bitmap (someone is away)?

        A rebuilding member is not away: writes reach it. What it still lacks
        is in the bitmap already (it was put there before it came back), or
        it is rebuilt in full."""
        return any(s.state in ABSENT_STATES for s in self.sb.roster)

    def _behind(self) -> bool:
        """Does anyone still need the missed-writes bitmap?"""
        return any(s.state in (*ABSENT_STATES, REBUILDING) for s in self.sb.roster)

    def _filled(self) -> int:
        """Slots that hold, or are being given, the volume's data, counting
        the OLD and NEW of a running replace once (OLD leaves when NEW is in)."""
        filling = {s.uuid for s in self.sb.roster if s.state in (ACTIVE, REBUILDING)}
        leaving = {s.replaces for s in self.sb.roster
                   if s.state == REBUILDING and s.replaces in filling}
        return len(filling) - len(leaving)

    @property
    def state(self) -> str:
        online = len(self.online())
        if online == 0:
            return VFAILED
        if any(x.state == m.REBUILDING for x in self.members):
            return REBUILDING
        if online < self.sb.members_expected:
            return DEGRADED
        if self._recording():
            # A member failed, missing or stale is still on the roster (a
            # spare took its place, or it was not needed): not every member
            # is in sync until it is removed or brought back (zpool, too,
            # stays DEGRADED until the failed disk is detached).
            return DEGRADED
        return CLEAN

    def find_member(self, path: str) -> Member:
        p = os.path.abspath(path)
        for x in self.members:
            if x.path == p or x.uuid == path:
                return x
        raise Raid1fsError(f"{path}: not a member of this volume")

    async def _find(self, path: str) -> Member:
        """find_member, also under another name of the same file or device
        (a /dev/disk/by-id link, a hard link): compared by identity, in a
        thread, under the I/O timeout (stat of a hung path must not hold
        the loop or the caller)."""
        try:
            return self.find_member(path)
        except Raid1fsError:
            if not os.path.isabs(path):
                raise  # a member UUID that is not ours
            x = await self._bounded(path, self._member_at, os.path.abspath(path),
                                    list(self.members), outcome="nothing done")
            if x is None:
                raise
            return x

    async def _bounded(self, path: str, fn: Callable[..., T], *args: Any,
                       undo: Callable[[T], object] | None = None,
                       outcome: str = "not added", progress: bool = False) -> T:
        """fn(*args) in a thread, given up after the I/O timeout with a
        one-line error naming `path`. A call that returns after it was given
        up is undone (`undo(result)`), so it leaves nothing behind.

        progress=True: fn also gets `alive=`, a function it calls after each
        step of a long job (reading a whole image for data, say); the
        timeout then applies to each step, not to the whole call."""
        lock = threading.Lock()
        box: dict[str, Any] = {}
        beat = [time.monotonic()]
        finished = trio.Event()

        def alive() -> None:
            beat[0] = time.monotonic()

        def run() -> T:
            r = fn(*args, alive=alive) if progress else fn(*args)
            with lock:
                if box.get("abandoned"):
                    if undo is not None:
                        undo(r)
                else:
                    box["result"] = r
            return r

        async def call() -> None:
            try:
                # A limiter of its own: threads still hung on given-up calls
                # must not use up a shared one, or every later call (a
                # healthy path's too) would wait for a token and be given up
                # as well.
                await trio.to_thread.run_sync(run, abandon_on_cancel=True,
                                              limiter=trio.CapacityLimiter(1))
            except Exception as e:  # noqa: BLE001 - handed to the caller below
                box["error"] = e
            finished.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                while not finished.is_set():
                    left = beat[0] + self.io_timeout - time.monotonic()
                    if left <= 0:
                        break
                    with trio.move_on_after(left):
                        await finished.wait()
                nursery.cancel_scope.cancel()
        except BaseException:  # cancelled (the mount ends): as if given up
            self._abandon(lock, box, undo)
            raise
        if finished.is_set():
            e = box.get("error")
            if isinstance(e, OSError):  # an I/O error the call did not put in words
                raise Raid1fsError(f"{path}: I/O failed: {e.strerror or e}; {outcome}")
            if e is not None:
                raise e
            return box["result"]
        self._abandon(lock, box, undo)
        raise GivenUp(f"{path}: no answer within the {self.io_timeout:g} s I/O timeout; "
                      f"{outcome}")

    @staticmethod
    def _abandon(lock: threading.Lock, box: dict[str, Any],
                 undo: Callable[[Any], object] | None) -> None:
        """_bounded's call is no longer waited for: what it returns from now
        on is undone by its thread; what it returned just now, here."""
        with lock:
            box["abandoned"] = True
            late = box.pop("result", None)
        if late is not None and undo is not None:
            undo(late)

    # ----- metadata ---------------------------------------------------------

    async def _commit(self, change: Callable[[Superblock], object] | None = None,
                      clean: bool | None = None,
                      undo: Callable[[Superblock], object] | None = None) -> None:
        """Apply `change` to the roster, bump events, persist on every online member.

        A member whose metadata write fails is failed in turn and the commit
        repeated, so the survivors always agree. A change that returns False
        changed nothing (say, a member another write already failed): then
        nothing is written, but the caller has still waited for the commit in
        progress, so what it relies on is durable when it returns. If the
        commit is written nowhere (VolumeIOError), `undo` takes the change
        back, under the same lock, so that no later commit records what the
        caller was told failed.
        """
        async with self._meta_lock:
            if change is not None and change(self.sb) is False and clean is None:
                return
            if clean is not None:
                self.sb.clean = clean
            if self.readonly:
                # Members opened read-only: a failure marked here (by the
                # operator, or after a read timeout) lasts for this mount.
                self._durable_fail_gen = self._fail_gen
                return
            while True:
                self.sb.events += 1
                for entry in self.sb.roster:
                    if entry.state not in ABSENT_STATES:
                        entry.gone_events = 0
                    elif entry.gone_events < 0:  # gone in this mount: this commit says so
                        entry.gone_events = self.sb.events
                targets = [x for x in self.members if x.state in (m.ONLINE, m.REBUILDING, m.SPARE)]
                copies = {x: self._sb_for(x) for x in targets}

                def call(x: Member, copies: dict[Member, Superblock] = copies
                         ) -> tuple[Callable[..., object], tuple]:
                    return write_superblock, (x.fd, copies[x])

                fail_gen = self._fail_gen  # every failure marked so far is in the copies
                # The in-sync members first (rule 4): if it reaches none of
                # them, it is written nowhere and nobody is failed for it.
                # Written to a rebuilding member or a spare alone, the
                # in-sync members would be failed and the volume left with
                # no member in sync, which no mount accepts.
                first = [x for x in targets if x.state == m.ONLINE] or targets
                _, errors = await fanout(first, "metadata write", call)
                if len(errors) == len(first):
                    for x in errors:
                        x.stats.note_error()
                    # Written nowhere: the number is taken back, so the
                    # members in sync stay at most one commit apart (the
                    # rule assembly tells an older copy of a member by).
                    self.sb.events -= 1
                    if undo is not None:
                        undo(self.sb)
                    if not errors:  # every member failed already
                        raise VolumeIOError("no member is left to write metadata to")
                    raise VolumeIOError(
                        "metadata write failed on every in-sync member: "
                        + "; ".join(str(e) for e in errors.values()))
                rest = [x for x in targets if x not in first]
                if rest:
                    errors.update((await fanout(rest, "metadata write", call))[1])
                if not errors:
                    self._durable_fail_gen = fail_gen
                for x in targets:
                    if x not in errors:
                        x.sb = copies[x]
                if not errors:
                    return
                for x, e in errors.items():
                    self._mark_failed(x, e.reason)

    async def set_attrs(self, attrs: dict[str, int]) -> None:
        """Record the attributes chmod, chown and utimens set (of the `disk`
        file and the mount's root) on every member (guarantee 1: they
        outlive the mount)."""
        before: dict[str, int] = {}

        def change(sb: Superblock) -> bool:
            if all(sb.attrs.get(k) == v for k, v in attrs.items()):
                return False
            before.update(sb.attrs)
            sb.attrs.update(attrs)
            return True

        def undo(sb: Superblock) -> None:  # the caller gets EIO: the disk keeps them
            sb.attrs.clear()
            sb.attrs.update(before)
        await self._commit(change, undo=undo)

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
        self._fail_gen += 1
        was = self.state
        rebuilding = x.state == m.REBUILDING
        x.state = m.FAILED
        x.fail_reason = reason
        entry = self.sb.roster_entry(x.uuid)
        if entry is not None:
            if entry.state == SPARE:
                self.sb.drop(entry)  # a spare that failed is not waited for
            else:
                if entry.state not in ABSENT_STATES:
                    entry.gone_events = -1  # filled in by the commit that records it
                entry.state = FAILED
                entry.rebuild_full = entry.rebuild_full or (
                    rebuilding and x.rebuild is not None and x.rebuild.full)
                entry.replaces = ""  # a replace ends when its NEW member fails
        if x.rebuild is not None:
            x.rebuild.replaces = ""
        # Whatever was in flight or is not yet known durable on it may be
        # missing on it (rule 11).
        self.regions.record_leaving()
        log.error("member %s failed: %s", x.path, reason)
        self.events.emit("member-failed", x.path, reason)
        if was == CLEAN and self.state != CLEAN:
            self.events.emit("degraded", x.path)
        if self._nursery is not None and any(y.state == m.SPARE for y in self.members):
            self._nursery.start_soon(self._take_spares)
        return True

    async def start(self, nursery: trio.Nursery | None = None) -> None:
        """Begin a mount: work out who needs rebuilding, mark every member
        dirty with the current roster, start the background work.

        Background tasks (rebuilds, clearing intent bits, spare takeover) run
        in `nursery`; without one (tests of the engine) they do not run.
        """
        self._nursery = nursery
        for x in self.members:
            if x.fail_reason:  # judged at assembly: why it is not in sync
                log.warning("member %s: %s", x.path, x.fail_reason)
        for slot, path in self.missing:
            self.sb.roster[slot].state = MISSING
            self.sb.roster[slot].gone_events = -1
            log.warning("member missing: %s (slot %d)", path or "?", slot)
        present = {x.uuid for x in self.members}
        for slot, e in enumerate(self.sb.roster):
            if e.state == SPARE and e.uuid not in present:
                log.warning("spare not given: %s (slot %d); it cannot take over", e.path, slot)
        # --prefer settled a split brain: this mount's counter starts above
        # every member's (the winner stays the authority), and the winner's
        # roster records each overruled member gone right after its own last
        # change, so the next assembly finds it behind (stale), not split.
        self.sb.events = max([self.sb.events] + [x.sb.events for x in self.members])
        for x in self.members:
            entry = self.sb.roster_entry(x.uuid)
            if x.uuid in self._overruled and entry is not None and \
                    entry.state in ABSENT_STATES:
                # Gone just after its own last change: behind now, split
                # again as soon as it is used alone once more.
                entry.gone_events = x.sb.events + 1
        if not self.readonly:
            await self._plan_rebuilds()
            await self._flush_regions()
            await self._commit(clean=False)
        elif any(not x.sb.clean for x in self.online()):
            # Read-only after a crash: nothing may be resynced, and the
            # members may differ where writes were in flight. Read from one.
            source = self._source()
            for x in self.online():
                if x is not source:
                    x.state = m.STALE
                    log.warning("read-only mount after an unclean shutdown: %s serves no "
                                "reads until a read-write mount resyncs it", x.path)
        self.mounted = True
        # Degraded: a member is away, or the volume is short of in-sync ones
        # with nothing rebuilding. Not a resync after a crash with every
        # member there (rebuild-started says that one).
        away = any(e.state in ABSENT_STATES for e in self.sb.roster)
        if self.state in (DEGRADED, VFAILED) or (self.state != CLEAN and away):
            self.events.emit("degraded", "", f"volume starts {self.state}")
        if nursery is not None and not self.readonly:
            for x in self.members:
                if x.state == m.REBUILDING:
                    self._spawn_rebuild(x)
            nursery.start_soon(self._clear_intent_loop)
            nursery.start_soon(self._take_spares)

    async def _plan_rebuilds(self) -> None:
        """Decide at mount what each member must be sent (guarantees 5 and 6).

        - after a crash (a member not marked clean) every region whose intent
          bit is set on any member may differ between the members: the others
          are resynced from one in-sync member (the source) over those regions
          before they serve them;
        - a rebuilding member resumes from its checkpoint (plus the crash's
          regions, which may lie below it);
        - a stale member is resynced over the regions the missed-writes
          bitmaps name, when its history is known (its event counter is not
          older than the bitmap), else rebuilt in full; stale members are
          only taken up to the volume's member count.
        """
        rl = self.regions
        intent = Bitmap(rl.nregions, rl.nbytes)
        missed = Bitmap(rl.nregions, rl.nbytes)
        for x in self.members:
            if x.state == m.SPARE:
                continue
            try:
                i_raw, m_raw = await x._run("bitmap read", read_bitmaps, x.fd, x.sb)
            except MemberIOError as e:
                self._mark_failed(x, e.reason)
                continue
            intent |= Bitmap(rl.nregions, rl.nbytes, i_raw)
            missed |= Bitmap(rl.nregions, rl.nbytes, m_raw)
        unclean = any(not x.sb.clean for x in self.members
                      if x.state in (m.ONLINE, m.REBUILDING))
        crash = intent if unclean else Bitmap(rl.nregions, rl.nbytes)
        if unclean and crash:
            log.warning("unclean shutdown: %s in %d regions may differ between members",
                        _mib(rl.bytes_of(crash)), crash.count())
        rl.adopt_intent(crash, time.monotonic())
        rl.missed |= missed
        rl.missed |= crash  # kept until every member holds those regions
        rl.touch_all()
        source = self._source()
        for x in self.members:
            entry = self.sb.roster_entry(x.uuid)
            assert entry is not None
            if x.state == m.ONLINE and x is not source and crash:
                self._set_rebuilding(x, entry, crash.copy(), full=False)
            elif x.state == m.REBUILDING:
                pending = Bitmap.full(rl.nregions, rl.nbytes) if entry.rebuild_full \
                    else rl.missed.copy()
                pending.clear_range(0, entry.rebuild_pos // rl.region)
                pending |= crash
                self._set_rebuilding(x, entry, pending, full=entry.rebuild_full,
                                    replaces=entry.replaces)
        for x in self.members:
            entry = self.sb.roster_entry(x.uuid)
            if x.state == m.STALE and entry is not None and self._filled() < \
                    self.sb.members_expected:
                self._set_rebuilding(x, entry, *self._resync_set(x, entry))

    def _source(self) -> Member | None:
        """The in-sync member others are resynced from after a crash."""
        online = self.online()
        for x in online:
            if x.sb.member_uuid == self.sb.member_uuid:
                return x  # the authority, or the member --prefer named
        return online[0] if online else None

    def _resync_set(self, x: Member, entry: Slot) -> tuple[Bitmap, bool]:
        """What a member that was away needs: (regions, full?)."""
        rl = self.regions
        if entry.rebuild_full or x.sb.events < self.sb.missed_since:
            return Bitmap.full(rl.nregions, rl.nbytes), True
        # Every write since it left is named there: those in flight when it
        # left (rule 11), later ones as they began, and after a crash the
        # intent bits (merged at mount).
        return rl.missed.copy(), False

    def _set_rebuilding(self, x: Member, entry: Slot, pending: Bitmap, full: bool,
                        replaces: str = "", zeroed: bool = False) -> None:
        """In memory: x receives every write from now on and is sent `pending`."""
        rl = self.regions
        x.state = m.REBUILDING
        x.fail_reason = ""
        x.last_rebuild = None  # "the last one finished": not while another runs
        x.rebuild = Progress(pending, full, rl.bytes_of(pending), rl.region, rl.size,
                             replaces=replaces, zeroed=zeroed)
        entry.state = REBUILDING
        entry.rebuild_full = full
        entry.replaces = replaces
        entry.rebuild_pos = x.rebuild.position()
        rl.touch_all()  # its bitmaps become the volume's
        log.warning("member %s: %s of %s", x.path, "full rebuild" if full else "resync",
                    _mib(x.rebuild.total_bytes))

    async def shutdown(self) -> None:
        """End a mount: stop rebuilds at a checkpoint, make data durable,
        clear the intent bitmap and mark every member clean."""
        self._stopping = True
        for scope in self._joining:
            scope.cancel()  # an add still reading its member: refused (_join)
        async with self._admin_lock:
            pass  # an add, replace or remove under way ends first; later ones are refused
        await self._stop_rebuilds()
        if self.readonly or not self.writable():
            self.mounted = False
            return
        await self.fsync(datasync=False)
        self.regions.clear_intent()  # but the suspect regions', for the next mount
        await self._flush_regions()
        await self._commit(self._checkpoint_all, clean=not self.regions.suspect)
        self.mounted = False

    def let_go(self) -> None:
        """At exit, after shutdown: let go of every member file now. A
        thread stuck in I/O to a hung member keeps this process alive after
        its main thread is gone, and with it every file it has open; the
        in-sync members must not stay locked (in use, for status and the
        next mount) until the hung one answers. The stuck call keeps only its
        own member's file.

        Closing can hang too: the last close of a block device writes back
        its dirty pages, and a failed member's device may be the hung one.
        So each member is let go in a thread of its own, and a close that
        hangs holds up neither the others nor the exit (its thread then
        keeps the process listed, as a stuck write does)."""
        threads = [threading.Thread(target=_park_fd, args=(x.fd,), daemon=True,
                                    name=f"let go {x.path}")
                   for x in self.members + self._held]
        for t in threads:
            t.start()
        deadline = time.monotonic() + LET_GO_GRACE
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for t in threads:
            if t.is_alive():
                log.error("%s: closing it hangs (its device writing back what it holds); "
                          "the other members are let go", t.name.removeprefix("let go "))

    def _checkpoint_all(self, sb: Superblock) -> None:
        for x in self.members:
            if x.state == m.REBUILDING and x.rebuild is not None:
                entry = sb.roster_entry(x.uuid)
                if entry is not None:
                    entry.rebuild_pos = x.rebuild.position()

    # ----- I/O --------------------------------------------------------------

    async def _settle(self, targets: list[Member], errors: dict[Member, MemberIOError],
                      what: str) -> None:
        """After a fan-out: fail the members that failed, unless none succeeded.

        Also when nothing failed here, a member failure not yet durable is
        waited for: the targets may have left out a member that another write
        just failed; returning now, a crash could bring that member back as
        in sync without this write. (Other commits, such as checkpoints, are
        not waited for.)
        """
        if not errors:
            if self._fail_gen != self._durable_fail_gen:
                # Wait for the failing commit, and if it did not get through,
                # commit again: the write may not return before the failure
                # it relies on is durable (if it cannot be, the caller gets
                # an error).
                await self._commit(lambda sb: self._fail_gen != self._durable_fail_gen)
            return
        online = [x for x in targets if x.state == m.ONLINE]
        if all(x in errors for x in online):
            # The last in-sync members are not failed for an I/O error: the
            # caller gets it, and the volume keeps what it has.
            for x in errors:
                x.stats.note_error()
            first = next(iter(errors.values()))
            raise VolumeIOError(f"{what} failed on every in-sync member: {first}")
        await self._commit(self._failer(errors))

    async def write(self, offset: int, data: bytes) -> int:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only mount")
        regions, need = self.regions.begin(offset, len(data), self._recording())
        try:
            if need:
                await self._flush_regions()
            return await self._write(offset, data)
        finally:
            self.regions.end(regions, time.monotonic())

    async def _write(self, offset: int, data: bytes) -> int:
        lock = await self._ranges.acquire(offset, offset + len(data))
        try:
            targets = self.writable()
            if not targets:
                raise VolumeIOError("no member is online")
            _, errors = await fanout(targets, "write", lambda x: (
                pwrite_full, (x.fd, data, x.data_offset + offset, self.sync)),
                quick=QUICK_WAIT if len(data) <= QUICK_MAX and not self.sync else 0)
            for x in targets:
                if x not in errors:
                    x.stats.writes += 1
            if errors and all(x in errors for x in targets if x.state == m.ONLINE):
                # The caller gets an error and the in-sync members keep what
                # they had; a rebuilding member that took the write differs
                # from them there now: it copies the regions again.
                r0, r1 = self.regions.span(offset, len(data))
                for x in targets:
                    if x not in errors and x.state == m.REBUILDING and x.rebuild is not None:
                        x.rebuild.copy_again(r0, r1)
                if any(isinstance(e, MemberTimeoutError) for e in errors.values()):
                    # A write given up on may still land, on one member and
                    # not another: they may differ there from now on.
                    self.regions.suspect.set_range(r0, r1)
                    log.error("write at %d given up on every in-sync member after the I/O "
                              "timeout: the members may differ there until it is resynced, "
                              "once the calls given up on end (or by the next mount)", offset)
            await self._settle(targets, errors, f"write at {offset}")
        finally:
            self._ranges.release(lock)
        return len(data)

    async def fsync(self, datasync: bool = False) -> None:
        targets = self.writable()
        if not targets:
            raise VolumeIOError("no member is online")
        sync = os.fdatasync if datasync else os.fsync
        covered = self.regions.sync_begin()
        ok = False
        try:
            _, errors = await fanout(targets, "fsync", lambda x: (sync, (x.fd,)))
            await self._settle(targets, errors, "fsync")  # a member failed it: rule 11
            ok = True
        finally:
            self.regions.sync_end(covered, ok)

    async def read(self, offset: int, length: int) -> bytes:
        bad: list[Member] = []
        for x in read_balance(self.readers(offset, length), offset):
            if x.state not in (m.ONLINE, m.REBUILDING):
                continue  # failed while we were trying others
            try:
                data = await x.pread(offset, length)
            except MemberTimeoutError as e:
                x.stats.read_errors += 1
                if x.state == m.REBUILDING or len(self.online()) > 1:
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
            targets = [x for x in bad if x.state in (m.ONLINE, m.REBUILDING)]
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

    # ----- the bitmaps (raid1fs.regions) ----------------------------------

    async def _flush_regions(self) -> None:
        """Make every bitmap bit set so far durable on every writable member."""
        rl = self.regions
        want = rl.gen
        async with rl.lock:
            if rl.synced >= want:
                return
            gen = rl.gen
            spans = rl.take_dirty()
            targets = self.writable()
            if spans and targets:
                _, errors = await fanout(targets, "bitmap write",
                                         lambda x: (write_spans, (x.fd, spans)))
                try:
                    await self._settle(targets, errors, "bitmap write")
                except BaseException:
                    rl.touch_all()  # written nowhere for sure: write it all next time
                    raise
            rl.synced = gen

    async def _clear_intent_loop(self) -> None:
        """Clear intent bits of groups that went quiet, once their data is
        durable everywhere (rule 10)."""
        rl = self.regions
        while True:
            await trio.sleep(1.0)
            if rl.suspect:
                try:
                    await self._resync_suspect()
                except Raid1fsError as e:
                    log.error("resyncing regions a given-up write left suspect: %s", e)
            idle = rl.idle_groups(time.monotonic())
            if not idle or self._stopping:
                continue
            try:
                await self.fsync(datasync=True)
                if rl.clear_groups(idle):
                    await self._flush_regions()
            except Raid1fsError as e:
                log.error("clearing write-intent bits: %s", e)

    def _given_up_running(self) -> bool:
        """A call given up on still runs on an in-sync member (and may land
        there). One on a failed member, hung for good, does not matter."""
        return iobatch.given_up_running({x.workers for x in self.online()})

    async def _resync_suspect(self) -> None:
        """Resync the regions a write given up on every in-sync member left
        suspect (rule 16), once no call given up on is still running on an
        in-sync member (none can land later), and no rebuild runs: the in-sync members but the
        source become rebuilding over those regions, as after a crash."""
        if self.readonly or self._stopping or self._given_up_running():
            return
        async with self._admin_lock:
            rl = self.regions
            if self._stopping or not rl.suspect or self._given_up_running() or \
                    any(x.state == m.REBUILDING for x in self.members):
                return
            source = self._source()
            targets = [x for x in self.online() if x is not source]
            pending = rl.suspect.copy()
            log.warning("regions a given-up write left suspect (%s): %s",
                        _mib(rl.bytes_of(pending)),
                        "resyncing them" if targets else "one in-sync member, nothing to resync")
            try:
                if targets:
                    rl.missed |= pending  # kept until every member holds those regions
                    for x in targets:
                        entry = self.sb.roster_entry(x.uuid)
                        assert entry is not None
                        self._set_rebuilding(x, entry, pending.copy(), full=False)
                    await self._flush_regions()  # the bitmaps before the roster names them
                    await self._commit()
                rl.suspect.clear_all()  # (not when that failed: the unmount stays unclean)
            finally:
                for x in targets:  # copying anyway: none is left rebuilding with no rebuild
                    if x.state == m.REBUILDING:
                        self._spawn_rebuild(x)

    async def _maybe_clear_missed(self) -> None:
        """Empty the missed-writes bitmap once nobody is away or behind.

        The new `missed_since` is committed first: a crash in between leaves
        extra bits (more copying later), never too few."""
        if self._behind() or not self.regions.missed or self.readonly:
            return

        def since(sb: Superblock) -> None:
            sb.missed_since = sb.events + 1  # the commit's own event number
        await self._commit(since)
        if not self._behind():
            self.regions.clear_missed()
            await self._flush_regions()

    # ----- rebuild ----------------------------------------------------------

    def _spawn_rebuild(self, x: Member) -> None:
        if self._nursery is None or x.rebuild is None or x.rebuild.running or self._stopping:
            return
        x.rebuild.running = True
        x.rebuild.error = ""
        x.rebuild.finished = trio.Event()
        self._nursery.start_soon(self._rebuild, x)

    async def _stop_rebuilds(self) -> None:
        for x in self.members:
            p = x.rebuild
            if p is not None and p.running and p.cancel is not None:
                p.cancel.cancel()
        for x in self.members:
            p = x.rebuild
            if p is not None and p.running:
                await p.finished.wait()

    async def _rebuild(self, x: Member) -> None:
        """Copy the regions x lacks from in-sync members (guarantee 8).

        Each chunk is copied under the range lock, so a foreground write to
        it waits and then reaches x too: x never ends up with older data.
        Writes elsewhere reach x all along. The position is checkpointed in
        the metadata every CHECKPOINT_EVERY seconds.
        """
        p: Progress = x.rebuild
        p.cancel = trio.CancelScope()
        self.events.emit("rebuild-started", x.path,
                         f"{'full rebuild' if p.full else 'resync'} of {_mib(p.total_bytes)}")
        try:
            with p.cancel:
                # Again while regions were handed back (copy_again) behind it.
                while await self._copy_all(x, p) and p.pending and x.rebuild is p:
                    pass
            if (p.cancel.cancelled_caught or x.state != m.REBUILDING or x.rebuild is not p
                    or p.pending):
                return  # stopped: resumed from its checkpoint later
            with trio.CancelScope(shield=True):
                await self._finish_rebuild(x)
        except Raid1fsError as e:
            p.error = str(e)
            log.error("rebuild of %s stopped: %s", x.path, e)
        except Exception as e:  # a bug: keep the mount serving, say why
            p.error = f"internal error: {e}"
            log.exception("rebuild of %s failed", x.path)
        finally:
            p.running = False
            p.finished.set()

    async def _copy_all(self, x: Member, p: Progress) -> bool:
        """One pass over the regions pending when it starts; False if the
        rebuild had to stop."""
        rl = self.regions
        last_checkpoint = time.monotonic()
        for r0, r1 in list(p.pending.runs(0, max(1, CHUNK // rl.region))):
            if x.state != m.REBUILDING or x.rebuild is not p:
                return False
            lo, hi = rl.region_bytes(r0, r1)
            await self.throttle.take(hi - lo)
            with trio.CancelScope(shield=True):  # a copy is never left half done
                ok = await self._copy(x, lo, hi)
            if not ok:
                return False
            p.pending.clear_range(r0, r1)
            p.done_bytes += hi - lo
            if time.monotonic() - last_checkpoint >= CHECKPOINT_EVERY:
                last_checkpoint = time.monotonic()
                await self._checkpoint()
        return True

    async def _checkpoint(self) -> None:
        """Record every rebuild's position (rule 15): what was copied is made
        durable first, so a checkpoint never names data a power cut lost."""
        targets = [x for x in self.members if x.state == m.REBUILDING]
        # The positions as they are before the fdatasync: another rebuild
        # copies on meanwhile, and what it copies then is not yet durable.
        at = {x: (x.rebuild, x.rebuild.position()) for x in targets if x.rebuild is not None}
        _, errors = await fanout(targets, "fsync", lambda x: (os.fdatasync, (x.fd,)))
        if errors:
            await self._commit(self._failer(errors))

        def record(sb: Superblock) -> None:
            for x, (p, pos) in at.items():
                entry = sb.roster_entry(x.uuid)
                if x.state == m.REBUILDING and x.rebuild is p and entry is not None:
                    entry.rebuild_pos = pos
        await self._commit(record)

    async def _copy(self, x: Member, lo: int, hi: int) -> bool:
        """Copy volume bytes [lo, hi) to x; False if the rebuild must stop."""
        p: Progress = x.rebuild
        lock = await self._ranges.acquire(lo, hi)
        try:
            data = None
            why = "no in-sync member to copy from"
            for src in read_balance(self.online(), lo):
                if src.state != m.ONLINE:
                    continue  # failed, or left the volume, while others were tried
                try:
                    data = await src.pread(lo, hi - lo)
                    break
                except MemberIOError as e:
                    src.stats.read_errors += 1
                    src.stats.note_error()
                    why = f"cannot read {src.path} at {lo}: {e.reason}"
                    if isinstance(e, MemberTimeoutError) and len(self.online()) > 1:
                        await self._commit(self._failer({src: e}))  # guarantee 4, as reads
            if data is None:
                p.error = why  # (a source that failed while another served is no error)
                log.error("rebuild of %s stopped: %s", x.path, p.error)
                return False
            if x.state != m.REBUILDING:
                return False
            try:
                await x._run("rebuild write", write_chunk, x.fd, data, x.data_offset + lo,
                             p.zeroed)
            except MemberIOError as e:
                x.stats.write_errors += 1
                await self._commit(self._failer({x: e}))
                return False
            x.stats.writes += 1
            return True
        finally:
            self._ranges.release(lock)

    async def _finish_rebuild(self, x: Member) -> None:
        p: Progress = x.rebuild
        try:
            await x._run("fsync", os.fdatasync, x.fd)
        except MemberIOError as e:
            await self._commit(self._failer({x: e}))
            return
        # Under the admin lock: an `add` of the replaced member's path waits
        # until it has been told and let go of (see remove).
        async with self._admin_lock:
            await self._finish_under_lock(x, p)

    async def _finish_under_lock(self, x: Member, p: Progress) -> None:
        old = None
        if p.replaces:
            old = next((y for y in self.members if y.uuid == p.replaces and y is not x), None)

        finished = False

        def done(sb: Superblock) -> bool:
            nonlocal finished
            if x.state != m.REBUILDING or x.rebuild is not p:
                return False  # failed (or removed) while its data was synced
            finished = True
            entry = sb.roster_entry(x.uuid)
            if entry is not None:
                entry.state, entry.rebuild_pos, entry.rebuild_full = ACTIVE, 0, False
                entry.replaces = ""
            x.state = m.ONLINE
            if p.replaces:
                gone = sb.roster_entry(p.replaces)
                if gone is not None:
                    sb.drop(gone)
                if old is not None:
                    old.state = m.FAILED  # no more I/O to it; dropped below
                self.missing[:] = [(s, h) for s, h in self.missing
                                   if sb.roster[s].state != REMOVED]
            return True
        await self._commit(done)
        if not finished:
            return
        elapsed = time.monotonic() - p.started
        x.last_rebuild = {"kind": "full" if p.full else "resync", "copied_bytes": p.done_bytes,
                          "seconds": round(elapsed, 2), "finished": time.time()}
        x.rebuild = None
        if old is not None:
            await self._leave(old)
            log.warning("member %s replaced by %s", old.path, x.path)
        log.warning("member %s in sync: %s copied in %.1f s", x.path, _mib(p.done_bytes), elapsed)
        self.events.emit("rebuild-finished", x.path,
                         f"{_mib(p.done_bytes)} in {elapsed:.1f} s")
        self.events.emit("member-online", x.path)
        await self._maybe_clear_missed()

    async def _take_spares(self) -> None:
        """A spare takes over while the volume has fewer members than it should
        (not on a read-only mount: its rebuild would write)."""
        if self.readonly:
            return
        async with self._admin_lock:
            for x in list(self.members):
                if self._stopping or self._filled() >= self.sb.members_expected:
                    return
                if x.state != m.SPARE:
                    continue
                entry = self.sb.roster_entry(x.uuid)
                if entry is None:
                    continue
                log.warning("spare %s takes over", x.path)
                await self._begin_rebuild(x, entry, Bitmap.full(self.regions.nregions,
                                                                self.regions.nbytes), True)

    async def _begin_rebuild(self, x: Member, entry: Slot, pending: Bitmap, full: bool,
                             replaces: str = "", zeroed: bool = False) -> None:
        """Make x a rebuilding member, durably, and start copying."""
        self._set_rebuilding(x, entry, pending, full, replaces, zeroed)
        await self._flush_regions()  # x gets the bitmaps before the roster names it
        await self._commit()
        self._spawn_rebuild(x)

    # ----- operator actions -------------------------------------------------

    async def fail(self, path: str, reason: str = "failed by the operator") -> Member:
        try:
            x = await self._find(path)
        except Raid1fsError:
            away = self._away(path)  # a slot of the roster whose member is not here
            if away is None:
                raise
            raise Raid1fsError(f"{away[1]}: not in this mount, so it gets no I/O already; "
                               "`raid1fs remove` it to drop it from the volume") from None

        def change(sb: Superblock) -> bool:
            # Checked under the commit's lock: two `fail`s at once must not
            # both pass the check and fail every member between them.
            self._refuse_if_stopping(x.path)
            if x.state == m.FAILED:
                raise Raid1fsError(f"{x.path}: already failed")
            if x.state == m.ONLINE and len(self.online()) == 1:
                raise Raid1fsError(f"{x.path}: refusing to fail the last in-sync member")
            return self._mark_failed(x, reason)
        try:
            await self._commit(change)
        except VolumeIOError as e:
            if x.state != m.FAILED:
                raise
            # It is failed here (no I/O goes to it; it cannot be taken back:
            # writes may have left it out already), but no member says so.
            raise VolumeIOError(f"{x.path}: failed in this mount, but that could not be "
                                f"recorded ({e}); writes get I/O errors until it can be") from None
        return x

    def _refuse_if_stopping(self, path: str) -> None:
        """Operator actions are refused once the unmount has begun: their
        members may already be let go of, and the final commit written."""
        if self._stopping:
            raise Raid1fsError(f"{path}: nothing done: the volume is being unmounted")

    def _away(self, path: str) -> tuple[int, str] | None:
        """(slot, path) of a member of the roster that is not in this mount:
        missing, failed earlier, or a spare, and not given to it (status
        lists them all)."""
        p = os.path.abspath(path)
        for slot, hint in self.missing:
            if hint == p or self.sb.roster[slot].uuid == path:
                return slot, hint
        present = {x.uuid for x in self.members}
        for slot, e in enumerate(self.sb.roster):
            if e.state in (*ABSENT_STATES, SPARE) and e.uuid and e.uuid not in present \
                    and (e.path == p or e.uuid == path):
                return slot, e.path
        return None

    async def remove(self, path: str) -> dict[str, Any]:
        """Drop a failed, stale or missing member from the roster.

        The mirror narrows with it (zpool detach), down to two ways: a 3-way
        mirror that loses a member and has it removed is a clean 2-way one,
        and an `add` (which widens it) can be undone; a 2-way mirror stays
        2-way and degraded until a member is added.
        """
        if self.readonly:
            raise Raid1fsError(f"{path}: the volume is mounted read-only")
        # Under the admin lock: the member is told it left and let go of
        # before an `add` of its path looks for it (else the add would find
        # it still locked by this mount).
        async with self._admin_lock:
            self._refuse_if_stopping(path)
            return await self._remove(path)

    async def _remove(self, path: str) -> dict[str, Any]:
        before = self.sb.members_expected

        def outcome(p: str, old_copy_left: bool) -> dict[str, Any]:
            """`told`: False when the member left holding metadata that still
            calls it one of ours, an old copy of the volume (the CLI warns)."""
            n = self.sb.members_expected
            return {"path": p, "members_expected": n, "narrowed": n < before,
                    "told": not old_copy_left}

        away = self._away(path)
        if away is not None:
            slot, hint = away
            # Not in this mount, so not told; but a spare's own metadata
            # holds no copy of the volume to be mistaken for it.
            old_copy_left = self.sb.roster[slot].state != SPARE

            change, undo = self._dropping(self.sb.roster[slot].uuid)
            await self._commit(change, undo=undo)
            self.missing[:] = [(s, h) for s, h in self.missing if s != slot]
            await self._maybe_clear_missed()
            return outcome(hint, old_copy_left)
        x = await self._find(path)
        if x.state in (m.ONLINE, m.REBUILDING):
            raise Raid1fsError(f"{x.path}: is {x.state}; fail it before removing it")

        change, undo = self._dropping(x.uuid)
        await self._commit(change, undo=undo)
        told = await self._leave(x)
        log.warning("member %s removed", x.path)
        await self._maybe_clear_missed()
        return outcome(x.path, not told)

    def _dropping(self, uuid: str) -> tuple[Callable[[Superblock], None],
                                            Callable[[Superblock], None]]:
        """The roster change removing member `uuid` (the mirror narrows with
        it), and its undo for a commit written nowhere: that slot, the width
        and the removed list put back, and nothing else (a failure the
        commit's retry marked stays)."""
        saved: list[Any] = []

        def change(sb: Superblock) -> None:
            entry = sb.roster_entry(uuid)
            saved[:] = [entry, dataclasses.replace(entry) if entry else None,
                        sb.members_expected, uuid in sb.removed]
            if entry is not None:
                sb.drop(entry)
            self._narrow(sb)

        def undo(sb: Superblock) -> None:
            entry, was, width, known = saved
            if entry is not None:
                for f in dataclasses.fields(was):
                    setattr(entry, f.name, getattr(was, f.name))
            sb.members_expected = width
            if not known:
                sb.removed = [u for u in sb.removed if u != uuid]
        return change, undo

    def _narrow(self, sb: Superblock) -> None:
        """After a removal: expect no more members than the roster still
        names (in sync, being rebuilt, or away: failed or missing ones may
        come back), so the mirror narrows by at most the slot removed, and
        never below two ways."""
        named = {e.uuid for e in sb.roster
                 if e.uuid and e.state in (ACTIVE, REBUILDING, *ABSENT_STATES)}
        leaving = {e.replaces for e in sb.roster
                   if e.state == REBUILDING and e.replaces in named}
        sb.members_expected = max(2, min(sb.members_expected, len(named) - len(leaving)))

    async def _leave(self, x: Member) -> bool:
        """Take a member the roster no longer names out of the mount: told
        so (_disown), then let go of. Meanwhile it is in self._leaving, so
        an `add` of its path knows to wait for the admin lock instead of
        opening a file this mount still holds. Returns whether it was told."""
        try:
            self._leaving.append(x)
            self.members.remove(x)
            told = await self._disown(x)
            self._release(x)
        finally:
            self._leaving.remove(x)
        return told

    async def _disown(self, x: Member) -> bool:
        """Tell a member that just left the volume so, if it still answers:
        its own metadata then names it removed, and it is refused by mount
        (even alone, --degraded) and shown as removed by status, instead of
        passing for a degraded copy of the volume. Best effort: a dead or
        hung member (I/O in flight) keeps what it had; the others' metadata
        names it removed anyway. Returns whether it was told."""
        if self.readonly or x.workers.busy:
            return False
        sb = self._sb_for(x)
        sb.clean = True  # no mount uses it
        try:
            await x._run("metadata write", write_superblock, x.fd, sb)
        except MemberIOError as e:
            log.warning("member %s removed, but its metadata could not say so: %s", x.path, e)
            return False
        x.sb = sb
        return True

    def _release(self, x: Member) -> None:
        """Let go of a member that left the volume, so that it can be added
        again: its lock, and for a block device its exclusive open. Unless
        I/O to it still hangs, which could land after a new copy of it.

        The fd number itself stays taken until exit (a coroutine that picked
        x before it left may still hand it to a thread, and a closed number
        could by then name another file, even the member added back): it is
        pointed at /dev/null, read-only, so such a late call fails instead.
        """
        if x.workers.busy:
            self._held.append(x)
            return
        _park_fd(x.fd)  # drops the flock and O_EXCL

    async def add(self, path: str, spare: bool = False) -> dict[str, Any]:
        """Add a member: rebuilt online, or a spare (`raid1fs add`).

        A failed or stale member of this volume is re-added: it is sent only
        what it missed when that is known (guarantee 6)."""
        return await self._join(path, spare=spare)

    async def replace(self, old: str, new: str) -> dict[str, Any]:
        """Rebuild `new` online; `old` keeps serving until then, then is removed."""
        return await self._join(new, old=old)

    async def _replaced(self, old: str) -> tuple[str, bool]:
        """The checks of `replace OLD`, under the admin lock (of two replaces
        of OLD at once, the second finds it already being replaced): the
        member UUID it replaces, and whether it is in this mount (else it
        cannot be told, in its own metadata, that it left)."""
        self._refuse_if_stopping(old)
        away = self._away(old)
        if away is not None and self.sb.roster[away[0]].state == SPARE:
            raise Raid1fsError(f"{away[1]}: is a spare (and not here), not in use; remove "
                               "it and add the new one with --spare")
        uuid = self.sb.roster[away[0]].uuid if away is not None else ""
        if not uuid:
            x = await self._find(old)
            if x.state == m.SPARE:
                raise Raid1fsError(f"{x.path}: is a spare, not in use; remove it and add "
                                   "the new one with --spare")
            if x.state == m.REBUILDING and x.rebuild is not None and x.rebuild.replaces:
                raise Raid1fsError(f"{x.path}: is itself replacing another member")
            uuid = x.uuid
        if any(y.rebuild is not None and y.rebuild.replaces == uuid for y in self.members):
            raise Raid1fsError(f"{old}: already being replaced")
        return uuid, away is None

    async def _join(self, path: str, spare: bool = False,
                    old: str | None = None) -> dict[str, Any]:
        """`add` (and `replace`, with `old`). A new member is opened and read
        whole for data first, outside the admin lock: that can take long,
        and must hold up neither the unmount nor other operator actions.
        What it found is checked again under the lock."""
        self._refuse_if_stopping(path)
        if self.readonly:
            raise Raid1fsError(f"{path}: the volume is mounted read-only")
        p = os.path.abspath(path)
        nm: create.NewMember | None = None

        async def open_new() -> create.NewMember:
            return await self._bounded(
                path, create.open_new_member, p, self.sb.data_offset + self.size,
                self.sb.volume_uuid, undo=_drop_new, progress=True)
        try:
            if old is not None:
                await self._replaced(old)  # before the long read, once more under the lock
            if await self._bounded(path, self._member_at, p,
                                   self.members + self._held + self._leaving) is None:
                with trio.CancelScope() as scope:  # the unmount ends it (shutdown)
                    self._joining.add(scope)
                    try:
                        nm = await open_new()
                    finally:
                        self._joining.discard(scope)
                if scope.cancelled_caught:
                    self._refuse_if_stopping(path)
            async with self._admin_lock:
                self._refuse_if_stopping(path)
                uuid, told = await self._replaced(old) if old is not None else ("", True)
                for y in [y for y in self._held if not y.workers.busy]:
                    self._held.remove(y)
                    self._release(y)
                existing = await self._bounded(path, self._member_at, p,
                                               self.members + self._held)
                if existing is None and nm is None:
                    nm = await open_new()  # a member when first looked for, left since
                out = await self._join_locked(p, path, spare, uuid, nm, existing)
            return {**out, "old_told": told} if old is not None else out
        except BaseException:
            if nm is not None and not nm.parked and not any(y.fd == nm.fd
                                                            for y in self.members):
                # An image made for it goes again, in a thread: closing and
                # unlinking on a file system that hangs now must not stop
                # the loop (the unmount that refused this add, say).
                threading.Thread(target=_drop_new, args=(nm,), daemon=True,
                                 name=f"drop {nm.path}").start()
            raise

    async def _join_locked(self, p: str, path: str, spare: bool, replaces: str,
                           nm: create.NewMember | None,
                           existing: Member | None) -> dict[str, Any]:
        """_join's work under the admin lock: `existing`, the member at p
        (looked for under the lock), or else `nm`, the path opened."""
        if existing is not None and nm is not None:
            raise Raid1fsError(f"{path}: joined the volume meanwhile (another command)")
        if existing in self._held:
            raise Raid1fsError(f"{path}: was removed from this volume while I/O to it "
                               "hung; it can be added again once that I/O ends or after "
                               "a remount")
        if existing is not None:
            if replaces:
                raise Raid1fsError(f"{path}: already a member of this volume "
                                   f"({existing.state})")
            named = path if p == existing.path else f"{path} (member {existing.path})"
            return await self._readd(existing, spare, named)
        assert nm is not None
        entry = self.sb.roster_entry(nm.old_sb.member_uuid) if nm.old_sb else None
        if entry is not None and entry.state == SPARE:
            # A spare this mount was not given: it joins anew (as asked: a
            # spare, a member, a replacement), its old roster entry dropped
            # in the same commit.
            self.sb.drop(entry)
        elif entry is not None and nm.old_sb is not None and not replaces:
            if entry.state in (*ABSENT_STATES, REBUILDING):
                # A member that was missing is back: re-add it.
                x = Member(p, nm.fd, nm.old_sb, self.io_timeout, m.STALE, nm.idents)
                self.members.append(x)
                self.missing[:] = [(sl, h) for sl, h in self.missing
                                   if self.sb.roster[sl].uuid != x.uuid]
                return await self._readd(x, spare)
        return await self._add_new(nm, spare, replaces)

    def _member_at(self, path: str, among: list[Member]) -> Member | None:
        """The one of `among` this path names (under any name), if any."""
        try:
            ident = assemble.identity(path)
        except OSError:
            return None
        for x in among:
            if ident in x.idents:
                return x
        return None

    async def _readd(self, x: Member, spare: bool, named: str = "") -> dict[str, Any]:
        named = named or x.path
        if x.state not in (m.FAILED, m.STALE):
            raise Raid1fsError(f"{named}: already a member of this volume ({x.state})")
        if x.workers.busy:
            # A write that hung when it failed could land after the resync
            # copied its region, and leave it older than the volume.
            raise Raid1fsError(f"{named}: I/O to it from before it failed still hangs; it can "
                               "be re-added once that I/O ends or after a remount")
        if spare:
            raise Raid1fsError(f"{named}: is a {x.state} member of this volume; "
                               "add it without --spare to re-add it")
        entry = self.sb.roster_entry(x.uuid)
        if entry is None:
            raise Raid1fsError(f"{named}: no longer a member of this volume")
        pending, full = self._resync_set(x, entry)
        await self._begin_rebuild(x, entry, pending, full)
        return self._describe(x)

    async def _add_new(self, nm: create.NewMember, spare: bool, replaces: str) -> dict[str, Any]:
        slots = self.sb.roster
        slot = next((i for i, e in enumerate(slots) if e.state == REMOVED), len(slots))
        sb = self._sb_for_new(slot)
        try:
            await self._bounded(nm.path, create.init_member, nm.fd, sb, progress=True)
        except (GivenUp, trio.Cancelled):
            # Its thread may still write through nm.fd: the number must not
            # name another file when it does. It goes to /dev/null and stays
            # taken (the image is left: that thread may still write to it).
            _park_fd(nm.fd)
            nm.parked = True
            raise
        x = Member(nm.path, nm.fd, sb, self.io_timeout, m.SPARE, nm.idents)
        entry = Slot(sb.member_uuid, SPARE if spare else REBUILDING, nm.path)
        widened = not spare and not replaces and self._filled() >= self.sb.members_expected
        if widened:
            self.sb.members_expected = self._filled() + 1  # a mirror grows by one
        if slot < len(slots):
            slots[slot] = entry
        else:
            slots.append(entry)
        self.members.append(x)
        if spare:
            await self._commit()
            log.warning("member %s added as a spare", x.path)
            if self._nursery is not None:
                self._nursery.start_soon(self._take_spares)
        else:
            rl = self.regions
            await self._begin_rebuild(x, entry, Bitmap.full(rl.nregions, rl.nbytes), True,
                                      replaces=replaces, zeroed=nm.created)
        takes_over = spare and not self.readonly and \
            self._filled() < self.sb.members_expected  # _take_spares, just started
        return {**self._describe(x), "widened": widened, "takes_over": takes_over}

    def _sb_for_new(self, slot: int) -> Superblock:
        sb = self.sb.copy()
        sb.member_uuid, sb.slot, sb.seq = Superblock.new_uuid(), slot, 0
        return sb

    def _describe(self, x: Member) -> dict[str, Any]:
        p = x.rebuild
        return {"path": x.path, "state": x.state, "slot": x.slot,
                "kind": None if p is None else ("full" if p.full else "resync"),
                "total_bytes": None if p is None else p.total_bytes,
                "left_bytes": None if p is None else p.total_bytes - p.done_bytes,
                "members_expected": self.sb.members_expected}

    async def rebuild_all(self, max_rate: int | None = None) -> list[dict[str, Any]]:
        """Resilver every member that needs it (`raid1fs rebuild`): resume
        stopped rebuilds and take up stale members. Failed members are not
        touched: re-add them with `add`."""
        if max_rate is not None:
            self.throttle.set(max_rate)
        if self.readonly:
            raise Raid1fsError("the volume is mounted read-only")
        out = []
        async with self._admin_lock:
            self._refuse_if_stopping("rebuild")  # the unmount may have begun meanwhile
            for x in list(self.members):
                entry = self.sb.roster_entry(x.uuid)
                replaced = any(y.rebuild is not None and y.rebuild.replaces == x.uuid
                               for y in self.members)
                if x.state == m.STALE and entry is not None and not replaced:
                    if self._filled() >= self.sb.members_expected:
                        # Its place was taken (a spare): resyncing it would
                        # make a third copy the volume does not count.
                        n = self.sb.members_expected
                        out.append({"path": x.path, "note": (
                            f"not resynced: the volume already has its {n} members; remove "
                            "it, or add it to make the mirror wider")})
                        continue
                    pending, full = self._resync_set(x, entry)
                    await self._begin_rebuild(x, entry, pending, full)
                    out.append(dict(self._describe(x), action="started"))
                elif x.state == m.REBUILDING and x.rebuild is not None:
                    action = "running" if x.rebuild.running else "resumed"
                    self._spawn_rebuild(x)
                    out.append(dict(self._describe(x), action=action))
        return out

    def set_rebuild_rate(self, rate: int | None) -> None:
        self.throttle.set(rate)

    # ----- reporting --------------------------------------------------------

    def _absent(self, slot: int, path: str, state: str, reason: str | None) -> dict[str, Any]:
        """The status entry of a slot whose member is not here."""
        return {
            "path": path, "uuid": self.sb.roster[slot].uuid, "slot": slot, "state": state,
            "events": None, "errors": {"read": 0, "write": 0, "checksum": 0}, "reads": 0,
            "writes": 0, "rebuild": None, "last_rebuild": None,
            "data_offset": self.sb.data_offset, "latency_ms": None, "fail_reason": reason,
        }

    def _rebuild_status(self, x: Member) -> dict[str, Any] | None:
        if x.state != m.REBUILDING:
            return None
        if x.rebuild is not None:
            st = x.rebuild.as_status()
            if x.rebuild.replaces:  # the path of the member it replaces
                old = next((y for y in self.members if y.uuid == x.rebuild.replaces), None)
                entry = self.sb.roster_entry(x.rebuild.replaces)
                st["replaces"] = old.path if old else entry.path if entry else None
            return st
        # Offline: only the checkpoint in the metadata is known.
        entry = self.sb.roster_entry(x.uuid)
        pos = entry.rebuild_pos if entry is not None else 0
        full = bool(entry and entry.rebuild_full)
        return {"done_bytes": pos if full else 0, "total_bytes": self.size if full else None,
                "rate_bytes_per_s": 0, "eta_s": None, "kind": "full" if full else "resync",
                "running": False, "error": None, "checkpoint_bytes": pos}

    def status(self) -> dict[str, Any]:
        members: list[dict[str, Any]] = []
        for x in self.members:
            s = x.stats
            members.append({
                "path": x.path, "uuid": x.uuid, "slot": x.slot, "state": x.state,
                "events": x.sb.events,
                "errors": {"read": s.read_errors, "write": s.write_errors,
                           "checksum": s.checksum_errors},
                "reads": s.reads, "writes": s.writes, "rebuild": self._rebuild_status(x),
                "last_rebuild": x.last_rebuild,
                "data_offset": x.data_offset,
                "latency_ms": round(s.latency * 1000, 3),
                "fail_reason": x.fail_reason or None,
            })
        for slot, hint in self.missing:
            members.append(self._absent(slot, hint, m.MISSING, None))
        present = {x.uuid for x in self.members} | {self.sb.roster[i].uuid for i, _ in self.missing}
        for slot, e in enumerate(self.sb.roster):
            if e.state in ABSENT_STATES and e.uuid not in present:
                # Away earlier and not brought here: still owed a resync.
                members.append(self._absent(
                    slot, e.path, m.FAILED if e.state == FAILED else m.MISSING,
                    f"{e.state} earlier; not among the members given"))
            elif e.state == SPARE and e.uuid not in present:
                # Holds no data the volume needs (zpool: an unavailable
                # spare leaves the pool healthy), but cannot take over.
                members.append(dict(self._absent(
                    slot, e.path, m.MISSING,
                    "a spare, not among the members given: it cannot take over"), spare=True))
        members.sort(key=lambda d: d["slot"])
        return {
            "volume": {
                "uuid": self.sb.volume_uuid, "name": self.sb.name, "kind": self.sb.kind,
                "state": self.state, "members_expected": self.sb.members_expected,
                "mounted": self.mounted, "size": self.size, "events": self.sb.events,
                # Room for per-block checksums is reserved at create (unless
                # --no-checksums); nothing writes or checks them yet.
                "checksums": False, "checksum_area": self.sb.checksums,
                "readonly": self.readonly,
                "io_timeout": self.io_timeout, "max_rebuild_rate": self.throttle.rate,
                "regions": {"region_bytes": self.regions.region,
                            "intent_bytes": self.regions.bytes_of(self.regions.intent),
                            "missed_bytes": self.regions.bytes_of(self.regions.missed),
                            "suspect_bytes": self.regions.bytes_of(self.regions.suspect)},
            },
            "members": members,
        }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
