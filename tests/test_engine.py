"""Unit tests of the engine without FUSE: read policy, range lock, sizes."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio
import trio.testing
from test_superblock import make_sb

from raid1fs.errors import UsageError
from raid1fs.member import Member
from raid1fs.sizes import parse_size
from raid1fs.volume import RangeLock, read_balance


def member(slot: int, errors: float = 0, latency: float = 0.001, inflight: int = 0) -> Member:
    sb = make_sb()
    sb.slot = slot
    x = Member(f"/m{slot}", -1, sb, 30.0, "online")
    x.stats.recent_errors = errors
    x.stats.latency = latency
    x.stats.last_read_at = time.monotonic()
    x.stats.inflight = inflight
    return x


def test_read_balance_prefers_fewer_errors_then_latency_then_load():
    a, b, c = member(0, errors=2), member(1), member(2, latency=0.050)
    assert read_balance([a, b, c], 0) == [b, c, a]  # errors first, then the slow one
    d, e = member(0, inflight=3), member(1, inflight=0)
    assert read_balance([d, e], 0)[0] is e  # concurrent reads spread
    f, g = member(0), member(1)
    g.stats.next_offset = 1 << 30
    assert read_balance([f, g], (1 << 30) + 4096)[0] is g  # a stream stays where it is
    g.stats.inflight = 2
    assert read_balance([f, g], (1 << 30) + 4096)[0] is g  # ...even with readahead in flight
    assert read_balance([f, g], 0)[0] is f  # an unrelated read goes to the idle one


def test_slow_member_is_tried_again_later():
    a, b = member(0, latency=0.050), member(1)
    assert read_balance([a, b], 0)[0] is b
    a.stats.last_read_at -= 120  # unused for two minutes
    assert read_balance([a, b], 0)[0] is a


def test_recent_errors_decay():
    a = member(0)
    a.stats.note_error()
    a.stats.recent_errors_at -= 600  # ten minutes ago
    assert a.stats.error_score() < 0.01


def test_range_lock_serialises_overlaps_only():
    """Overlapping ranges wait for each other; disjoint ones do not."""
    order: list[str] = []
    trio.run(_range_lock_scenario, order, clock=trio.testing.MockClock(autojump_threshold=0))
    assert order.index("c+") < order.index("a-") < order.index("b+")


async def _range_lock_scenario(order: list[str]) -> None:
    lock = RangeLock()

    async def hold(name: str, start: int, end: int, delay: float) -> None:
        entry = await lock.acquire(start, end)
        order.append(name + "+")
        await trio.sleep(delay)
        order.append(name + "-")
        lock.release(entry)

    async with trio.open_nursery() as n:
        n.start_soon(hold, "a", 0, 100, 1.0)
        await trio.sleep(0.1)
        n.start_soon(hold, "b", 50, 150, 0.1)   # overlaps a: waits
        n.start_soon(hold, "c", 100, 200, 0.1)  # does not overlap a
        await trio.sleep(0.01)


@pytest.mark.parametrize("text,value", [("4096", 4096), ("8G", 8 << 30), ("1.5M", 3 << 19),
                                        ("512k", 512 << 10), ("100M/s", 100 << 20)])
def test_parse_size(text, value):
    assert parse_size(text, rate=text.endswith("/s")) == value


@pytest.mark.parametrize("text", ["", "12Q", "-1", "0", "G", "1.5", "0.3K", "100M/s"])
def test_parse_size_rejects(text):
    """Malformed, not positive, not whole bytes, and a rate where a size is asked."""
    with pytest.raises(UsageError):
        parse_size(text)


def test_concurrent_writes_failing_on_one_member_fail_it_once(tmp_path):
    """Sixteen writes in flight at once all fail on member A: A is failed
    once (one member-failed event, one event-counter bump), every write
    succeeds, and B holds the data."""
    import os

    from raid1fs.assemble import assemble, close_all, read_members
    from raid1fs.create import create_disk
    from raid1fs.volume import Volume

    paths = [str(tmp_path / "a.img"), str(tmp_path / "b.img")]
    create_disk(paths, "t", 4 << 20, True, False)
    found = read_members(paths)
    vol = Volume(assemble(found))
    a, b = vol.members
    good_fd = a.fd

    async def scenario() -> None:
        await vol.start()
        a.fd = os.open(paths[0], os.O_RDONLY)  # every write on A now fails (EBADF)
        events_before = vol.sb.events
        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(vol.write, i * 4096, bytes([i]) * 4096)
        assert vol.sb.events == events_before + 1
        a.fd = good_fd  # let shutdown reach A's superblock path untouched
        await vol.shutdown()

    try:
        trio.run(scenario)
        assert [e for e, _ in vol.events.history].count("member-failed") == 1
        assert a.state == "failed" and b.state == "online"
        with open(paths[1], "rb") as f:
            for i in range(16):
                f.seek(b.data_offset + i * 4096)
                assert f.read(4096) == bytes([i]) * 4096
    finally:
        close_all(found)


def test_write_waits_for_a_failure_commit_in_progress(tmp_path, monkeypatch):
    """Write 1 fails on member A; while A's failure is being written to B's
    metadata, write 2 goes to B alone. Write 2 must not return before that
    metadata is durable: a crash in between would bring A back as in sync
    without write 2's data."""
    import os
    import time as _time

    import raid1fs.volume as volume_mod
    from raid1fs.assemble import assemble, close_all, read_members
    from raid1fs.create import create_disk
    from raid1fs.superblock import write_superblock
    from raid1fs.volume import Volume

    paths = [str(tmp_path / "a.img"), str(tmp_path / "b.img")]
    create_disk(paths, "t", 4 << 20, True, False)
    found = read_members(paths)
    vol = Volume(assemble(found))
    a = vol.members[0]
    order: list[str] = []

    def slow_write_superblock(fd, sb):
        _time.sleep(0.3)
        write_superblock(fd, sb)
        order.append(f"metadata events={sb.events}")

    async def scenario() -> None:
        await vol.start()
        good_fd = a.fd
        a.fd = os.open(paths[0], os.O_RDONLY)  # writes on A fail (EBADF)
        monkeypatch.setattr(volume_mod, "write_superblock", slow_write_superblock)

        async def write2() -> None:
            await trio.sleep(0.1)  # A is failed in memory, its commit under way
            await vol.write(8192, b"2" * 4096)
            order.append("write 2 returned")

        async with trio.open_nursery() as n:
            n.start_soon(vol.write, 0, b"1" * 4096)
            n.start_soon(write2)
        a.fd = good_fd
        monkeypatch.undo()
        await vol.shutdown()

    try:
        trio.run(scenario)
        # A's failure was durable on B before write 2 returned
        assert order[0].startswith("metadata") and "write 2 returned" in order, order
    finally:
        close_all(found)


def test_io_batches_wake_once_and_survive_a_hung_call():
    """Calls on two members' threads run at once; a call that outlives the
    timeout is reported unfinished, and its late completion wakes nobody:
    its eventfd is reused only after that completion, drained."""
    from raid1fs import iobatch

    a, b = iobatch.Workers("a"), iobatch.Workers("b")
    release = threading.Event()

    async def main() -> None:
        t0 = time.monotonic()
        res, errs, fin = await iobatch.run_batch(
            [(a, time.sleep, (0.2,)), (b, time.sleep, (0.2,))], 5)
        assert fin == [True, True] and errs == [None, None]
        assert time.monotonic() - t0 < 0.35  # together, not one after another
        res, errs, fin = await iobatch.run_batch(
            [(a, lambda: 1 // 0, ()), (b, lambda: 7, ())], 5)
        assert isinstance(errs[0], ZeroDivisionError) and res[1] == 7
        res, errs, fin = await iobatch.run_batch(
            [(a, release.wait, ()), (b, lambda: 7, ())], 0.1)
        assert fin == [False, True] and res[1] == 7
        hung = iobatch._abandoned[-1][0]
        assert not hung.signalled
        # Still running on a's worker only, where it may land.
        assert iobatch.given_up_running({a}) and not iobatch.given_up_running({b})
        # Later batches must not be woken by the hung call's completion.
        for _ in range(5):
            res, _, fin = await iobatch.run_batch([(b, lambda: 8, ())], 5)
            assert fin == [True] and res == [8]
            assert hung.fd not in iobatch._free
        release.set()
        while not hung.signalled:
            await trio.sleep(0.01)
        res, _, fin = await iobatch.run_batch([(b, time.sleep, (0.05,))], 5)
        assert fin == [True]  # (woken by its own completion, not the old one)
        assert hung not in [e[0] for e in iobatch._abandoned] and hung.fd in iobatch._free
        assert not iobatch.given_up_running({a, b})

    trio.run(main)


def test_quick_batches_hold_the_loop_only_briefly():
    """A quick batch is waited for on the loop thread for at most `quick`
    seconds: a fast call returns at once without trio's wake-up, a slow one
    falls back to the usual wait (and still times out), and a member with a
    call in flight (a hung one) never holds up the loop at all."""
    from raid1fs import iobatch

    a, b = iobatch.Workers("qa"), iobatch.Workers("qb")
    release = threading.Event()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await trio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0.01)
            res, errs, fin = await iobatch.run_batch(
                [(a, lambda: 1, ()), (b, lambda: 2, ())], 5, quick=0.05)
            assert res == [1, 2] and fin == [True, True] and errs == [None, None]
            res, errs, fin = await iobatch.run_batch(
                [(a, lambda: 1 // 0, ()), (b, lambda: 2, ())], 5, quick=0.05)
            assert isinstance(errs[0], ZeroDivisionError) and fin == [True, True]
            # Slower than `quick`: the loop is held 20 ms at most, not 300.
            gaps.clear()
            res, errs, fin = await iobatch.run_batch(
                [(a, time.sleep, (0.3,)), (b, lambda: 2, ())], 5, quick=0.02)
            assert fin == [True, True] and res[1] == 2
            assert max(gaps) < 0.15, max(gaps)
            # Hung past the timeout: unfinished, as without `quick`.
            res, errs, fin = await iobatch.run_batch(
                [(a, release.wait, ()), (b, lambda: 2, ())], 0.2, quick=0.02)
            assert fin == [False, True]
            hung = iobatch._abandoned[-1][0]
            # With a call on a still hanging, quick batches on a take the
            # usual path: a slow call does not hold up the loop.
            gaps.clear()
            res, errs, fin = await iobatch.run_batch(
                [(a, time.sleep, (0.3,)), (b, lambda: 2, ())], 5, quick=1.0)
            assert fin == [True, True]
            assert max(gaps) < 0.15, max(gaps)
            release.set()
            while not hung.signalled:
                await trio.sleep(0.01)
            res, errs, fin = await iobatch.run_batch(
                [(a, lambda: 3, ()), (b, lambda: 4, ())], 5, quick=0.05)
            assert res == [3, 4] and fin == [True, True]
            # Called while an exception is being handled, a slow quick batch
            # is not taken for one that raised (its eventfd pooled twice).
            abandoned = len(iobatch._abandoned)
            try:
                raise ValueError("handled")
            except ValueError:
                res, errs, fin = await iobatch.run_batch(
                    [(a, time.sleep, (0.1,)), (b, lambda: 2, ())], 5, quick=0.01)
            assert fin == [True, True]
            assert len(iobatch._abandoned) == abandoned
            assert len(iobatch._free) == len(set(iobatch._free))
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_batch_woken_before_it_is_marked_signalled_is_not_abandoned(monkeypatch):
    """The last worker writes the eventfd, then marks the batch signalled:
    a waiter woken in between (a worker preempted there, as under load in
    CI) must still take its batch for finished, not abandoned."""
    from raid1fs import iobatch

    real = os.eventfd_write

    def slow_write(fd: int, value: int) -> None:
        real(fd, value)
        time.sleep(0.05)  # preempted between the write and `signalled`

    monkeypatch.setattr(os, "eventfd_write", slow_write)
    w = iobatch.Workers("slow")

    async def main() -> None:
        before = len(iobatch._abandoned)
        res, errs, fin = await iobatch.run_batch([(w, lambda: 5, ())], 5)
        assert res == [5] and fin == [True]
        assert len(iobatch._abandoned) == before
        assert len(iobatch._free) == len(set(iobatch._free))

    trio.run(main)


def test_io_threads_grow_only_when_calls_would_queue():
    from raid1fs import iobatch

    w = iobatch.Workers("w", threads=3)

    async def main() -> None:
        for _ in range(20):  # one call at a time: one thread does them all
            await iobatch.run_batch([(w, lambda: None, ())], 5)
        assert len(w.threads) == 1
        gate = threading.Event()
        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(iobatch.run_batch, [(w, gate.wait, ())], 5)
            await trio.sleep(0.1)
            assert len(w.threads) == 3 and w.busy == 5
            gate.set()
        assert w.busy == 0

    trio.run(main)


def _run(scenario, found, hang: threading.Event | None = None) -> None:
    """trio.run(scenario), the members of `found` closed whatever happens
    (and `hang`, the event a simulated hung call waits for, set first)."""
    from raid1fs.assemble import close_all

    try:
        trio.run(scenario)
    finally:
        if hang is not None:
            hang.set()
        close_all(found)


def _engine_volume(tmp_path, n: int = 2, **kw):
    from raid1fs.assemble import assemble, read_members
    from raid1fs.create import create_disk
    from raid1fs.volume import Volume

    paths = [str(tmp_path / f"m{i}.img") for i in range(n)]
    if not os.path.exists(paths[0]):
        create_disk(paths, "t", 8 << 20, True, False)
    found = read_members(paths)
    return Volume(assemble(found), **kw), found


def test_a_checkpoint_records_only_what_its_fdatasync_covered(tmp_path, monkeypatch):
    """Rule 15: a rebuild checkpoint names only data made durable first.
    While the checkpoint's fdatasync runs, the rebuild copies on: the
    position recorded is the one from before the fdatasync, not the one
    reached when the metadata is written."""
    import os

    from raid1fs.bitmap import Bitmap

    vol, found = _engine_volume(tmp_path)
    b = vol.members[1]
    real_fdatasync = os.fdatasync

    async def scenario() -> None:
        await vol.start()
        rl = vol.regions
        entry = vol.sb.roster_entry(b.uuid)
        vol._set_rebuilding(b, entry, Bitmap.full(rl.nregions, rl.nbytes), full=True)
        b.rebuild.pending.clear_range(0, 2)  # two regions copied: position 2 regions

        def fdatasync_while_copying(fd: int) -> None:
            b.rebuild.pending.clear_range(2, 5)  # copied during the sync: not covered
            real_fdatasync(fd)
        monkeypatch.setattr(os, "fdatasync", fdatasync_while_copying)
        await vol._checkpoint()
        monkeypatch.undo()
        assert vol.sb.roster_entry(b.uuid).rebuild_pos == 2 * rl.region

    _run(scenario, found)


def test_a_failed_member_whose_io_still_hangs_is_not_re_added(tmp_path):
    """Re-adding a failed member while a write to it still hangs would let
    that write land after the resync copied its region: refused, with a
    one-line reason naming it, until the I/O ends."""
    from raid1fs.errors import Raid1fsError

    vol, found = _engine_volume(tmp_path)
    a = vol.members[0]

    async def scenario() -> None:
        await vol.start()
        await vol.fail(a.path)
        a.workers.busy += 1  # a call from before the failure, still hung
        try:
            with pytest.raises(Raid1fsError, match="still hangs") as e:
                await vol.add(a.path)
            assert str(e.value).startswith(a.path)
        finally:
            a.workers.busy -= 1
        assert (await vol.add(a.path))["state"] == "rebuilding"
        await vol.shutdown()

    _run(scenario, found)


def test_a_new_rebuild_clears_the_last_ones_summary(tmp_path):
    """members[].last_rebuild is the last rebuild finished: once another
    starts it is cleared, so `rebuild --wait` never reports an old "done"
    beside the new rebuild's failure."""
    from raid1fs.bitmap import Bitmap

    vol, found = _engine_volume(tmp_path)
    b = vol.members[1]

    async def scenario() -> None:
        await vol.start()
        b.last_rebuild = {"kind": "resync", "copied_bytes": 1 << 20, "seconds": 0.1,
                          "finished": 0.0}
        rl = vol.regions
        vol._set_rebuilding(b, vol.sb.roster_entry(b.uuid), Bitmap.full(rl.nregions, rl.nbytes),
                            full=True)
        assert b.last_rebuild is None
        st = {m["path"]: m for m in vol.status()["members"]}
        assert st[b.path]["last_rebuild"] is None and st[b.path]["rebuild"] is not None

    _run(scenario, found)


def test_an_add_of_a_member_being_removed_waits_for_the_removal(tmp_path, monkeypatch):
    """`remove` tells the leaving member so (its metadata write) and then
    lets go of it; an `add` of the same path meanwhile waits for that and
    then adds it back, instead of finding it still locked by this very mount
    ("in use by another raid1fs process")."""
    from raid1fs import volume as vmod

    vol, found = _engine_volume(tmp_path, 3)
    a = vol.members[0]
    real_write_superblock = vmod.write_superblock
    telling = threading.Event()
    go_on = threading.Event()

    def slow_for_a(fd: int, sb, base: int = 0) -> None:
        if fd == a.fd and not go_on.is_set():
            telling.set()
            go_on.wait(10)
        real_write_superblock(fd, sb, base)

    async def scenario() -> None:
        await vol.start()
        await vol.fail(a.path)
        monkeypatch.setattr(vmod, "write_superblock", slow_for_a)
        added: list[dict] = []
        async with trio.open_nursery() as n:
            n.start_soon(vol.remove, a.path)
            await trio.to_thread.run_sync(telling.wait, 10)

            async def add() -> None:
                added.append(await vol.add(a.path))
            n.start_soon(add)
            await trio.sleep(0.2)
            assert not added  # still waiting for the removal
            go_on.set()
        assert added[0]["state"] == "rebuilding"
        assert a.path in [x.path for x in vol.members]
        await vol.shutdown()

    _run(scenario, found)


def test_calls_given_up_on_a_hung_path_do_not_starve_later_ones(tmp_path):
    """Lookups of a hung path are given up after the I/O timeout but their
    threads stay stuck; however many there are, a later call on a healthy
    path still runs (no shared pool of threads runs dry)."""
    from raid1fs.volume import GivenUp

    vol, found = _engine_volume(tmp_path)
    vol.io_timeout = 0.05
    hang = threading.Event()

    async def scenario() -> None:
        for _ in range(45):  # more than trio's default thread limit (40)
            with pytest.raises(GivenUp):
                await vol._bounded("/hung", hang.wait)
        assert await vol._bounded("/fine", lambda: 7) == 7

    _run(scenario, found, hang)


def _eio_on(fds, real):
    """`real` (a member I/O function taking the fd first), failing with EIO
    on the members whose fds are in `fds`."""
    import errno

    def call(fd, *args):
        if fd in fds:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, *args)
    return call


def _rebuilding_third(vol):
    """Make the third member rebuilding, holding region 0 already."""
    from raid1fs.bitmap import Bitmap

    c = vol.members[2]
    rl = vol.regions
    vol._set_rebuilding(c, vol.sb.roster_entry(c.uuid), Bitmap.full(rl.nregions, rl.nbytes),
                        full=True)
    c.rebuild.pending.clear_range(0, 1)
    return c


def test_a_commit_that_reaches_no_in_sync_member_fails_nobody(tmp_path, monkeypatch):
    """Rule 4: a metadata write that fails on every in-sync member (say, the
    disk under both hiccups) is written nowhere, not to a rebuilding member
    alone, and fails nobody; the caller gets an error. Written to the
    rebuilding member alone, it failed both in-sync members and left a
    volume no mount would accept."""

    from raid1fs import volume as vmod
    from raid1fs.errors import VolumeIOError
    from raid1fs.superblock import read_superblock

    vol, found = _engine_volume(tmp_path, 3)
    a, b, _ = vol.members

    async def scenario() -> None:
        await vol.start()
        c = _rebuilding_third(vol)
        await vol._commit()
        before = read_superblock(c.fd, c.path)[0].events
        monkeypatch.setattr(vmod, "write_superblock",
                            _eio_on({a.fd, b.fd}, vmod.write_superblock))
        with pytest.raises(VolumeIOError, match="every in-sync member"):
            await vol.set_attrs({"mode": 0o640})
        assert (a.state, b.state, c.state) == ("online", "online", "rebuilding")
        assert read_superblock(c.fd, c.path)[0].events == before
        # Its number is taken back: written nowhere, it must not open a gap
        # that makes an in-sync member look like an older copy of itself.
        assert vol.sb.events == before
        # ... and so is the change: the caller was told it failed, so no
        # later commit may record it.
        assert "mode" not in vol.sb.attrs
        monkeypatch.undo()
        await vol._commit()
        assert "mode" not in read_superblock(a.fd, a.path)[0].attrs
        await vol.set_attrs({"mode": 0o640})  # the disk is back: it goes through
        assert vol.state == "rebuilding"
        got = [read_superblock(x.fd, x.path)[0] for x in (a, b, c)]
        assert [(g.events, g.attrs.get("mode")) for g in got] == [(before + 2, 0o640)] * 3

    _run(scenario, found)


def test_a_write_does_not_return_before_the_failure_it_relies_on_is_durable(tmp_path,
                                                                            monkeypatch):
    """b fails a write; the commit that records it fails on a (the only
    other in-sync member): that write gets an error. The next write, which
    reaches a alone, must not return success until b's failure is in a's
    metadata (else a crash brings b back as in sync, without that write)."""

    from raid1fs import volume as vmod
    from raid1fs.errors import VolumeIOError
    from raid1fs.superblock import read_superblock

    vol, found = _engine_volume(tmp_path, 2)
    a, b = vol.members
    real_sb = vmod.write_superblock

    async def scenario() -> None:
        await vol.start()
        monkeypatch.setattr(vmod, "pwrite_full", _eio_on({b.fd}, vmod.pwrite_full))
        monkeypatch.setattr(vmod, "write_superblock", _eio_on({a.fd, b.fd}, real_sb))
        with pytest.raises(VolumeIOError):
            await vol.write(0, b"x" * 4096)
        assert b.state == "failed"  # in memory only: a's metadata write failed
        with pytest.raises(VolumeIOError):
            await vol.write(8192, b"y" * 4096)  # still not durable: no success
        monkeypatch.setattr(vmod, "write_superblock", real_sb)
        assert await vol.write(8192, b"y" * 4096) == 4096
        sb = read_superblock(a.fd, a.path)[0]
        assert sb.roster_entry(b.uuid).state == "failed"
        monkeypatch.undo()

    _run(scenario, found)


def test_a_write_failed_by_every_in_sync_member_is_copied_again_to_a_rebuilding_one(
        tmp_path, monkeypatch):
    """A write that fails on every in-sync member (the caller gets an error,
    they keep the old data) but reaches a rebuilding member in a region it
    already holds: that region is pending again, so the member serves no
    read there and the rebuild copies it from the in-sync ones."""

    from raid1fs import volume as vmod
    from raid1fs.errors import VolumeIOError

    vol, found = _engine_volume(tmp_path, 3)
    a, b, _ = vol.members

    async def scenario() -> None:
        await vol.start()
        c = _rebuilding_third(vol)
        assert c in vol.readers(0, 4096)
        monkeypatch.setattr(vmod, "pwrite_full", _eio_on({a.fd, b.fd}, vmod.pwrite_full))
        with pytest.raises(VolumeIOError):
            await vol.write(0, b"X" * 65536)
        monkeypatch.undo()
        assert (a.state, b.state) == ("online", "online")
        assert c.rebuild.pending.test(0) and c not in vol.readers(0, 4096)

    _run(scenario, found)


def test_fail_of_a_hung_path_says_nothing_was_done(tmp_path, monkeypatch):
    """fail/remove/replace look a path up (another name of a member?) under
    the I/O timeout; when it does not answer the one-line error says
    nothing was done (not "not added": that is add's)."""
    from raid1fs.volume import GivenUp

    vol, found = _engine_volume(tmp_path)
    vol.io_timeout = 0.05
    hang = threading.Event()
    monkeypatch.setattr(vol, "_member_at", lambda *a: hang.wait())

    async def scenario() -> None:
        await vol.start()
        with pytest.raises(GivenUp) as e:
            await vol.fail(str(tmp_path / "elsewhere" / "m0.img"))
        assert str(e.value).endswith("I/O timeout; nothing done"), str(e.value)

    _run(scenario, found, hang)


def _late_write_on_every_member(vol, monkeypatch):
    """A scenario step: both in-sync members time out on a write at 0 (the
    caller gets EIO, nobody is failed); the calls given up on end 0.8 s in,
    landing on a and failing on b, so the members differ there."""
    import errno

    from raid1fs import volume as vmod
    from raid1fs.errors import VolumeIOError

    a, b = vol.members
    real = vmod.pwrite_full

    def late(fd, data, off, sync):
        time.sleep(0.8)  # past the I/O timeout (0.3 s): given up on, then it ends
        if fd == b.fd:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, off, sync)

    async def step() -> None:
        await vol.write(0, b"H" * 4096)
        monkeypatch.setattr(vmod, "pwrite_full", late)
        with pytest.raises(VolumeIOError):
            await vol.write(0, b"T" * 4096)
        monkeypatch.undo()
        assert (a.state, b.state) == ("online", "online")
        assert vol.status()["volume"]["regions"]["suspect_bytes"] > 0
    return step


def _data_at_0(vol, found) -> list[bytes]:
    out = []
    for f in found:
        with open(f.path, "rb") as fh:
            fh.seek(vol.sb.data_offset)
            out.append(fh.read(4096))
    return out


def test_a_write_given_up_on_every_member_is_resynced_at_the_next_mount(tmp_path, monkeypatch):
    """The calls of a write given up on every in-sync member still running
    at the unmount (here: no background tasks, so no online resync): the
    region stays marked, the unmount leaves the volume unclean, and the
    next mount resyncs it from one member: the members end identical.
    (Found by audit: they stayed different, the volume clean.)"""
    from raid1fs.superblock import read_superblock

    vol, found = _engine_volume(tmp_path, io_timeout=0.3)
    late_write = _late_write_on_every_member(vol, monkeypatch)

    async def scenario() -> None:
        await vol.start()
        await late_write()
        await trio.sleep(1.0)  # a's write lands
        await vol.shutdown()

    _run(scenario, found)
    for f in found:
        with open(f.path, "rb") as fh:
            assert read_superblock(fh.fileno(), f.path)[0].clean is False, f.path
    vol, found = _engine_volume(tmp_path)

    async def remount() -> None:
        async with trio.open_nursery() as n:
            await vol.start(n)
            assert any(x.state == "rebuilding" for x in vol.members)
            while any(x.state == "rebuilding" for x in vol.members):
                await trio.sleep(0.05)
            await vol.shutdown()
            n.cancel_scope.cancel()

    _run(remount, found)
    data = _data_at_0(vol, found)
    assert data[0] == data[1], [d[:4] for d in data]


def test_a_write_given_up_on_every_member_is_resynced_once_its_calls_end(tmp_path,
                                                                        monkeypatch):
    """The same, mounted on: once the calls given up on have ended (none
    can land later), the mount resyncs the suspect region from one member
    by itself, the members end identical, and the unmount is clean."""
    from raid1fs.superblock import read_superblock

    vol, found = _engine_volume(tmp_path, io_timeout=0.3)
    late_write = _late_write_on_every_member(vol, monkeypatch)

    async def scenario() -> None:
        async with trio.open_nursery() as n:
            await vol.start(n)
            await late_write()
            deadline = trio.current_time() + 10
            while vol.regions.suspect or not any(x.last_rebuild for x in vol.members):
                assert trio.current_time() < deadline, vol.status()["members"]
                await trio.sleep(0.02)
            last = [x.last_rebuild for x in vol.members if x.last_rebuild]
            assert [x.state for x in vol.members] == ["online", "online"]
            assert len(last) == 1 and last[0]["kind"] == "resync", last  # not in full
            assert last[0]["copied_bytes"] == vol.regions.region, last
            assert vol.status()["volume"]["regions"]["suspect_bytes"] == 0
            await vol.shutdown()
            n.cancel_scope.cancel()

    _run(scenario, found)
    data = _data_at_0(vol, found)
    assert data[0] == data[1], [d[:4] for d in data]
    for f in found:
        with open(f.path, "rb") as fh:
            assert read_superblock(fh.fileno(), f.path)[0].clean is True, f.path


def test_a_call_hung_for_good_on_a_failed_member_does_not_hold_off_the_resync(
        tmp_path, monkeypatch):
    """c hangs for good and is failed; later a write is given up on both
    in-sync members (landing on a, failing on b). Once their calls have
    ended the suspect region is resynced, although c's call still hangs:
    it can land only on c, which is failed and owes a rebuild anyway."""
    import errno

    from raid1fs import volume as vmod
    from raid1fs.errors import VolumeIOError

    vol, found = _engine_volume(tmp_path, 3, io_timeout=0.3)
    a, b, c = vol.members
    real = vmod.pwrite_full
    hang = threading.Event()
    late = threading.Event()

    def pwrite(fd, data, off, sync):
        if fd == c.fd:
            hang.wait()  # until the test ends
        elif late.is_set():
            time.sleep(0.8)  # past the I/O timeout: given up on, then it ends
            if fd == b.fd:
                raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, off, sync)

    async def scenario() -> None:
        async with trio.open_nursery() as n:
            await vol.start(n)
            monkeypatch.setattr(vmod, "pwrite_full", pwrite)
            await vol.write(4 << 20, b"c" * 4096)  # c times out: failed
            assert (a.state, b.state, c.state) == ("online", "online", "failed")
            late.set()
            with pytest.raises(VolumeIOError):
                await vol.write(0, b"T" * 4096)
            late.clear()
            assert vol.regions.suspect
            with trio.fail_after(10):
                while vol.regions.suspect or not any(x.last_rebuild for x in (a, b)):
                    await trio.sleep(0.05)
            monkeypatch.undo()
            assert (a.state, b.state) == ("online", "online") and c.workers.busy
            assert os.pread(a.fd, 4096, a.data_offset) == os.pread(b.fd, 4096, b.data_offset)
            n.cancel_scope.cancel()

    _run(scenario, found, hang)


def test_a_remove_whose_commit_reaches_no_in_sync_member_changes_nothing(tmp_path, monkeypatch):
    """`remove` of a failed member while the metadata write fails on every
    in-sync member: the caller gets an error and the roster is as before
    (the member still named, the mirror as wide), so no later commit
    records a removal the operator was told failed; once the disks answer,
    the remove works."""
    from raid1fs import volume as vmod
    from raid1fs.errors import VolumeIOError
    from raid1fs.superblock import read_superblock

    vol, found = _engine_volume(tmp_path, 3)
    a, b, c = vol.members

    async def scenario() -> None:
        await vol.start()
        await vol.fail(c.path)
        width, removed = vol.sb.members_expected, list(vol.sb.removed)
        monkeypatch.setattr(vmod, "write_superblock",
                            _eio_on({a.fd, b.fd}, vmod.write_superblock))
        with pytest.raises(VolumeIOError, match="every in-sync member"):
            await vol.remove(c.path)
        monkeypatch.undo()
        entry = vol.sb.roster_entry(c.uuid)
        assert entry is not None and entry.state == "failed"
        assert (vol.sb.members_expected, vol.sb.removed) == (width, removed)
        assert c in vol.members
        await vol._commit()  # what a later commit writes
        on_a = read_superblock(a.fd, a.path)[0]
        assert on_a.roster_entry(c.uuid) is not None and c.uuid not in on_a.removed
        await vol.remove(c.path)
        assert vol.sb.roster_entry(c.uuid) is None and c.uuid in vol.sb.removed

    _run(scenario, found)


@pytest.mark.parametrize("n", [2, 3])
def test_fails_at_once_never_fail_the_last_in_sync_member(tmp_path, n):
    """`fail` of every member at the same moment: each is checked under the
    commit's lock, so exactly one member stays in sync, and every other
    `fail` either worked or was refused as the last in-sync member."""
    from raid1fs.errors import Raid1fsError

    vol, found = _engine_volume(tmp_path, n=n)
    refused: list[str] = []

    async def fail(path: str) -> None:
        try:
            await vol.fail(path)
        except Raid1fsError as e:
            refused.append(str(e))

    async def scenario() -> None:
        await vol.start()
        async with trio.open_nursery() as nursery:
            for x in vol.members:
                nursery.start_soon(fail, x.path)
        assert [x.state for x in vol.members].count("online") == 1
        assert len(refused) == 1 and "last in-sync member" in refused[0], refused
        await vol.shutdown()

    _run(scenario, found)


def test_two_replaces_of_one_member_at_once_start_one_rebuild(tmp_path):
    """Two `replace A` with different NEW at the same moment: one is begun,
    the other is refused as already being replaced (before, both were
    checked before either began, and the volume grew a member)."""
    from raid1fs.errors import Raid1fsError

    vol, found = _engine_volume(tmp_path)
    a = vol.members[0]
    outcomes: list[str] = []

    async def replace(new: str) -> None:
        try:
            await vol.replace(a.path, new)
            outcomes.append("begun")
        except Raid1fsError as e:
            outcomes.append(str(e))

    async def scenario() -> None:
        await vol.start()
        async with trio.open_nursery() as nursery:
            for name in ("c.img", "d.img"):
                nursery.start_soon(replace, str(tmp_path / name))
        assert sorted(outcomes) == sorted(["begun", f"{a.path}: already being replaced"])
        assert len(vol.members) == 3
        await vol.shutdown()

    _run(scenario, found)


def test_operator_actions_are_refused_once_the_unmount_has_begun(tmp_path):
    """Once shutdown has begun (the final commit written, members about to
    be let go), add, replace, remove, fail and rebuild are refused in one
    line, and add creates no image (before, add made and initialised one,
    then failed writing to members already closed)."""
    from raid1fs.errors import Raid1fsError

    vol, found = _engine_volume(tmp_path, n=3)
    a, b, _ = vol.members
    new = tmp_path / "new.img"

    async def scenario() -> None:
        await vol.start()
        await vol.shutdown()
        for action in (lambda: vol.add(str(new)), lambda: vol.replace(a.path, str(new)),
                       lambda: vol.remove(b.path), lambda: vol.fail(b.path),
                       vol.rebuild_all):
            with pytest.raises(Raid1fsError, match="being unmounted"):
                await action()
        assert not new.exists()
        assert [x.state for x in vol.members] == ["online"] * 3

    _run(scenario, found)


def _zero_image_read_slowly(tmp_path, monkeypatch, delay: float):
    """z.img, 48 MiB of written zeros (every byte is read for data), whose
    every read by raid1fs.create takes `delay` s; and an event set at its
    first read."""
    import types

    from raid1fs import create

    z = tmp_path / "z.img"
    with open(z, "wb") as f:
        f.write(bytes(48 << 20))
    reading = threading.Event()

    def slow_pread(fd: int, n: int, off: int) -> bytes:
        reading.set()
        time.sleep(delay)
        return os.pread(fd, n, off)

    slow_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os)
                                       if not k.startswith("__")})
    slow_os.pread = slow_pread
    monkeypatch.setattr(create, "os", slow_os)
    return z, reading


def test_add_reads_a_large_image_for_data_without_giving_up_on_it(tmp_path, monkeypatch):
    """`add` of an existing image reads all of it for data; each read is
    timed, not the whole scan: an image that takes longer than --io-timeout
    to read, but answers every read at once, is added (it used to be given
    up on as hung, "no answer within the I/O timeout")."""
    vol, found = _engine_volume(tmp_path, io_timeout=1.0)
    # 6 reads of 8 MiB: 1.5 s in all, each well in time.
    z, _ = _zero_image_read_slowly(tmp_path, monkeypatch, 0.25)

    async def scenario() -> None:
        await vol.start()
        assert (await vol.add(str(z)))["state"] == "rebuilding"
        await vol.shutdown()

    _run(scenario, found)


def test_a_rebuild_source_that_times_out_is_failed_and_the_copy_goes_on(tmp_path):
    """A rebuild copies a chunk; the first source it tries gives no answer
    in time: that source is failed (guarantee 4, as for a read), the chunk
    comes from the other, and the rebuild shows no error (it used to keep
    "cannot read ..." while copying on fine)."""
    from raid1fs.bitmap import Bitmap
    from raid1fs.errors import MemberTimeoutError

    vol, found = _engine_volume(tmp_path, n=3)
    a, b, c = vol.members

    async def hung(offset: int, length: int) -> bytes:
        raise MemberTimeoutError(a.path, "read", "no answer within the 30 s I/O timeout")

    async def scenario() -> None:
        await vol.start()
        rl = vol.regions
        vol._set_rebuilding(c, vol.sb.roster_entry(c.uuid), Bitmap.full(rl.nregions, rl.nbytes),
                            full=True)
        a.pread = hung  # type: ignore[method-assign]
        b.stats.latency, b.stats.last_read_at = 1.0, time.monotonic()  # a is tried first
        assert await vol._copy(c, 0, 1 << 20)
        assert a.state == "failed" and b.state == "online"
        assert not c.rebuild.error
        await vol.shutdown()

    _run(scenario, found)


def test_a_fail_that_cannot_be_recorded_says_it_took_effect_in_this_mount(tmp_path,
                                                                           monkeypatch):
    """`fail A` whose commit reaches no in-sync member (B's metadata writes
    fail): A stays failed in this mount (writes may have left it out
    already), and the error says so, instead of a bare "metadata write
    failed" that reads as if nothing happened."""
    from raid1fs import volume as vmod
    from raid1fs.errors import VolumeIOError

    vol, found = _engine_volume(tmp_path)
    a, b = vol.members

    async def scenario() -> None:
        await vol.start()
        monkeypatch.setattr(vmod, "write_superblock", _eio_on({b.fd}, vmod.write_superblock))
        with pytest.raises(VolumeIOError) as e:
            await vol.fail(a.path)
        assert str(e.value).startswith(f"{a.path}: failed in this mount, but that could not "
                                       "be recorded"), str(e.value)
        assert a.state == "failed" and b.state == "online"
        monkeypatch.undo()
        await vol.shutdown()

    _run(scenario, found)


def test_an_add_reading_a_large_image_holds_up_neither_the_unmount_nor_others(tmp_path,
                                                                               monkeypatch):
    """`add` of an existing image reads it whole for data before it takes
    the admin lock: an unmount that begins meanwhile goes ahead at once
    (it used to wait for the whole read, past the client's patience), and
    ends the add, which is refused as the volume is being unmounted (an
    answer the client still gets), leaving the image as it was."""
    from raid1fs.errors import Raid1fsError

    vol, found = _engine_volume(tmp_path)
    z, reading = _zero_image_read_slowly(tmp_path, monkeypatch, 0.2)
    before = z.read_bytes()
    order: list[str] = []

    async def add() -> None:
        with pytest.raises(Raid1fsError, match="being unmounted"):
            await vol.add(str(z))
        order.append("add refused")

    async def scenario() -> None:
        await vol.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(add)
            while not reading.is_set():
                await trio.sleep(0.01)
            await vol.shutdown()
            order.append("unmounted")
        assert sorted(order) == ["add refused", "unmounted"], order
        assert len(vol.members) == 2

    _run(scenario, found)
    assert z.read_bytes() == before


def _children() -> set[int]:
    """Pids whose parent is this process, dead (zombie) ones included."""
    me, out = os.getpid(), set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.add(int(name))
    return out


def test_a_probe_child_killed_on_a_hung_path_is_reaped(monkeypatch):
    """probe.hung kills the child still stuck on a path and does not leave it
    a zombie in a long-running process (`mount -f`)."""
    from raid1fs import probe
    monkeypatch.setattr(probe, "_touch", lambda path: time.sleep(60))
    before = _children()
    assert probe.hung(["/no/answer"], 0.3) == ["/no/answer"]
    deadline = time.monotonic() + 10
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children() - before, "the killed probe child was left behind"


def test_a_new_image_locked_by_a_racing_add_the_moment_it_is_made_still_joins(
        tmp_path, monkeypatch):
    """Two `add`s of one new path: the second may open and lock the image in
    the instant between the first creating and locking it (it finds it empty
    and lets go). The first waits for that instead of failing too, and ends
    with its image, sized and locked."""
    import fcntl

    from raid1fs import create
    path = str(tmp_path / "c.img")
    real_open = os.open
    raced = []

    def racing_open(p, flags, *args, **kw):
        fd = real_open(p, flags, *args, **kw)
        if p == path and flags & os.O_EXCL and not raced:
            other = real_open(p, os.O_RDWR)  # the other add, an open file of its own
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raced.append(other)
            threading.Timer(0.2, os.close, (other,)).start()
        return fd

    monkeypatch.setattr(os, "open", racing_open)
    nm = create.open_new_member(path, 64 << 20, "vol")
    monkeypatch.undo()
    try:
        assert raced and nm.created and os.fstat(nm.fd).st_size == 64 << 20
        probe = real_open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # it holds the lock now
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        os.close(nm.fd)


# ----- the region log's rules (docs/write-ordering.md 9-12), one by one ------

def _region_log(size: int = 1 << 30):
    from raid1fs.regions import RegionLog
    rl = RegionLog(make_sb(size))
    assert rl.group > 1 and rl.nregions > 2 * rl.group  # at least two groups
    return rl


def test_a_write_across_a_group_boundary_marks_both_groups():
    """Rule 9: every group a write touches gets its intent bits before the
    write, not only the group it starts in."""
    rl = _region_log()
    edge = rl.group * rl.region  # the first byte of the second group
    regions, need = rl.begin(edge - 4096, 8192, recording=False)
    assert need and list(regions) == [rl.group - 1, rl.group]
    assert rl.intent.test(rl.group - 1) and rl.intent.test(rl.group)
    assert rl.intent.test(0) and rl.intent.test(2 * rl.group - 1)  # whole groups
    assert not rl.intent.test(2 * rl.group)


def test_missed_bits_are_written_before_intent_bits():
    """Rule 12: the missed-writes bitmap goes out before the intent bitmap,
    so a cleared intent bit never reaches a member before the missed bit
    that replaces it."""
    rl = _region_log()
    rl.begin(0, 4096, recording=True)
    spans = rl.take_dirty()
    assert [off for off, _ in spans] == [rl.offset + rl.nbytes, rl.offset], spans
    assert spans[0][1][0] & 1 and spans[1][1][0] & 1  # region 0 set in both


def test_a_group_written_again_while_it_is_cleared_keeps_its_intent_bits():
    """Rule 10: a group found idle is cleared only if no write started in
    it since (one may have begun during the clearing fdatasync, and its data
    is not covered by it)."""
    rl = _region_log()
    regions, _ = rl.begin(0, 4096, recording=False)
    rl.end(regions, 0.0)
    idle = rl.idle_groups(100.0)
    assert idle == {0: 1}
    regions, _ = rl.begin(8192, 4096, recording=False)  # during the fdatasync
    rl.end(regions, 0.0)
    assert rl.clear_groups(idle) == 0 and rl.intent.test(0)
    idle = rl.idle_groups(100.0)
    assert rl.clear_groups(idle) == 1 and not rl.intent.test(0)


def test_a_read_timeout_on_the_last_in_sync_member_does_not_fail_it(tmp_path):
    """Rule 4 for reads: the last in-sync member whose read times out is
    kept (the caller gets EIO), not failed: failing it would leave the
    volume with no member at all."""
    from raid1fs.errors import MemberTimeoutError, VolumeIOError

    vol, found = _engine_volume(tmp_path)
    a, b = vol.members

    async def timed_out(offset, length):
        raise MemberTimeoutError(a.path, "read", "no answer within the I/O timeout")

    async def scenario() -> None:
        await vol.start()
        await vol.fail(b.path)
        a.pread = timed_out
        with pytest.raises(VolumeIOError):
            await vol.read(0, 4096)
        assert (a.state, vol.state) == ("online", "degraded")

    _run(scenario, found)


def _record_member_calls(vol, monkeypatch, calls: list) -> None:
    """Record, in order, the fsyncs and fdatasyncs of member fds and the
    superblock and bitmap writes (with the superblock's clean flag and
    intent bit 0), as ("fsync"|"fdatasync"|"sb"|"spans", fd, detail)."""
    from raid1fs import volume as vmod

    fds = {x.fd for x in vol.members}
    real = {n: getattr(os, n) for n in ("fsync", "fdatasync")}
    real_sb, real_spans = vmod.write_superblock, vmod.write_spans

    def syncer(name):
        def call(fd):
            if fd in fds:
                calls.append((name, fd, None))
            return real[name](fd)
        return call

    def sb(fd, sbk, *a, **kw):
        calls.append(("sb", fd, sbk.clean))
        return real_sb(fd, sbk, *a, **kw)

    def spans(fd, sp):
        intent = [data[0] & 1 for off, data in sp if off == vol.regions.offset]
        calls.append(("spans", fd, intent[0] if intent else None))
        return real_spans(fd, sp)

    for n in real:
        monkeypatch.setattr(os, n, syncer(n))
    monkeypatch.setattr(vmod, "write_superblock", sb)
    monkeypatch.setattr(vmod, "write_spans", spans)


def test_the_unmount_makes_data_durable_before_it_marks_members_clean(tmp_path, monkeypatch):
    """Rule 7's other half: a member is marked clean only after an fsync of
    it made every write durable; else a crash just after could leave it
    clean (no resync) without data the others have."""
    vol, found = _engine_volume(tmp_path)
    calls: list = []

    async def scenario() -> None:
        await vol.start()
        await vol.write(0, b"d" * 4096)
        _record_member_calls(vol, monkeypatch, calls)
        await vol.shutdown()
        monkeypatch.undo()

    _run(scenario, found)
    for x in vol.members:
        mine = [(kind, detail) for kind, fd, detail in calls if fd == x.fd]
        clean = mine.index(("sb", True))
        assert ("fsync", None) in mine[:clean], mine


def test_intent_bits_are_cleared_only_after_an_fdatasync_of_the_member(tmp_path, monkeypatch):
    """Rule 10: when a quiet group's intent bits are cleared, the bitmap
    write that clears them on a member comes after an fdatasync of that
    member made the group's writes durable."""
    from raid1fs import regions

    monkeypatch.setattr(regions, "INTENT_LINGER", 0.1)
    vol, found = _engine_volume(tmp_path)
    calls: list = []

    async def scenario() -> None:
        async with trio.open_nursery() as n:
            await vol.start(n)
            _record_member_calls(vol, monkeypatch, calls)
            await vol.write(0, b"d" * 4096)
            with trio.fail_after(10):
                while vol.regions.intent.test(0):
                    await trio.sleep(0.05)
            await trio.sleep(0.2)  # the clearing bitmap write reaches every member
            monkeypatch.undo()
            n.cancel_scope.cancel()

    _run(scenario, found)
    for x in vol.members:
        mine = [(kind, detail) for kind, fd, detail in calls if fd == x.fd]
        marked = mine.index(("spans", 1))
        cleared = mine.index(("spans", 0), marked)
        assert ("fdatasync", None) in mine[marked:cleared], mine


# ----- round two of the mutation audit: rebuild, heal, range lock, short I/O --

def test_a_rebuilding_member_serves_a_read_only_if_it_holds_every_region_of_it(tmp_path):
    """A read spanning a region the rebuilding member holds and one it does
    not yet hold goes to an in-sync member, wherever the read starts."""
    vol, found = _engine_volume(tmp_path, 3)

    async def scenario() -> None:
        await vol.start()
        c = _rebuilding_third(vol)  # holds region 0 only
        reg = vol.regions.region
        assert c in vol.readers(0, 4096)
        assert c not in vol.readers(0, 2 * reg)
        assert c not in vol.readers(reg - 4096, 8192)

    _run(scenario, found)


def test_a_region_handed_back_during_a_rebuild_is_copied_before_it_ends(tmp_path):
    """A region already copied and handed back (copy_again: a write that
    reached only the rebuilding member) while the pass goes on is copied in
    another pass; the rebuild ends only when nothing is pending."""
    from raid1fs.create import create_disk

    paths = [str(tmp_path / f"m{i}.img") for i in range(3)]
    create_disk(paths, "t", 32 << 20, True, False)  # four 8 MiB chunks
    vol, found = _engine_volume(tmp_path, 3)
    a = vol.members[0]
    real_copy = vol._copy
    handed_back = []

    async def copy(x, lo, hi):
        if hi == vol.size and not handed_back:  # the last chunk of the first pass
            handed_back.append(lo)
            x.rebuild.copy_again(0, 1)
        return await real_copy(x, lo, hi)

    async def scenario() -> None:
        async with trio.open_nursery() as n:
            await vol.start(n)
            c = _rebuilding_third(vol)
            c.rebuild.pending.set_range(0, 1)  # all of it, region 0 too
            os.pwrite(a.fd, b"A" * 4096, a.data_offset)  # region 0 on the source
            vol._copy = copy
            vol._spawn_rebuild(c)
            with trio.fail_after(20):
                await c.rebuild.finished.wait()
            assert handed_back and c.state == "online" and c.rebuild is None
            assert os.pread(c.fd, 4096, c.data_offset) == b"A" * 4096
            await vol.shutdown()
            n.cancel_scope.cancel()

    _run(scenario, found)


def test_a_member_failed_during_a_full_rebuild_is_rebuilt_in_full_when_re_added(tmp_path):
    """What a member lacks is unknown while its full rebuild runs: failed
    then, the roster keeps 'full', and re-added it is rebuilt in full, not
    resynced over the missed-writes bitmap."""
    vol, found = _engine_volume(tmp_path, 3)

    async def scenario() -> None:
        await vol.start()
        c = _rebuilding_third(vol)  # a full rebuild, region 0 copied
        await vol._commit()
        await vol.fail(c.path)
        assert c.state == "failed" and vol.sb.roster_entry(c.uuid).rebuild_full
        await vol._readd(c, False)
        assert c.rebuild.full and c.rebuild.pending.count() == vol.regions.nregions

    _run(scenario, found)


def test_a_rebuild_makes_the_member_durable_before_it_is_committed_in_sync(tmp_path,
                                                                         monkeypatch):
    """Rule 15's end: a rebuilt member is marked active only after an
    fdatasync of it, so a power cut cannot leave it in sync on paper with
    copied data lost."""
    from raid1fs import volume as vmod

    vol, found = _engine_volume(tmp_path, 3)
    calls: list = []
    real_sb, real_fdatasync = vmod.write_superblock, os.fdatasync

    async def scenario() -> None:
        async with trio.open_nursery() as n:
            await vol.start(n)
            c = _rebuilding_third(vol)

            def fdatasync(fd):
                if fd == c.fd:
                    calls.append("fdatasync")
                return real_fdatasync(fd)

            def sb(fd, s, *a, **kw):
                e = s.roster_entry(c.uuid)
                if fd == vol.members[0].fd and e is not None:
                    calls.append(e.state)
                return real_sb(fd, s, *a, **kw)

            monkeypatch.setattr(os, "fdatasync", fdatasync)
            monkeypatch.setattr(vmod, "write_superblock", sb)
            vol._spawn_rebuild(c)
            with trio.fail_after(20):
                await c.rebuild.finished.wait()
            monkeypatch.undo()
            assert c.state == "online"
            await vol.shutdown()
            n.cancel_scope.cancel()

    _run(scenario, found)
    active = calls.index("active")
    assert "fdatasync" in calls[:active], calls


def _heal_scenario(tmp_path, monkeypatch, rewrite_fails: bool):
    """X written at 0; a's copy there is then garbage and its first read
    there fails (EIO); b is made the second choice for reads."""
    import errno

    from raid1fs import member as mmod
    from raid1fs import volume as vmod

    vol, found = _engine_volume(tmp_path)
    a, b = vol.members
    data = os.urandom(8192)
    real_pread, real_pwrite = mmod.pread_full, vmod.pwrite_full
    failed_once = []

    def pread(fd, length, offset):
        if fd == a.fd and not failed_once:
            failed_once.append(offset)
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, length, offset)

    def pwrite(fd, d, offset, sync):
        if fd == a.fd:
            raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, d, offset, sync)

    async def scenario() -> None:
        await vol.start()
        await vol.write(0, data)
        os.pwrite(a.fd, b"\xee" * 8192, a.data_offset)
        b.stats.recent_errors = 5  # a is tried first
        monkeypatch.setattr(mmod, "pread_full", pread)
        if rewrite_fails:
            monkeypatch.setattr(vmod, "pwrite_full", pwrite)
        assert await vol.read(0, 8192) == data
        monkeypatch.undo()
        assert failed_once

    _run(scenario, found)
    return vol, a, data


def test_a_read_error_is_healed_from_the_good_copy(tmp_path, monkeypatch):
    """Rule 5: a read that fails on a is served by b, and a's copy there is
    rewritten from b's; a stays in sync."""
    vol, a, data = _heal_scenario(tmp_path, monkeypatch, rewrite_fails=False)
    with open(a.path, "rb") as f:
        f.seek(vol.sb.data_offset)
        assert f.read(8192) == data
    assert a.state == "online"


def test_a_member_whose_healing_rewrite_fails_is_failed(tmp_path, monkeypatch):
    """Rule 5 and 3: when rewriting the bad copy fails too, that member is
    failed, durably (the survivor's metadata says so)."""
    from raid1fs.superblock import read_superblock

    vol, a, _ = _heal_scenario(tmp_path, monkeypatch, rewrite_fails=True)
    assert a.state == "failed"
    b = vol.members[1]
    with open(b.path, "rb") as f:
        assert read_superblock(f.fileno(), b.path)[0].roster_entry(a.uuid).state == "failed"


def test_range_lock_makes_a_range_that_covers_or_ends_in_a_held_one_wait():
    """Overlap in every shape: ranges starting before a held one and ending
    inside it or beyond it wait for it; one starting at its end does not."""
    order: list[tuple[int, int]] = []

    async def scenario() -> None:
        lock = RangeLock()
        held = await lock.acquire(50, 150)

        async def take(s: int, e: int) -> None:
            entry = await lock.acquire(s, e)
            order.append((s, e))
            lock.release(entry)

        async with trio.open_nursery() as n:
            n.start_soon(take, 0, 100)
            n.start_soon(take, 0, 200)
            n.start_soon(take, 150, 300)
            await trio.sleep(0.1)
            assert order == [(150, 300)]
            lock.release(held)
    trio.run(scenario)
    assert sorted(order) == [(0, 100), (0, 200), (150, 300)]


@pytest.mark.parametrize("size", [64 << 10, 1 << 20])
def test_member_writes_finish_what_a_short_write_left(tmp_path, monkeypatch, size):
    """pwrite_full writes the rest after a short write, at the right offset,
    on the small-write path and on the large (write-out) one."""
    from raid1fs import member as mmod

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    data = os.urandom(size)
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda f, b, off: real_pwrite(f, bytes(b[:4096]), off))
    monkeypatch.setattr(os, "pwritev", lambda f, bufs, off, flags=0:
                        real_pwrite(f, bytes(bufs[0][:len(bufs[0]) // 3]), off))
    try:
        mmod.pwrite_full(fd, data, 8192, False)
        monkeypatch.undo()
        assert os.pread(fd, size + 8192, 0) == bytes(8192) + data
    finally:
        os.close(fd)


def test_a_rebuild_chunk_of_zeros_is_written_to_a_member_not_known_to_be_zero(tmp_path):
    """write_chunk skips zeros only on a member known to read as zeros (a
    new sparse image); elsewhere they overwrite what was there."""
    from raid1fs.rebuild import write_chunk

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, os.urandom(65536), 0)
        write_chunk(fd, bytes(65536), 0, skip_zeros=False)
        assert os.pread(fd, 65536, 0) == bytes(65536)
    finally:
        os.close(fd)
