"""Replace, rebuild, resync and spares (issue 4), as real drills.

Real raid1fs mounts over image files, loop devices, ext4 and tools/faultfs.
Each test says what it proves. After every drill the members are checked on
their own (not through raid1fs): data regions hashed directly, and e2fsck on
a member's data region through `losetup -r -o data_offset`.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    NOBODY,
    MiB,
    data_region_hash,
    drop_cache,
    faultfs,
    member_entry,
    member_state,
    mounts_at,
    one_line,
    process_gone,
    raid1fs,
    run,
    sha256,
    status_json,
    wait_for,
)

from raid1fs import control

# ----- helpers ----------------------------------------------------------------------

def paths_and_states(st: dict) -> list[tuple[str, str]]:
    return [(m["path"], m["state"]) for m in st["members"]]


def rebuild_of(mnt, member) -> dict | None:
    return member_entry(status_json(mnt), member)["rebuild"]


def fsync_write(path, pieces: list[tuple[int, bytes]]) -> None:
    """Write each (offset, data) to the file at `path`, then fsync."""
    fd = os.open(path, os.O_RDWR)
    try:
        for off, data in pieces:
            assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def e2fsck_member(env, member, st: dict) -> None:
    """e2fsck -fn of the ext4 in a member's data region, read directly."""
    off = st["members"][0]["data_offset"]  # the same on every member
    dev = env.losetup(member, offset=off, readonly=True)
    run("e2fsck", "-fn", dev)
    run("losetup", "-d", dev)


# ----- ext4 under a writer and a reader -------------------------------------------

HEADER = struct.Struct("<QQ")


def make_content(seed: int, size: int) -> bytes:
    """Self-describing file content: a header naming its seed and size, then
    that many pseudo-random bytes; `check_content` verifies it alone."""
    return HEADER.pack(seed, size) + random.Random(seed).randbytes(size)


def check_content(data: bytes) -> None:
    assert len(data) >= HEADER.size, f"file of {len(data)} bytes"
    seed, size = HEADER.unpack_from(data)
    assert len(data) == HEADER.size + size, f"length {len(data)}, header says {size}"
    assert data == make_content(seed, size), "content does not match its header"


class Worker(threading.Thread):
    """A workload thread in `root`, driven by `seed`, until `stop` is set:
    `count` is how many rounds it finished, `error` what ended it early
    (reported by the test)."""

    def __init__(self, root: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.root, self.seed = root, seed
        self.count = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self.work(random.Random(self.seed))
        except BaseException as e:  # reported by the test
            self.error = e

    def work(self, rng: random.Random) -> None:
        raise NotImplementedError


class FsWriter(Worker):
    """Rewrites SLOTS files in turn: content to a temporary file, fsync,
    rename over the slot, fsync the directory; then remembers its hash."""

    SLOTS = 150

    def __init__(self, root: Path, seed: int) -> None:
        super().__init__(root, seed)
        self.hashes: dict[str, str] = {}

    def work(self, rng: random.Random) -> None:
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while not self.stop.is_set():
                name = f"f{self.count % self.SLOTS:03d}"
                data = make_content(rng.getrandbits(63), rng.randint(0, 256 << 10))
                tmp = self.root / f".{name}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, self.root / name)
                os.fsync(dfd)
                self.hashes[name] = hashlib.sha256(data).hexdigest()
                self.count += 1
        finally:
            os.close(dfd)


class FsReader(Worker):
    """Reads random files the writer finished, dropping their cached pages
    first (the loop device does direct I/O, so the read reaches raid1fs),
    and verifies each one's content."""

    def __init__(self, root: Path, writer: FsWriter, seed: int) -> None:
        super().__init__(root, seed)
        self.writer = writer

    def work(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            names = list(self.writer.hashes)
            if not names:
                time.sleep(0.01)
                continue
            name = rng.choice(names)
            fd = os.open(self.root / name, os.O_RDONLY)
            try:  # drop the pages of the very file read (the slot may be renamed over)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
            finally:
                os.close(fd)
            try:
                check_content(b"".join(chunks))
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
            self.count += 1


def test_ext4_under_io_survives_fail_replace_rebuild(env):
    """ext4 on the disk with a continuous writer (fsynced files of known
    content) and a reader verifying what it reads, while member A is failed
    and hot-replaced by C under a rate limit (the rebuild overlaps the
    workload for seconds) until `rebuild --wait` returns. Proves: no I/O
    error and no bad read throughout, every file's hash right, e2fsck clean
    on the mount; A is gone from the volume; B's and C's data regions are
    byte-identical and each holds a clean ext4 on its own."""
    size = 128 * MiB
    a, b = env.create("a.img", "b.img", size="128M")
    c = env.path("c.img")
    mnt = env.mount(a, b, opts=["--max-rebuild-rate", "20M"])
    # Direct I/O, so that reads of the file system on it reach raid1fs instead
    # of the page cache of the disk file.
    loop = env.losetup(mnt / "disk", direct_io=True)
    run("mkfs.ext4", "-q", loop)
    data = env.mount_fs(loop)

    writer = FsWriter(data, seed=1)
    reader = FsReader(data, writer, seed=2)
    writer.start()
    reader.start()
    try:
        wait_for(lambda: writer.count >= 60 or writer.error or reader.error, timeout=60,
                 what="the writer to get going")
        raid1fs("fail", mnt, a)
        st = status_json(mnt)
        assert member_state(st, a) == "failed" and st["volume"]["state"] == "degraded"
        at_fail = writer.count
        wait_for(lambda: writer.count >= at_fail + 20 or writer.error, timeout=60,
                 what="writes while degraded")

        r = raid1fs("replace", mnt, a, c)
        assert str(c) in r.stdout, r.stdout
        st = status_json(mnt)
        rb = member_entry(st, c)["rebuild"]
        assert member_state(st, c) == "rebuilding", st["members"]
        assert rb["kind"] == "full" and rb["total_bytes"] == size, rb
        assert st["volume"]["state"] == "rebuilding"
        assert member_state(st, a) == "failed"  # listed until C is in sync

        w0, r0, t0 = writer.count, reader.count, time.monotonic()
        r = raid1fs("rebuild", "--wait", mnt, check=False, timeout=120)
        took = time.monotonic() - t0
        assert r.returncode == 0, (r.stdout, r.stderr)
        lines = r.stdout.strip().splitlines()
        assert lines[-1] == "volume clean", r.stdout
        assert any(ln.startswith(f"{c}: full done, 128.0M copied") for ln in lines), r.stdout
        # The rebuild really overlapped the workload.
        assert took >= 3, f"rebuild took only {took:.1f} s: no overlap to speak of"
        assert writer.count - w0 >= 10, ("writer stalled during the rebuild", writer.count - w0)
        assert reader.count - r0 >= 10, ("reader stalled during the rebuild", reader.count - r0)

        w1 = writer.count
        wait_for(lambda: writer.count >= w1 + 20 or writer.error, timeout=60,
                 what="writes after the rebuild")
    finally:
        writer.stop.set()
        reader.stop.set()
        writer.join(timeout=60)
        reader.join(timeout=60)
    assert not writer.is_alive() and not reader.is_alive(), "workload stuck"
    assert writer.error is None, f"writer saw {writer.error!r}"
    assert reader.error is None, f"reader saw {reader.error!r}"
    assert reader.count > 50

    st = status_json(mnt)
    # The reads reached raid1fs (direct-I/O loop device, pages dropped).
    assert sum(m["reads"] for m in st["members"]) >= reader.count // 2, st["members"]

    assert paths_and_states(st) == [(str(b), "online"), (str(c), "online")], st["members"]
    assert st["volume"]["state"] == "clean"
    assert st["volume"]["members_expected"] == 2
    last = member_entry(st, c)["last_rebuild"]
    assert last["kind"] == "full" and last["copied_bytes"] == size, last

    for name, want in writer.hashes.items():
        assert sha256(data / name) == want, name
    run("umount", data)
    run("e2fsck", "-fn", loop)
    disk_hash = sha256(mnt / "disk")
    run("losetup", "-d", loop)
    raid1fs("umount", mnt)

    off_st = status_json(b, c)
    assert off_st["volume"]["state"] == "clean"
    assert raid1fs("status", b, c, check=False).returncode == 0
    assert data_region_hash(b) == data_region_hash(c) == disk_hash
    for m in (b, c):
        e2fsck_member(env, m, off_st)


# ----- resync only what changed -----------------------------------------------------

def test_readded_member_resyncs_only_what_changed(env):
    """A 1 GiB volume; member A failed; about 1% (10 MiB in five extents of
    1-3 MiB at scattered, partly unaligned offsets) rewritten; A re-added.
    Proves: status reports a resync (not a full rebuild) whose total is at
    least the regions written and at most 3% of the volume, the copy reports
    exactly that many bytes, and A's data region ends byte-identical to B's."""
    size = 1 << 30
    a, b = env.create("a.img", "b.img", size="1G")
    mnt = env.mount(a, b, opts=["--max-rebuild-rate", "4M"])
    base = os.urandom(4 * MiB)
    fsync_write(mnt / "disk", [(o * MiB, base) for o in (0, 300, 900)])

    raid1fs("fail", mnt, a)
    extents = [(37 * MiB + MiB // 2, 2 * MiB), (200 * MiB + 4096, 3 * MiB),
               (512 * MiB, MiB), (777 * MiB + 100 * 1024, 2 * MiB), (1000 * MiB, 2 * MiB)]
    written = sum(n for _, n in extents)
    assert written == 10 * MiB
    touched = set()
    for off, n in extents:
        touched |= set(range(off // MiB, (off + n - 1) // MiB + 1))
    fsync_write(mnt / "disk", [(off, os.urandom(n)) for off, n in extents])
    st = status_json(mnt)
    assert st["volume"]["regions"]["region_bytes"] == MiB
    assert st["volume"]["regions"]["missed_bytes"] >= len(touched) * MiB

    r = raid1fs("add", mnt, a)
    assert "resync" in r.stdout, r.stdout
    st = status_json(mnt)
    rb = member_entry(st, a)["rebuild"]
    assert member_state(st, a) == "rebuilding", st["members"]
    assert rb is not None and rb["kind"] == "resync", rb
    total = rb["total_bytes"]
    assert len(touched) * MiB <= total <= 0.03 * size, (total, len(touched))

    r = raid1fs("rebuild", "--wait", "--max-rate", "unlimited", mnt, check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1] == "volume clean"
    st = status_json(mnt)
    assert st["volume"]["max_rebuild_rate"] in (None, 0)
    assert paths_and_states(st) == [(str(a), "online"), (str(b), "online")]
    last = member_entry(st, a)["last_rebuild"]
    assert last["kind"] == "resync" and last["copied_bytes"] == total, (last, total)
    assert st["volume"]["regions"]["missed_bytes"] == 0
    raid1fs("umount", mnt)
    assert status_json(a, b)["volume"]["state"] == "clean"
    assert data_region_hash(a) == data_region_hash(b)


# ----- interrupted rebuilds resume -------------------------------------------------

@pytest.mark.parametrize("how", ["umount", "kill-9", "umount-old-failed"])
def test_interrupted_replace_resumes_from_checkpoint(env, how):
    """`replace A C` on a 256 MiB volume at 16 MiB/s (A online, or failed
    first), with writes below and above the copy position while it runs,
    interrupted past 80 MiB by `raid1fs umount` or by kill -9 of the mount
    process, then all three members mounted again. Proves: offline status
    shows C rebuilding with a checkpoint; the remount resumes from it (the
    resumed rebuild's total is at most what lies above the checkpoint, and
    that is all it copies); B's and C's data regions end identical to the
    disk; and A, replaced, is gone from the volume."""
    size = 256 * MiB
    a, b = env.create("a.img", "b.img", size="256M")
    c = env.path("c.img")
    mnt = env.mount(a, b, opts=["--max-rebuild-rate", "16M"])
    fsync_write(mnt / "disk", [(i * 32 * MiB, os.urandom(8 * MiB)) for i in range(8)])

    if how == "umount-old-failed":
        raid1fs("fail", mnt, a)
    raid1fs("replace", mnt, a, c)
    assert status_json(mnt)["volume"]["max_rebuild_rate"] == 16 * MiB
    # While C is being rebuilt: a write it already holds, one it does not yet.
    fsync_write(mnt / "disk", [(MiB, os.urandom(MiB)), (250 * MiB + 4096, os.urandom(MiB))])
    t0 = time.monotonic()

    def far_enough():
        st = status_json(mnt)
        rb = member_entry(st, c)["rebuild"]
        assert rb is not None and rb["kind"] == "full", rb
        return (rb["done_bytes"] > 80 * MiB and time.monotonic() - t0 > 2.5
                and st["volume"]["regions"]["intent_bytes"] == 0 and rb)
    rb = wait_for(far_enough, timeout=60, what="80 MiB copied and the intent bits cleared")
    assert rb["done_bytes"] < size, "the rebuild finished before it could be interrupted"
    st = status_json(mnt)
    assert [p for p, _ in paths_and_states(st)] == [str(a), str(b), str(c)]
    # A keeps serving meanwhile (unless it was failed)
    assert member_state(st, a) == ("failed" if how == "umount-old-failed" else "online")
    human = raid1fs("status", mnt, check=False)
    assert human.returncode == 1, human.stderr
    assert re.search(r"rebuilding \d+%\s+\S+/s\s+ETA \d+:\d\d:\d\d", human.stdout), human.stdout

    if how.startswith("umount"):
        raid1fs("umount", mnt)
    else:
        pid = st["daemon"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: process_gone(pid), timeout=10, what="the mount process to die")
        assert mounts_at(mnt), "the dead mount should still be attached"

    off = status_json(a, b, c)
    assert off["volume"]["clean_shutdown"] is how.startswith("umount")
    assert member_state(off, c) == "rebuilding", off["members"]
    ckpt = member_entry(off, c)["rebuild"]["checkpoint_bytes"]
    assert 0 < ckpt < size, ckpt
    if how.startswith("umount"):
        assert ckpt >= 80 * MiB, ckpt  # umount checkpoints where it stopped
    human = raid1fs("status", a, b, c, check=False)
    assert human.returncode == 1
    assert re.search(r"rebuild stopped at \d+%; it resumes at the next mount", human.stdout), \
        human.stdout

    mnt = env.mount(a, b, c, opts=["--max-rebuild-rate", "16M"])  # detaches a dead mount
    st = status_json(mnt)
    rb = member_entry(st, c)["rebuild"]
    assert member_state(st, c) == "rebuilding", st["members"]
    assert rb["kind"] == "full", rb
    assert rb["total_bytes"] <= size - ckpt, (rb, ckpt)  # it did not start over

    r = raid1fs("rebuild", "--wait", "--max-rate", "unlimited", mnt, check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1] == "volume clean", r.stdout
    st = status_json(mnt)
    last = member_entry(st, c)["last_rebuild"]
    assert last["kind"] == "full" and last["copied_bytes"] <= size - ckpt, (last, ckpt)
    assert member_state(st, b) == member_state(st, c) == "online"
    assert st["volume"]["state"] == "clean"
    disk_hash = sha256(mnt / "disk")
    raid1fs("umount", mnt)
    assert data_region_hash(b) == data_region_hash(c) == disk_hash

    # Last, as it is known to fail: the replaced member must be gone.
    assert [p for p, _ in paths_and_states(st)] == [str(b), str(c)], (
        "after the resumed replace, the old member is still in the volume: "
        f"{paths_and_states(st)}, members_expected {st['volume']['members_expected']}")


# ----- spare takeover ------------------------------------------------------------

def test_spare_takes_over_a_faultfs_failed_member(env):
    """Member A on faultfs, D added as a spare; faultfs makes every I/O of A
    fail; a write through the disk fails A. Proves: D starts rebuilding by
    itself and goes online, the volume ends clean with A listed failed, the
    --on-event command saw member-failed (A), degraded, rebuild-started (D),
    rebuild-finished (D) and member-online (D); D's and B's data regions are
    byte-identical and hold what was written. The volume stays degraded while
    A is listed failed (zpool: until the failed disk is detached), and is
    clean once A is removed."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="32M")
    d = env.path("d.img")
    log = env.path("events.log")
    cmd = f'echo "$RAID1FS_EVENT $RAID1FS_MEMBER" >> {log}'
    mnt = env.mount(a, b, opts=["--io-timeout", "3", "--on-event", cmd])
    payload = os.urandom(24 * MiB)
    fsync_write(mnt / "disk", [(4 * MiB, payload)])

    r = raid1fs("add", "--spare", mnt, d)
    assert "spare" in r.stdout, r.stdout
    st = status_json(mnt)
    assert paths_and_states(st) == [(str(a), "online"), (str(b), "online"), (str(d), "spare")]
    assert st["volume"]["state"] == "clean" and st["volume"]["members_expected"] == 2

    faultfs("set", ffs, "eio")
    try:
        more = os.urandom(MiB)
        fsync_write(mnt / "disk", [(30 * MiB, more)])
        assert member_state(status_json(mnt), a) == "failed"
        st = wait_for(lambda: member_state(s := status_json(mnt), d) == "online" and s,
                      timeout=60, what="the spare to take over")
        assert st["volume"]["state"] == "degraded"
    finally:
        faultfs("set", ffs, "ok")
    assert paths_and_states(st) == [(str(a), "failed"), (str(b), "online"), (str(d), "online")]
    last = member_entry(st, d)["last_rebuild"]
    assert last is not None and last["kind"] == "full", last

    def events() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []
    want = {f"member-failed {a}", f"rebuild-started {d}", f"rebuild-finished {d}",
            f"member-online {d}"}
    wait_for(lambda: want <= set(events()), timeout=10, what=f"events {want}")
    evs = events()
    assert any(e.startswith("degraded") for e in evs), evs
    assert not any(e.startswith("member-failed") and str(a) not in e for e in evs), evs

    with open(mnt / "disk", "rb") as f:
        f.seek(4 * MiB)
        assert f.read(len(payload)) == payload
    disk_hash = sha256(mnt / "disk")
    raid1fs("remove", mnt, a)
    assert status_json(mnt)["volume"]["state"] == "clean"
    raid1fs("umount", mnt)
    assert data_region_hash(d) == data_region_hash(b) == disk_hash


def test_a_spare_added_to_a_degraded_volume_says_it_takes_over(env):
    """`add --spare` while the volume is short of a member: the spare takes
    over at once, and the command says so (not just "added as a spare")."""
    (a, b), mnt = env.volume(size="16M")
    raid1fs("fail", mnt, a)
    s = env.path("s.img")
    r = raid1fs("add", "--spare", mnt, s)
    assert "takes over at once" in r.stdout, r.stdout
    wait_for(lambda: member_state(status_json(mnt), s) == "online", timeout=30,
             what="the spare in sync")
    s2 = env.path("s2.img")
    r = raid1fs("add", "--spare", mnt, s2)  # now the mirror is full: it waits
    assert r.stdout.strip() == f"{s2}: added as a spare (slot 3)", r.stdout


def test_a_spare_not_given_at_mount_shows_missing_and_can_be_removed_or_added_back(env):
    """A spare left out of `mount` is listed missing (marked a spare, with
    why it matters: it cannot take over), but the volume is clean and
    status exits 0 (zpool: an unavailable spare leaves the pool healthy).
    `fail` and `replace` of it say what it is; `add --spare` brings it back
    in its old slot, `remove` drops it from the roster for good."""
    (a, b), mnt = env.volume(size="16M")
    s = env.path("s.img")
    raid1fs("add", "--spare", mnt, s)
    raid1fs("umount", mnt)
    for back in ("add", "replace", "remove"):
        raid1fs("mount", a, b, mnt)
        st = status_json(mnt)
        e = member_entry(st, s)
        assert e["state"] == "missing" and e["spare"] is True and e["slot"] == 2, e
        assert "cannot take over" in e["fail_reason"]
        assert st["volume"]["state"] == "clean"
        r = raid1fs("status", mnt, check=False)
        assert r.returncode == 0, r.stdout
        assert f"{s}: a spare, not among the members given" in r.stdout, r.stdout
        assert "action:" not in r.stdout and "empty:" not in r.stdout, r.stdout
        r = raid1fs("fail", mnt, s, check=False)
        assert r.returncode not in (0, 2) and f"{s}: not in this mount" in one_line(r.stderr)
        r = raid1fs("replace", mnt, s, env.path("n.img"), check=False)
        assert r.returncode not in (0, 2) and f"{s}: is a spare" in one_line(r.stderr)
        assert not os.path.exists(env.path("n.img"))
        if back == "add":
            raid1fs("add", "--spare", mnt, s)
            st = status_json(mnt)
            assert [(m["slot"], m["state"]) for m in st["members"]] == \
                [(0, "online"), (1, "online"), (2, "spare")], st["members"]
            raid1fs("umount", mnt)
            assert member_state(status_json(a, b, s), s) == "spare"
        elif back == "replace":  # it replaces b: listed once, its old entry gone
            raid1fs("replace", mnt, b, s)
            raid1fs("rebuild", "--wait", mnt)
            st = status_json(mnt)
            assert [(m["path"], m["state"]) for m in st["members"]] == \
                [(str(a), "online"), (str(s), "online")], st["members"]
            raid1fs("replace", mnt, s, b)  # back as it was, for the next round
            raid1fs("rebuild", "--wait", mnt)
            raid1fs("add", "--spare", mnt, s)
            raid1fs("umount", mnt)
        else:
            r = raid1fs("remove", mnt, s)
            assert "note:" not in r.stdout, r.stdout  # a spare holds no copy to mistake
            st = status_json(mnt)
            assert [m["path"] for m in st["members"]] == [str(a), str(b)], st["members"]
            assert st["volume"]["state"] == "clean"
            raid1fs("umount", mnt)
            r = raid1fs("mount", a, b, s, mnt, check=False)
            assert r.returncode not in (0, 2) and str(s) in one_line(r.stderr)


def test_fail_names_the_member_in_the_mount_before_an_absent_slot_of_that_path(env):
    """b.img went missing; a new image at the same path was added. `fail
    b.img` fails that live member (not "not in this mount" because of the
    old slot's path); `fail` of the absent slot by its UUID says it is not
    in this mount."""
    a, b, c = env.create("a.img", "b.img", "c.img", size="16M")
    old_uuid = status_json(a, b, c)["members"][1]["uuid"]
    b.unlink()
    mnt = env.mount(a, c, opts=["--degraded"])
    raid1fs("add", mnt, b)
    raid1fs("rebuild", "--wait", mnt, check=False)  # exit 1: the old slot is still missing
    st = status_json(mnt)
    assert sorted(m["state"] for m in st["members"] if m["path"] == str(b)) == \
        ["missing", "online"], st["members"]
    raid1fs("fail", mnt, b)
    st = status_json(mnt)
    assert [m["state"] for m in st["members"] if m["path"] == str(b)].count("failed") == 1, st
    r = raid1fs("fail", mnt, old_uuid, check=False)
    assert r.returncode not in (0, 2) and "not in this mount" in one_line(r.stderr), r.stderr


# ----- offline rebuild -------------------------------------------------------------

def test_offline_rebuild_of_a_member_that_was_missing(env):
    """B mounted --degraded without A, 3 MiB written, unmounted; then the
    offline `raid1fs rebuild A B`. Proves: it exits 0, says it resynced A
    over the 3 MiB (not in full) and that the volume is clean; offline status
    exits 0 with both online; the data regions are identical; a second
    offline rebuild says there is nothing to rebuild."""
    a, b = env.create("a.img", "b.img", size="64M")
    mnt = env.mount(b, opts=["--degraded"])
    assert member_state(status_json(mnt), a) == "missing"
    fsync_write(mnt / "disk", [(5 * MiB, os.urandom(3 * MiB))])
    raid1fs("umount", mnt)
    st = status_json(a, b)
    assert member_state(st, a) == "stale"
    assert raid1fs("status", a, b, check=False).returncode == 1

    r = raid1fs("rebuild", a, b, check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.strip().splitlines()
    assert f"{a}: resync done, 3.0M copied" in r.stdout, r.stdout
    assert lines[-1] == "volume clean", r.stdout
    assert r.stderr == "", r.stderr  # the engine's log lines are the mount log's, not ours

    r = raid1fs("status", "--json", a, b, check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    st = status_json(a, b)
    assert st["volume"]["state"] == "clean" and st["volume"]["clean_shutdown"] is True
    assert paths_and_states(st) == [(str(a), "online"), (str(b), "online")]
    assert data_region_hash(a) == data_region_hash(b)

    r = raid1fs("rebuild", a, b, check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "nothing to rebuild" in r.stdout, r.stdout
    assert "copied" not in r.stdout, r.stdout


def test_offline_status_of_a_resync_left_unfinished(env):
    """A re-added member's resync, stopped by umount: offline status shows it
    (human form and JSON), exit 1, no traceback."""
    a, b = env.create("a.img", "b.img", size="64M")
    mnt = env.mount(a, b, opts=["--max-rebuild-rate", "1M"])
    raid1fs("fail", mnt, b)
    fsync_write(mnt / "disk", [(0, os.urandom(16 * MiB))])
    raid1fs("add", mnt, b)
    raid1fs("umount", mnt)
    r = raid1fs("status", a, b, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert "resync stopped (checkpoint at" in r.stdout, r.stdout
    st = status_json(a, b)
    assert member_state(st, b) == "rebuilding"
    assert member_entry(st, b)["rebuild"]["kind"] == "resync"


# ----- bad input (guarantee 9) -----------------------------------------------------

BAD_ADDS = ["other-volume", "other-volume-as-new", "too-small", "holds-data", "no-parent",
            "directory", "online-member", "online-member-as-spare", "old-not-a-member",
            "new-is-a-member"]


@pytest.mark.parametrize("case", BAD_ADDS)
def test_add_and_replace_refuse_bad_input(env, case):
    """add / replace given a member of another volume, a file too small, a
    file holding data, a path in a missing directory, a directory, a path
    that already is an online member, an OLD that is not a member, a NEW
    that is: exit status neither 0 nor 2, one line naming the path, every
    member and candidate file byte-identical, nothing created, and the
    volume's state, roster and event counter unchanged."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mount(a, b)  # nothing written: the mount leaves a and b alone
    x, y = env.create("x.img", "y.img", size="16M")
    small = env.path("small.img")
    with open(small, "wb") as f:
        f.truncate(4 * MiB)
    full = env.path("full.img")
    with open(full, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    adir = env.mkdir("adir")
    nodir_new = env.path("nodir") / "new.img"
    new = env.path("new.img")
    stranger = env.path("stranger.img")
    with open(stranger, "wb") as f:
        f.truncate(32 * MiB)

    args, fault = {
        "other-volume": (["add", mnt, x], x),
        "other-volume-as-new": (["replace", mnt, a, x], x),
        "too-small": (["add", mnt, small], small),
        "holds-data": (["add", mnt, full], full),
        "no-parent": (["add", mnt, nodir_new], nodir_new),
        "directory": (["add", "--spare", mnt, adir], adir),
        "online-member": (["add", mnt, a], a),
        "online-member-as-spare": (["add", "--spare", mnt, b], b),
        "old-not-a-member": (["replace", mnt, stranger, new], stranger),
        "new-is-a-member": (["replace", mnt, a, b], b),
    }[case]
    files = [a, b, x, y, small, full, stranger, new, nodir_new]
    before = {str(p): sha256(p) if p.exists() else None for p in files}
    st0 = status_json(mnt)

    r = raid1fs(*args, check=False)
    assert r.returncode not in (0, 2), (r.returncode, r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert str(fault) in line, f"{fault} not named in {line!r}"

    st = status_json(mnt)
    assert paths_and_states(st) == paths_and_states(st0) == [(str(a), "online"),
                                                             (str(b), "online")]
    assert st["volume"]["state"] == "clean"
    assert st["volume"]["events"] == st0["volume"]["events"]
    assert st["volume"]["members_expected"] == 2
    assert not env.path("nodir").exists()
    assert os.listdir(adir) == []
    after = {str(p): sha256(p) if p.exists() else None for p in files}
    assert after == before


# ----- the control path is private (guarantee 10) ------------------------------------

def test_nobody_cannot_add_replace_or_rebuild(env):
    """While C is being rebuilt (1 MiB/s), user nobody runs add, add --spare,
    replace, rebuild and rebuild --max-rate: each is refused with one line
    saying "permission denied", refused by the mount (logged there), and
    changes nothing (no file created, roster and rate unchanged). Root can
    then finish the rebuild."""
    a, b = env.create("a.img", "b.img", size="16M")
    c, d, e = env.path("c.img"), env.path("d.img"), env.path("e.img")
    mnt = env.mount(a, b, opts=["--max-rebuild-rate", "1M"])
    raid1fs("replace", mnt, a, c)
    st0 = status_json(mnt)
    assert member_state(st0, c) == "rebuilding"
    log = os.path.join(os.environ["RAID1FS_RUN_DIR"], control.mount_key(str(mnt)) + ".log")

    attempts = {
        "add": ["add", mnt, d],
        "add --spare": ["add", "--spare", mnt, d],
        "replace": ["replace", mnt, b, e],
        "rebuild": ["rebuild", mnt],
        "rebuild --max-rate": ["rebuild", "--wait", "--max-rate", "unlimited", mnt],
    }
    for what, args in attempts.items():
        r = raid1fs(*args, user=NOBODY, check=False)
        assert r.returncode not in (0, 2), (what, r.returncode, r.stdout, r.stderr)
        line = one_line(r.stderr)
        assert "permission denied" in line.lower(), (what, line)
        cmd = args[0]
        refused = [ln for ln in open(log) if "refused" in ln and cmd in ln and NOBODY in ln]
        assert refused, f"no refusal of {cmd} by uid {NOBODY} in {log}"
        assert not d.exists() and not e.exists(), what
        st = status_json(mnt)
        assert [p for p, _ in paths_and_states(st)] == [str(a), str(b), str(c)], what
        assert member_state(st, c) == "rebuilding", what
        assert st["volume"]["max_rebuild_rate"] == MiB, what

    r = raid1fs("rebuild", "--wait", "--max-rate", "0", mnt, check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    st = status_json(mnt)
    assert paths_and_states(st) == [(str(b), "online"), (str(c), "online")]


# ----- rebuild with nothing to do ------------------------------------------------

def test_rebuild_wait_on_a_clean_volume(env):
    """`rebuild --wait` with nothing to do: exit 0, says so, ends with
    "volume clean", and changes nothing."""
    (a, b), mnt = env.volume(size="16M")
    st0 = status_json(mnt)
    t0 = time.monotonic()
    r = raid1fs("rebuild", "--wait", mnt, check=False)
    assert time.monotonic() - t0 < 10
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "nothing to rebuild" in r.stdout, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "volume clean", r.stdout
    assert r.stderr == ""
    st = status_json(mnt)
    assert paths_and_states(st) == paths_and_states(st0)
    assert st["volume"]["events"] == st0["volume"]["events"]
    assert all(m["rebuild"] is None and m["last_rebuild"] is None for m in st["members"])


def test_rebuild_wait_after_a_finished_rebuild_says_only_nothing_to_do(env):
    """A rebuild that ended before `rebuild --wait` ran (say, the one `add`
    started) is not reported again as if this command had waited for it."""
    (a, b), mnt = env.volume(size="16M")
    c = env.path("c.img")
    raid1fs("add", mnt, c)
    wait_for(lambda: member_state(status_json(mnt), c) == "online", timeout=30,
             what="the added member online")
    r = raid1fs("rebuild", "--wait", mnt)
    assert r.stdout.splitlines() == ["nothing to rebuild: every member is in sync",
                                     "volume clean"], r.stdout


def test_rebuild_wait_on_a_degraded_volume_exits_1(env):
    """`rebuild --wait` leaves a failed member alone (it is re-added with
    `add`): exit 1, says the volume is degraded, and the member stays failed."""
    (a, b), mnt = env.volume(size="16M")
    raid1fs("fail", mnt, a)
    r = raid1fs("rebuild", "--wait", mnt, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "nothing to rebuild" in r.stdout, r.stdout
    lines = r.stdout.strip().splitlines()
    assert f"{a}: failed (failed by the operator)" in lines, r.stdout
    assert lines[-1] == "volume degraded", r.stdout
    st = status_json(mnt)
    assert paths_and_states(st) == [(str(a), "failed"), (str(b), "online")]


def test_lifting_the_rate_limit_takes_effect_at_once(env):
    """A rebuild crawling at 512 KiB/s; `rebuild --wait --max-rate unlimited`
    lifts the limit on the running mount. Proves: the new rate shows in
    status and the 16 MiB rebuild then finishes within seconds, not at the
    old rate."""
    a, b = env.create("a.img", "b.img", size="16M")
    c = env.path("c.img")
    mnt = env.mount(a, b, opts=["--max-rebuild-rate", "512K"])
    raid1fs("replace", mnt, a, c)
    assert status_json(mnt)["volume"]["max_rebuild_rate"] == 512 * 1024
    wait_for(lambda: (rb := rebuild_of(mnt, c)) and rb["running"], timeout=10,
             what="the rebuild to run")
    t0 = time.monotonic()
    r = raid1fs("rebuild", "--wait", "--max-rate", "unlimited", mnt, check=False, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout, r.stderr)
    st = status_json(mnt)
    assert st["volume"]["max_rebuild_rate"] in (None, 0)
    assert paths_and_states(st) == [(str(b), "online"), (str(c), "online")]
    assert took < 5, (f"rebuild --wait took {took:.1f} s after the limit was lifted: "
                      "the copy still waited at the old rate of 512K/s")


def test_offline_rebuild_refuses_a_member_left_out(env):
    """`rebuild A` of a volume of A and B: refused like mount without
    --degraded (B would be marked stale for good), naming B; nothing written."""
    a, b = env.create("a.img", "b.img", size="16M")
    before = [sha256(p) for p in (a, b)]
    r = raid1fs("rebuild", a, check=False)
    assert r.returncode not in (0, 2) and str(b) in one_line(r.stderr), r.stderr
    assert "missing" in r.stderr
    assert [sha256(p) for p in (a, b)] == before
    assert raid1fs("status", a, b, check=False).returncode == 0


def test_rebuild_wait_reports_only_the_rebuilds_it_waited_for(env):
    """A spare's takeover finished earlier; `rebuild --wait` during a later
    replace reports the replace's rebuild, not the spare's again."""
    (a, b), mnt = env.volume(size="16M")
    s, c = env.path("s.img"), env.path("c.img")
    raid1fs("add", "--spare", mnt, s)
    raid1fs("fail", mnt, a)
    raid1fs("rebuild", "--wait", mnt, check=False)  # 1: failed a is still listed
    assert member_state(status_json(mnt), s) == "online"
    raid1fs("remove", mnt, a)
    raid1fs("rebuild", "--max-rate", "2M", mnt)
    raid1fs("replace", mnt, b, c)
    r = raid1fs("rebuild", "--wait", "--max-rate", "0", mnt)
    assert f"{c}: full done" in r.stdout, r.stdout
    assert str(s) not in r.stdout, r.stdout


def test_a_member_missing_at_mount_is_added_back_and_sent_only_what_it_missed(env):
    """A 256 MiB volume mounted --degraded without B; 3 MiB written; then
    `raid1fs add` of B to the running mount: it is recognised as the
    missing member (not a new one: the mirror stays 2-way), resynced with
    only the regions written while it was away, and ends byte-identical."""
    a, b = env.create("a.img", "b.img", size="256M")
    mnt = env.mount(a, opts=["--degraded"])
    st = status_json(mnt)
    assert paths_and_states(st) == [(str(a), "online"), (str(b), "missing")], st["members"]
    fsync_write(mnt / "disk", [(10 * MiB, os.urandom(2 * MiB)), (200 * MiB, os.urandom(MiB))])
    r = raid1fs("add", mnt, b)
    assert "resync" in r.stdout and "wider" not in r.stdout, r.stdout
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert paths_and_states(st) == [(str(a), "online"), (str(b), "online")], st["members"]
    assert st["volume"]["members_expected"] == 2, st["volume"]
    last = member_entry(st, b)["last_rebuild"]
    assert last["kind"] == "resync" and 3 * MiB <= last["copied_bytes"] <= 8 * MiB, last
    raid1fs("umount", mnt)
    assert status_json(a, b)["volume"]["state"] == "clean"
    assert data_region_hash(a) == data_region_hash(b)


def test_a_rebuild_whose_only_source_fails_to_read_stops_and_resumes(env):
    """A (on faultfs) is the only member in sync, C rebuilds from it under
    a rate limit; A's reads then fail
    (faultfs eio-read): the rebuild stops with the reason in status and
    `rebuild --wait` exits 1 naming it, nothing is marked in sync that was
    not copied, A stays online (its writes work). Once A reads again,
    `raid1fs rebuild` resumes and C ends byte-identical to A."""
    src, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="64M")
    mnt = env.mount(a, b, opts=["--max-rebuild-rate", "8M"])
    fsync_write(mnt / "disk", [(0, os.urandom(64 * MiB))])
    raid1fs("fail", mnt, b)
    raid1fs("remove", mnt, b)
    c = env.path("c.img")
    raid1fs("add", mnt, c)
    wait_for(lambda: (rebuild_of(mnt, c) or {}).get("done_bytes", 0) > 4 * MiB,
             what="the rebuild under way")
    faultfs("set", ffs, "eio-read")
    try:
        drop_cache(a)
        r = raid1fs("rebuild", "--wait", "--max-rate", "unlimited", mnt, check=False, timeout=120)
        assert r.returncode == 1, (r.stdout, r.stderr)
        st = status_json(mnt)
        rb = member_entry(st, c)["rebuild"]
        assert member_state(st, c) == "rebuilding", st["members"]
        assert 0 < rb["done_bytes"] < rb["total_bytes"], rb
        assert str(a) in (rb.get("error") or ""), rb
        assert member_state(st, a) == "online"
    finally:
        faultfs("set", ffs, "ok")
    r = raid1fs("rebuild", "--wait", mnt, check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    raid1fs("umount", mnt)
    assert status_json(a, c)["volume"]["state"] == "clean"
    assert data_region_hash(a) == data_region_hash(c)


def test_a_replacement_that_fails_mid_rebuild_leaves_the_old_member_serving(env):
    """`replace B C`, C on faultfs; C's writes fail mid-rebuild (eio-write):
    C is failed (the volume shows degraded while it lists it), the replace
    ends, B stays online and in the volume, the volume still writes; `remove
    C` then leaves the volume clean as it was before, A and B identical."""
    _, ffs = env.faultfs()
    (a, b), mnt = env.volume(size="64M", opts=["--max-rebuild-rate", "8M"])
    fsync_write(mnt / "disk", [(0, os.urandom(64 * MiB))])
    c = ffs / "c.img"
    raid1fs("replace", mnt, b, c)
    wait_for(lambda: (rebuild_of(mnt, c) or {}).get("done_bytes", 0) > 4 * MiB,
             what="the rebuild under way")
    faultfs("set", ffs, "eio-write")
    try:
        wait_for(lambda: member_state(status_json(mnt), c) == "failed", timeout=60,
                 what="C failed")
        fsync_write(mnt / "disk", [(MiB, os.urandom(MiB))])  # the volume still writes
        st = status_json(mnt)
        assert st["volume"]["state"] == "degraded", st
        assert member_state(st, a) == member_state(st, b) == "online", st["members"]
        assert member_entry(st, b)["rebuild"] is None
    finally:
        faultfs("set", ffs, "ok")
    raid1fs("remove", mnt, c)
    st = status_json(mnt)
    assert paths_and_states(st) == [(str(a), "online"), (str(b), "online")]
    assert st["volume"]["state"] == "clean" and st["volume"]["members_expected"] == 2
    raid1fs("umount", mnt)
    assert status_json(a, b)["volume"]["state"] == "clean"
    assert data_region_hash(a) == data_region_hash(b)


def test_offline_rebuild_gives_up_on_a_hung_member_after_raid1fs_io_timeout(env):
    """The offline `raid1fs rebuild` copies to A (on faultfs), which then
    hangs: A is failed after RAID1FS_IO_TIMEOUT seconds (2 here), not after
    the mount's default 30, and the outcome is printed then (the process
    itself ends only once the hung call returns: the kernel holds it)."""
    src, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="64M")
    mnt = env.mount(b, opts=["--degraded"])
    fsync_write(mnt / "disk", [(0, os.urandom(64 * MiB))])
    raid1fs("umount", mnt)
    cmd = [sys.executable, "-m", "raid1fs", "rebuild", "--max-rate", "8M", str(a), str(b)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAID1FS_IO_TIMEOUT": "2"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(ln.startswith("rebuilding ") for ln in lines), timeout=60,
                 what="the copy under way")
        faultfs("set", ffs, "hang")
        hung_at = time.monotonic()
        wait_for(lambda: any("volume degraded" in ln for ln in lines), timeout=20,
                 what="the outcome")
        assert time.monotonic() - hung_at < 10, lines
        assert any(f"{a}: failed" in ln for ln in lines), lines
    finally:
        faultfs("set", ffs, "ok")
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join(10)
    assert proc.returncode == 1, lines
    st = status_json(a, b)
    assert member_state(st, a) != "online" and member_state(st, b) == "online", st["members"]
