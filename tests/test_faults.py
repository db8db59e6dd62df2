"""Failure drills: members broken for real through tools/faultfs.

Each test states what it proves. Member A lives on a faultfs mount, member
B on the plain file system; faults are switched while everything runs.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    MiB,
    _unmount_raid1fs,
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


def _file_sizes(rng: random.Random, n: int) -> list[int]:
    """Mostly small files, some medium, a few up to 64 MiB."""
    sizes = []
    for _ in range(n):
        r = rng.random()
        if r < 0.10:
            sizes.append(0)
        elif r < 0.85:
            sizes.append(rng.randint(1, 64 << 10))
        elif r < 0.99:
            sizes.append(rng.randint(64 << 10, MiB))
        else:
            sizes.append(rng.randint(2 * MiB, 8 * MiB))
    sizes[n // 3] = 64 * MiB  # one of the largest size, in the middle
    return sizes


class Writer(threading.Thread):
    """Writes files into a directory, remembering each one's hash."""

    def __init__(self, root, sizes, seed: int) -> None:
        super().__init__(daemon=True)
        self.root, self.sizes, self.seed = root, sizes, seed
        self.hashes: dict[str, str] = {}
        self.error: BaseException | None = None
        self.progress = 0

    def run(self) -> None:
        rng = random.Random(self.seed)
        try:
            for i, size in enumerate(self.sizes):
                d = self.root / f"d{i % 37}"
                d.mkdir(exist_ok=True)
                data = rng.randbytes(size)
                (d / f"f{i}").write_bytes(data)
                self.hashes[f"d{i % 37}/f{i}"] = hashlib.sha256(data).hexdigest()
                self.progress = i + 1
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.mark.parametrize("fault", ["eio", "hang"])
def test_ext4_survives_member_failing_mid_workload(env, fault):
    """ext4 on the mirrored disk under thousands of files (0 B to 64 MiB);
    member A breaks (every I/O EIO, or every I/O hangs) in the middle.
    Proves: the writer loses nothing and sees no error, A is failed, e2fsck is
    clean, every file's hash matches, and B's data region read directly
    (losetup -o data_offset) is byte-identical to the mount's disk."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="1G")
    mnt = env.mount(a, b, opts=["--io-timeout", "2"])
    loop = env.losetup(mnt / "disk")
    run("mkfs.ext4", "-q", loop)
    data = env.mount_fs(loop)

    writer = Writer(data, _file_sizes(random.Random(1), 2500), seed=2)
    writer.start()
    for _ in range(600):
        if writer.progress > 800 or not writer.is_alive():
            break
        time.sleep(0.05)
    faultfs("set", ffs, fault)
    at_fault = writer.progress
    assert 0 < at_fault < len(writer.sizes), "the fault must land mid-workload"
    writer.join(timeout=600)
    assert not writer.is_alive(), "writer stuck"
    assert writer.error is None, f"writer saw {writer.error!r}"
    run("sync")

    st = status_json(mnt)
    assert member_state(st, a) == "failed"
    assert member_state(st, b) == "online"
    assert st["volume"]["state"] == "degraded"

    for rel, want in writer.hashes.items():
        assert sha256(data / rel) == want, rel
    run("umount", data)
    run("e2fsck", "-fn", loop)
    disk_hash = sha256(mnt / "disk")
    run("losetup", "-d", loop)
    assert data_region_hash(b, st) == disk_hash
    faultfs("set", ffs, "ok")  # let abandoned threads finish before unmount
    raid1fs("umount", mnt)
    off = st["members"][0]["data_offset"]
    chk = env.losetup(b, offset=off, readonly=True)
    run("e2fsck", "-fn", chk)


def _filled_volume(env):
    """A 32 MiB volume, member A on faultfs, filled with random data."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="32M")
    mnt = env.mount(a, b)
    payload = os.urandom(32 * MiB)
    with open(mnt / "disk", "r+b") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    return ffs, a, b, mnt, payload


def test_read_errors_are_retried_and_healed(env):
    """Reads failing on member A are served from B; the bad copy is
    rewritten from the good one, A stays online with its READ errors counted,
    and every read returns the right data."""
    ffs, a, b, mnt, payload = _filled_volume(env)
    faultfs("set", ffs, "eio-read")
    for _ in range(3):
        drop_cache(mnt / "disk")
        with open(mnt / "disk", "rb") as f:
            assert f.read() == payload
    st = status_json(mnt)
    ma = member_entry(st, a)
    assert ma["state"] == "online"
    assert ma["errors"]["read"] > 0
    assert st["volume"]["state"] == "clean"
    faultfs("set", ffs, "ok")
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b) == sha256_bytes(payload)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_hung_member_does_not_wedge_the_volume(env):
    """A member whose every I/O hangs is failed after --io-timeout; no caller
    waits much longer than that, status answers meanwhile, and umount works
    while threads are still stuck on the hung member."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    mnt = env.mount(a, b, opts=["--io-timeout", "1.5"])
    faultfs("set", ffs, "hang")
    t0 = time.monotonic()
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5 + 5, f"caller waited {elapsed:.1f}s"
    st = status_json(mnt)
    assert member_state(st, a) == "failed"
    assert "timeout" in (member_entry(st, a)["fail_reason"])
    assert member_entry(st, a)["errors"]["write"] >= 1
    drop_cache(mnt / "disk")
    with open(mnt / "disk", "rb") as f:
        assert f.read(4096) == b"x" * 4096
    t0 = time.monotonic()
    r = raid1fs("umount", mnt)  # faultfs still hangs
    assert time.monotonic() - t0 < 10
    assert "still has I/O stuck on a hung member" in r.stderr, r.stderr
    assert not os.path.ismount(mnt)
    # A thread still stuck in a.img's I/O keeps the mount process alive,
    # but b.img was let go: not in use, ready for the next mount.
    st = status_json(b)
    assert st["volume"]["clean_shutdown"] is True
    assert st["volume"]["in_use"] == [], st["volume"]


def test_a_write_given_up_on_every_member_is_resynced_once_the_members_answer(env):
    """Both members hang during a write: the caller gets EIO after the I/O
    timeout, nobody is failed (the last in-sync member is kept), and the
    region is suspect. The hung calls then end, landing on A and failing on
    B, so the members differ there; the mount resyncs that region from one
    member by itself, at once, and the unmount is clean: the members' data
    regions are byte-identical, read on their own."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", ffs / "b.img", size="16M")
    mnt = env.mount(a, b, opts=["--io-timeout", "1"])
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        os.pwrite(fd, b"H" * 4096, 0)  # the region's intent bit is set now
        faultfs("set", ffs, "hang")
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"T" * 4096, 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    st = status_json(mnt)
    assert [member_state(st, x) for x in (a, b)] == ["online", "online"], st["members"]
    assert st["volume"]["regions"]["suspect_bytes"] == MiB, st["volume"]["regions"]
    time.sleep(1.5)  # a suspect region is not resynced while its calls hang
    st = status_json(mnt)
    assert st["volume"]["regions"]["suspect_bytes"] == MiB, st["volume"]["regions"]
    assert not any(x["last_rebuild"] for x in st["members"]), st["members"]
    faultfs("set", ffs, "eio-write", "--match", "b.img")  # A's write lands, B's fails
    faultfs("set", ffs, "ok")

    def resynced():
        st = status_json(mnt)
        return st["volume"]["regions"]["suspect_bytes"] == 0 and \
            st["volume"]["state"] == "clean" and \
            any(x["last_rebuild"] for x in st["members"]) and st
    st = wait_for(resynced, timeout=15, what="the suspect region resynced")
    last = [x["last_rebuild"] for x in st["members"] if x["last_rebuild"]]
    assert len(last) == 1 and last[0]["kind"] == "resync", last
    assert last[0]["copied_bytes"] == MiB, last  # the one region, not the volume
    drop_cache(mnt / "disk")
    with open(mnt / "disk", "rb") as f:
        seen = f.read(4096)
    assert seen in (b"H" * 4096, b"T" * 4096)
    r = raid1fs("umount", mnt)
    assert r.stderr == "", r.stderr
    st = status_json(a, b)
    assert st["volume"]["clean_shutdown"] is True, st["volume"]
    assert data_region_hash(a, st) == data_region_hash(b, st)
    assert sha256(a, st["members"][0]["data_offset"], 4096) == hashlib.sha256(seen).hexdigest()


def test_failed_member_is_stale_at_next_mount(env):
    """A member that failed a write is recorded failed on the survivor before
    the write returns; at the next mount it is recognised as stale, serves no
    read of what it missed, and is resynced over exactly that."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    mnt = env.mount(a, b)
    faultfs("set", ffs, "eio-write")
    with open(mnt / "disk", "r+b") as f:
        f.write(b"new" * 1000)
        f.flush()
        os.fsync(f.fileno())
    st = status_json(mnt)
    assert member_state(st, a) == "failed"
    # whichever write failed it (bitmap, data or flush) counts in WRITE
    assert member_entry(st, a)["errors"]["write"] >= 1
    faultfs("set", ffs, "ok")
    raid1fs("umount", mnt)

    st = status_json(a, b)
    assert member_state(st, a) == "stale"
    r = raid1fs("mount", "--max-rebuild-rate", "256K", a, b, mnt)
    assert r.returncode == 0
    drop_cache(mnt / "disk")
    with open(mnt / "disk", "rb") as f:
        assert f.read(3000) == b"new" * 1000  # a (slot 0, first on ties) lacks it
    st = status_json(mnt)
    assert member_state(st, a) == "rebuilding"
    assert st["volume"]["state"] == "rebuilding"
    raid1fs("rebuild", "--wait", "--max-rate", "unlimited", mnt)
    st = status_json(mnt)
    assert member_state(st, a) == "online" and st["volume"]["state"] == "clean"
    assert member_entry(st, a)["last_rebuild"]["copied_bytes"] == MiB  # one region
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b)


def test_a_member_failed_by_an_fsync_error_is_resynced_over_its_unsynced_writes(env):
    """Writes that reached a member's page cache but whose fsync then failed
    may never reach its disk (a writeback error): when the member fails on
    that fsync, every region written since its data was last known durable
    goes to the missed-writes bitmap, and the resync copies it. Shown by
    undoing those writes on the member's own file (what a lost writeback
    leaves) before it is resynced."""
    src, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="128M")
    mnt = env.mount(a, b)
    with open(mnt / "disk", "r+b") as f:
        for at in (5 * MiB, 20 * MiB):
            f.seek(at)
            f.write(os.urandom(MiB))
        f.flush()
        faultfs("set", ffs, "eio-write")
        os.fsync(f.fileno())  # fails on a: a is failed, the caller sees success
    st = status_json(mnt)
    assert member_state(st, a) == "failed"
    assert st["volume"]["regions"]["missed_bytes"] == 2 * MiB, st["volume"]["regions"]
    faultfs("set", ffs, "ok")
    raid1fs("umount", mnt)
    off = member_entry(status_json(a, b), a)["data_offset"]
    with open(src / "a.img", "r+b") as f:  # the lost writeback
        for at in (5 * MiB, 20 * MiB):
            f.seek(off + at)
            f.write(bytes(MiB))
    raid1fs("mount", a, b, mnt)
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert member_state(st, a) == "online", st
    assert member_entry(st, a)["last_rebuild"]["copied_bytes"] == 2 * MiB
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b)


def test_reads_prefer_the_faster_member(env):
    """A member that turns slow (every I/O delayed 20 ms) loses the reads to
    the fast one: guarantee 2's latency rule, seen in the reads counters."""
    ffs, a, b, mnt, payload = _filled_volume(env)
    faultfs("set", ffs, "delay", "--delay", "0.02")
    before = {m["path"]: m["reads"] for m in status_json(mnt)["members"]}
    fd = os.open(mnt / "disk", os.O_RDONLY)
    try:
        rng = random.Random(3)
        for _ in range(200):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            off = rng.randrange(0, 32 * MiB // 4096) * 4096
            assert os.pread(fd, 4096, off) == payload[off:off + 4096]
    finally:
        os.close(fd)
    after = {m["path"]: m["reads"] for m in status_json(mnt)["members"]}
    slow, fast = after[str(a)] - before[str(a)], after[str(b)] - before[str(b)]
    assert fast > 10 * max(slow, 1), (slow, fast)
    faultfs("set", ffs, "ok")



def test_add_of_a_hung_path_gives_up_after_the_io_timeout(env):
    """`add` of a new image on a file system that hangs: the command fails
    after about --io-timeout, naming the path, instead of holding every
    other admin command (a spare's takeover too) for as long as the hang
    lasts; and when the hang ends, the add does not happen after all."""
    _, ffs = env.faultfs()
    a, b = env.create("a.img", "b.img", size="16M")
    s = env.path("s.img")
    mnt = env.mount(a, b, opts=["--io-timeout", "1.5"])
    raid1fs("add", "--spare", mnt, s)
    faultfs("set", ffs, "hang")
    t0 = time.monotonic()
    r = raid1fs("add", mnt, ffs / "new.img", check=False)
    elapsed = time.monotonic() - t0
    assert r.returncode not in (0, 2) and str(ffs / "new.img") in one_line(r.stderr), r.stderr
    assert "no answer within" in r.stderr and elapsed < 1.5 * 2 + 5, (elapsed, r.stderr)
    raid1fs("fail", mnt, a)  # the spare takes over at once: the admin lock is free
    wait_for(lambda: member_state(status_json(mnt), s) in ("rebuilding", "online"),
             timeout=10, what="the spare taking over")
    faultfs("set", ffs, "ok")
    time.sleep(1)
    assert str(ffs / "new.img") not in [m["path"] for m in status_json(mnt)["members"]]


def test_add_of_a_slow_path_that_answers_is_not_taken_for_a_hung_one(env):
    """`add` of a new image on a file system that answers every request,
    each 0.4 s late (a quarter of --io-timeout): the add's checks take
    several such requests, longer than the timeout in all, and the path is
    still added (the timeout applies to each request, not to the whole
    check). (Found by a chaos drill: refused as "no answer".)"""
    _, ffs = env.faultfs()
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mount(a, b, opts=["--io-timeout", "1.5"])
    raid1fs("fail", mnt, b)
    raid1fs("remove", mnt, b)
    faultfs("set", ffs, "delay", "--delay", "0.4")
    t0 = time.monotonic()
    r = raid1fs("add", mnt, ffs / "new.img", check=False)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed > 1.5, f"{elapsed:.1f} s: the checks did not outlast the timeout"
    faultfs("set", ffs, "ok")
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert member_state(st, ffs / "new.img") == "online", st["members"]


def test_a_hung_member_path_fails_mount_and_status_instead_of_hanging_them(env):
    """A member on a file system that hangs: `mount` fails after about
    --io-timeout, `status MEMBER...` after RAID1FS_IO_TIMEOUT, each with one
    line naming the path (status: exit 3, cannot tell); nothing is changed,
    and both work once the file system answers again."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    mnt = env.mkdir("mnt")
    env.cleanup.push(_unmount_raid1fs, str(mnt))
    before = sha256(b)
    faultfs("set", ffs, "hang")
    try:
        t0 = time.monotonic()
        r = raid1fs("mount", "--io-timeout", "2", a, b, mnt, check=False, timeout=60)
        assert time.monotonic() - t0 < 2 + 5
        assert r.returncode not in (0, 2) and "no answer within 2 s" in one_line(r.stderr)
        assert str(a) in one_line(r.stderr), r.stderr
        assert not os.path.ismount(mnt)
        t0 = time.monotonic()
        r = raid1fs("status", a, b, check=False, timeout=60,
                    env=dict(os.environ, RAID1FS_IO_TIMEOUT="2"))
        assert time.monotonic() - t0 < 2 + 5
        assert r.returncode == 3 and str(a) in one_line(r.stderr), r.stderr
    finally:
        faultfs("set", ffs, "ok")
    assert sha256(b) == before
    assert raid1fs("status", a, b, check=False).returncode == 0
    raid1fs("mount", a, b, mnt)
    raid1fs("umount", mnt)

def test_umount_says_so_when_a_member_fails_in_the_final_flush(env):
    """A member that hangs in the final flush of `raid1fs umount` is failed
    after --io-timeout: the unmount works (exit 0) and says that the volume
    is now degraded."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    mnt = env.mount(a, b, opts=["--io-timeout", "1.5"])
    with open(mnt / "disk", "r+b") as f:
        f.write(os.urandom(MiB))
    faultfs("set", ffs, "hang")
    r = raid1fs("umount", mnt, check=False)
    assert r.returncode == 0, r.stderr
    assert f"{a} failed while the mount shut down" in r.stderr, r.stderr
    faultfs("set", ffs, "ok")
    assert member_state(status_json(a, b), a) == "stale"


def _processes_with(*words: str) -> list[int]:
    """The pids whose command line has every one of `words` as an argument."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(w in argv for w in words):
            pids.append(int(name))
    return pids


def _in_mount_table(real_path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real_path for line in f)


def _interrupt_the_start(env, src, ffs, a, b, mnt, act) -> tuple[int, str, int]:
    """`raid1fs mount a b mnt` in the background, a.img on faultfs `ffs`
    (over `src`): once the FUSE mount exists and before the volume has
    started (start() writes the members' metadata), the file system under
    a.img is frozen, act(daemon pid) runs, and it is thawed. Returns the
    mount command's exit status and stderr, and the daemon's pid."""
    real_mnt = os.path.realpath(mnt)  # not once mounted: that waits for the start
    env.cleanup.push(_unmount_raid1fs, str(mnt))
    (ffs_pid,) = _processes_with("mount", str(src), str(ffs))
    faultfs("set", ffs, "delay", "--delay", "0.2")  # start() takes a while
    cmd = [sys.executable, "-m", "raid1fs", "mount", str(a), str(b), str(mnt)]
    mount = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    frozen = False
    try:
        # (Seen in the mount table alone: a stat of the mount point would
        # wait for the mount to serve requests, that is, for the start.)
        wait_for(lambda: _in_mount_table(real_mnt), timeout=60, what="the FUSE mount",
                 interval=0.002)
        os.kill(ffs_pid, signal.SIGSTOP)
        frozen = True
        daemon = [p for p in _processes_with("mount", str(mnt)) if p != mount.pid]
        assert len(daemon) == 1, daemon
        assert mount.poll() is None, "the mount was usable already: no start to interrupt"
        act(daemon[0])
        os.kill(ffs_pid, signal.SIGCONT)
        frozen = False
        _, err = mount.communicate(timeout=60)
    finally:
        if frozen:
            os.kill(ffs_pid, signal.SIGCONT)
        if mount.poll() is None:
            mount.kill()
    wait_for(lambda: process_gone(daemon[0]), timeout=30, what="the mount process to exit")
    faultfs("set", ffs, "ok")
    return mount.returncode, err, daemon[0]


def test_a_signal_while_the_volume_starts_unmounts_it_cleanly(env):
    """SIGTERM to the mount process while the volume is still starting (its
    metadata writes held up: the file system under a member is frozen): once
    started, the volume is unmounted cleanly, with no dead or hung FUSE mount
    left behind; `raid1fs mount` fails with one line saying why; every
    member is clean."""
    src, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    mnt = env.mkdir("mnt")

    def term(pid: int) -> None:
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)

    code, err, _ = _interrupt_the_start(env, src, ffs, a, b, mnt, term)
    assert code not in (0, 2)
    assert f"{mnt}: stopped by SIGTERM before the mount was usable" in one_line(err), err
    assert mounts_at(mnt) == [], "a FUSE mount was left behind"
    st = status_json(a, b)
    assert st["volume"]["state"] == "clean", st
    assert raid1fs("status", a, b, check=False).returncode == 0


def test_unmounted_while_it_starts_the_mount_fails_and_changes_nothing_under_it(env):
    """`fusermount3 -u` of the mount point while the volume is still
    starting: `raid1fs mount` fails saying so (it used to exit 0 with
    nothing mounted), and the readahead of the file system under the mount
    point is left as it was (it used to be set to raid1fs's 1024 KiB)."""
    src, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    img = env.path("under.img")
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    dev = env.losetup(img)
    run("mkfs.ext4", "-q", dev)
    mnt = env.mount_fs(dev, "under") / "mnt"
    mnt.mkdir()
    st = os.stat(mnt)
    ra = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    with open(ra) as f:
        ra_before = f.read()
    code, err, _ = _interrupt_the_start(env, src, ffs, a, b, mnt,
                                        lambda _: run("fusermount3", "-u", mnt, timeout=30))
    assert code not in (0, 2), err
    assert "unmounted again" in one_line(err), err
    with open(ra) as f:
        assert f.read() == ra_before
    assert status_json(a, b)["volume"]["state"] == "clean"


def test_a_signal_while_the_disk_is_in_use_does_not_unmount_it(env):
    """SIGTERM to the mount process while a loop device holds its disk: it
    does not pull the device from under the file system on it (which then
    lost what it had not written) but keeps serving and logs why, as
    `raid1fs umount` refuses; once the loop device is detached, SIGTERM
    unmounts cleanly."""
    (a, b), mnt = env.volume(size="32M")
    pid = status_json(mnt)["daemon"]["pid"]
    loop = env.losetup(mnt / "disk")
    data = os.urandom(MiB)
    with open(loop, "r+b") as f:
        f.write(data)  # in the loop device's page cache
        os.kill(pid, signal.SIGTERM)
        log = os.path.join(os.environ["RAID1FS_RUN_DIR"], control.mount_key(str(mnt)) + ".log")
        wait_for(lambda: "SIGTERM: not unmounting" in open(log).read()
                 or not os.path.ismount(mnt), timeout=30, what="the signal handled")
        assert os.path.ismount(mnt), "unmounted with its disk in use"
        os.fsync(f.fileno())
    assert status_json(mnt)["volume"]["state"] == "clean"
    run("losetup", "-d", loop)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: process_gone(pid), timeout=60, what="the mount process to exit")
    assert not os.path.ismount(mnt)
    st = status_json(a, b)
    assert st["volume"]["state"] == "clean" and st["volume"]["clean_shutdown"], st["volume"]
    off = st["members"][0]["data_offset"]
    assert sha256(a, off, MiB) == sha256(b, off, MiB) == hashlib.sha256(data).hexdigest()


def test_a_mount_still_shutting_down_keeps_its_mount_point_until_it_ends(env):
    """A mount process still shutting down after `fusermount3 -u` (its
    --on-event command has not finished) holds its mount point: a new
    mount there is refused in one line instead of stacking on it, and once
    the old one has ended the new mount works and answers `status` (the old
    one used to remove the new one's control socket as it ended)."""
    a, b = env.create("a.img", "b.img", size="16M")
    c, d = env.create("c.img", "d.img", size="16M")
    flag = env.path("go-on")
    mnt = env.mount(a, b, opts=["--on-event", f"while [ ! -e {flag} ]; do sleep 0.1; done"])
    pid = status_json(mnt)["daemon"]["pid"]
    raid1fs("fail", mnt, a)  # an event: its command runs until the flag is there
    run("fusermount3", "-u", mnt)
    wait_for(lambda: not os.path.ismount(mnt), what="the unmount")
    assert not process_gone(pid), "the mount process ended at once: nothing to test"
    r = raid1fs("mount", c, d, mnt, check=False)
    if r.returncode == 0:
        env.cleanup.push(_unmount_raid1fs, str(mnt))
    assert r.returncode not in (0, 2), r.stdout
    line = one_line(r.stderr)
    assert str(mnt) in line and "still shutting down" in line, line
    flag.touch()
    wait_for(lambda: process_gone(pid), timeout=30, what="the old mount process to exit")
    raid1fs("mount", c, d, mnt)
    assert status_json(mnt)["volume"]["state"] == "clean"
    raid1fs("umount", mnt)


def test_io_that_fails_on_every_member_reaches_the_caller_as_eio(env):
    """Both members on one faultfs that returns EIO for everything: a
    write, an fsync and a read of the disk each get EIO (no member could
    apply them), no member is failed for it (the last in-sync ones are
    kept) and the volume is not left unusable: once the file system
    answers again, writes and reads work and the members agree."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", ffs / "b.img", size="16M")
    mnt = env.mount(a, b)
    fd = os.open(mnt / "disk", os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)
    buf.write(os.urandom(MiB))
    try:
        faultfs("set", ffs, "eio")
        try:
            with pytest.raises(OSError) as e:
                os.pwritev(fd, [buf], 0)
            assert e.value.errno == errno.EIO
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno.EIO
            with pytest.raises(OSError) as e:
                os.preadv(fd, [mmap.mmap(-1, MiB)], 2 * MiB)
            assert e.value.errno == errno.EIO
            st = status_json(mnt)
            assert [m["state"] for m in st["members"]] == ["online", "online"], st["members"]
        finally:
            faultfs("set", ffs, "ok")
        assert os.pwritev(fd, [buf], 0) == MiB
        os.fsync(fd)
        back = mmap.mmap(-1, MiB)
        assert os.preadv(fd, [back], 0) == MiB and back[:] == buf[:]
    finally:
        os.close(fd)
    raid1fs("umount", mnt)
    st = status_json(a, b)
    assert st["volume"]["state"] == "clean", st
    assert data_region_hash(a) == data_region_hash(b)


def test_a_hung_member_does_not_stop_add_replace_or_fail_of_others(env):
    """A member hangs and is failed; its I/O is still stuck in the kernel.
    `replace` of it by an existing image, and `fail` of another member by
    another of its names, still work: members are matched by identities
    taken when they were opened, not by asking their files again (a stat of
    the hung one used to hang the command, which then blamed the healthy
    path for not answering)."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    mnt = env.mount(a, b, opts=["--io-timeout", "1.5"])
    c = env.path("c.img")
    with open(c, "wb") as f:
        f.truncate(32 * MiB)
    faultfs("set", ffs, "hang")
    try:
        with open(mnt / "disk", "r+b") as f:
            f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        assert member_state(status_json(mnt), a) == "failed"
        b_link = env.path("b-link")
        b_link.symlink_to(b)
        r = raid1fs("fail", mnt, b_link, check=False, timeout=60)  # found, while A still hangs
        assert r.returncode == 1 and "last in-sync member" in one_line(r.stderr), r.stderr
        r = raid1fs("replace", mnt, a, c, check=False, timeout=60)
        assert r.returncode == 0, r.stderr
        raid1fs("rebuild", "--wait", mnt, timeout=60)
        link = env.path("c-link")
        link.symlink_to(c)
        r = raid1fs("fail", mnt, link, check=False, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == f"{c}: failed", (r.stdout, r.stderr)
    finally:
        faultfs("set", ffs, "ok")
    st = status_json(mnt)
    assert member_state(st, b) == "online" and str(a) not in [m["path"] for m in st["members"]]


def test_umount_says_so_when_the_final_flush_fails_on_the_last_member(env):
    """B failed, A (the last in-sync member) hangs in the final flush of
    `raid1fs umount`: the unmount works (exit 0), but says that the members
    were not marked clean and the next mount resyncs (it used to say
    nothing), and that mount does."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    mnt = env.mount(a, b, opts=["--io-timeout", "1.5"])
    raid1fs("fail", mnt, b)
    with open(mnt / "disk", "r+b") as f:
        f.write(os.urandom(MiB))
    faultfs("set", ffs, "hang")
    try:
        r = raid1fs("umount", mnt, check=False, timeout=60)
    finally:
        faultfs("set", ffs, "ok")
    assert r.returncode == 0, r.stderr
    assert "the final flush failed" in r.stderr and "not marked clean" in r.stderr, r.stderr
    st = status_json(a, b)
    assert not st["volume"]["clean_shutdown"], st["volume"]
    mnt = env.mount(a, b, mp="mnt2")
    assert member_state(status_json(mnt), a) == "online"


def test_mount_degraded_leaves_out_a_member_that_does_not_answer(env):
    """`mount --degraded` with A on a hung file system: A is left out as if
    it were not there (said on stderr) and the volume mounts degraded from
    B, instead of being refused; without --degraded the mount is refused
    naming A. Back, A is stale and resynced."""
    _, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size="16M")
    mnt = env.mkdir("mnt")
    faultfs("set", ffs, "hang")
    try:
        r = raid1fs("mount", "--io-timeout", "1.5", a, b, mnt, check=False, timeout=60)
        assert r.returncode == 1 and str(a) in one_line(r.stderr), r.stderr
        env.cleanup.push(_unmount_raid1fs, str(mnt))
        r = raid1fs("mount", "--degraded", "--io-timeout", "1.5", a, b, mnt, timeout=60)
        assert f"{a}: no answer within 1.5 s; mounting without it (--degraded)" in r.stderr, \
            r.stderr
        assert r.stderr.count(str(a)) == 1, r.stderr
        st = status_json(mnt)
        assert st["volume"]["state"] == "degraded" and member_state(st, a) == "missing", st
        with open(mnt / "disk", "r+b") as f:
            f.write(os.urandom(MiB))
        raid1fs("umount", mnt)
    finally:
        faultfs("set", ffs, "ok")
    raid1fs("mount", a, b, mnt)
    raid1fs("rebuild", "--wait", mnt)
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b)


@pytest.mark.parametrize("opts", [["-o", "ro"], []], ids=["ro", "rw"])
def test_sigterm_to_a_foreground_mount_ends_it_cleanly_every_time(env, opts):
    """SIGTERM to `raid1fs mount -f`, several times over: the unmount it
    does ends the mount, which exits 0 with the members clean (a signal
    that was still being handled as the mount ended used to make it call
    into a closed FUSE session and die of SIGSEGV, now and then)."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mkdir("mnt")
    env.cleanup.push(_unmount_raid1fs, str(mnt))
    cmd = [sys.executable, "-m", "raid1fs", "mount", "-f", *opts, str(a), str(b), str(mnt)]
    for _ in range(4):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            wait_for(lambda: _in_mount_table(os.path.realpath(env.tmp)
                                             + "/mnt") and status_json(mnt), timeout=30,
                     what="the mount")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, (proc.returncode, err[-2000:])
        assert not os.path.ismount(mnt)
        assert status_json(a, b)["volume"]["clean_shutdown"]
