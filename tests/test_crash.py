"""Crash drills: the mount process killed with kill -9 mid-write (guarantee 5).

Each test kills the raid1fs daemon (the pid `status --json` reports) while a
writer *subprocess* is busy, so the kill reaches the writer only as the
errors of a dead FUSE connection. Then the same members are mounted again
and the test checks what guarantee 5 promises:

- the next mount notices the unclean shutdown and resyncs only what was in
  flight: a bounded resync, far less than the volume;
- afterwards the members' data regions are byte-identical;
- nothing a completed fsync covered is lost.

The last test drives the engine directly instead: it checks the ordering
(intent mark durable before data) at a moment no kill -9 can aim at.

Writers journal (in a file outside the mount) what they wrote *before* each
write is issued and what was covered by an fsync only *after* it returned.

Reproduce a run with RAID1FS_CRASH_SEED=<seed> (printed, and named in every
assertion); the kill moments come from the same seed, their effect on the
daemon's progress from the scheduler. Measurements (resync sizes and times)
are printed: run with `-s` or `-rP` to see them.

This file is also the writers' program: `python test_crash.py raw|ext4 ...`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import (
    MiB,
    data_region_hash,
    drop_cache,
    faultfs,
    is_dead_fuse,
    loop_backing,
    member_entry,
    mounts_at,
    one_line,
    process_gone,
    raid1fs,
    run,
    sha256,
    status_json,
    wait_for,
)

BLOCK = 4096
RAW_SIZE = 1024 * MiB
WINDOW_LO, WINDOW_HI = 256 * MiB, 384 * MiB  # groups 4 and 5 (64 MiB intent groups)
WINDOW = WINDOW_HI - WINDOW_LO
GROUP = 64 * MiB  # the volume covered by one write-intent mark
# Where one iteration's writer writes: one group, the other, both, or a few
# MiB straddling their boundary.
SUB_WINDOWS = [(256 * MiB, 320 * MiB), (320 * MiB, 384 * MiB), (WINDOW_LO, WINDOW_HI),
               (312 * MiB, 328 * MiB)]
RAW_ITERATIONS = 10
EXT4_SIZE = 512 * MiB
EXT4_ITERATIONS = 3
WRITER_IO_ERROR = 3  # a writer's exit status when the dead mount failed its I/O
DEAD_CONNECTION = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.EROFS}
MAGIC = b"R1CRASH!"


def master_seed() -> int:
    s = os.environ.get("RAID1FS_CRASH_SEED")
    return int(s) if s else random.SystemRandom().randrange(1 << 32)


# ----- the writers (run as `python test_crash.py ...`) -------------------------


def block_data(seed: int, seq: int, off: int, length: int) -> bytes:
    """Write number `seq`'s content: random, every 4K block stamped with
    (seed, seq, volume offset), so a block read back names its write."""
    data = bytearray(random.Random(f"{seed}:{seq}").randbytes(length))
    for i in range(0, length, BLOCK):
        data[i:i + 32] = struct.pack("<8sQQQ", MAGIC, seed, seq, off + i)
    return bytes(data)


def describe_block(b: bytes | bytearray) -> str:
    if b[:8] == MAGIC:
        _, seed, seq, off = struct.unpack("<8sQQQ", b[:32])
        return f"write #{seq} of seed {seed}, stamped for offset {off}"
    if b == bytes(len(b)):
        return "zeros"
    return f"unknown content {b[:16].hex()}..."


def _raw_writer(disk: str, journal: str, seed: int, lo: int, hi: int) -> int:
    """Random writes (4K..1M, 4K-aligned) inside [lo, hi), an fsync every 1-4
    writes. Journal lines: `W seq off len sha256` before a write is issued,
    `S seq` once an fsync that followed write `seq` returned."""
    rng = random.Random(seed)
    j = open(journal, "a", buffering=1)
    fd = os.open(disk, os.O_RDWR)
    seq = 0
    since_sync, sync_every = 0, rng.randint(1, 4)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            seq += 1
            r = rng.random()
            if r < 0.5:
                blocks = rng.randint(1, 16)
            elif r < 0.85:
                blocks = rng.randint(17, 64)
            else:
                blocks = rng.randint(65, 256)
            length = blocks * BLOCK
            off = lo + rng.randrange((hi - lo - length) // BLOCK + 1) * BLOCK
            data = block_data(seed, seq, off, length)
            j.write(f"W {seq} {off} {length} {hashlib.sha256(data).hexdigest()}\n")
            done = 0
            while done < length:
                done += os.pwrite(fd, data[done:], off + done)
            since_sync += 1
            if since_sync >= sync_every:
                os.fsync(fd)
                j.write(f"S {seq}\n")
                since_sync, sync_every = 0, rng.randint(1, 4)
    except OSError as e:
        j.write(f"E {e.errno} {e.strerror}\n")
        return WRITER_IO_ERROR
    return 0


def _ext4_writer(root: str, journal: str, seed: int) -> int:
    """Files in `root` (0 B .. 2 MiB); each written, fsynced, its directory
    fsynced, and only then journalled as `F relpath sha256`."""
    rng = random.Random(seed)
    j = open(journal, "a", buffering=1)
    deadline = time.monotonic() + 60
    try:
        os.makedirs(root, exist_ok=True)
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        pfd = os.open(os.path.dirname(root), os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(pfd)
        i = 0
        while time.monotonic() < deadline:
            r = rng.random()
            size = (rng.randint(0, 4 << 10) if r < 0.4 else rng.randint(4 << 10, 256 << 10)
                    if r < 0.9 else rng.randint(256 << 10, 2 * MiB))
            data = rng.randbytes(size)
            name = f"f{i:05d}"
            fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                done = 0
                while done < size:
                    done += os.write(fd, data[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dfd)
            j.write(f"F {os.path.basename(root)}/{name} {hashlib.sha256(data).hexdigest()}\n")
            i += 1
    except OSError as e:
        j.write(f"E {e.errno} {e.strerror}\n")
        return WRITER_IO_ERROR
    return 0


# ----- helpers --------------------------------------------------------------------


def _stop_process(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
        p.wait(timeout=30)


def _umount_dead_fs(mp: Path) -> str:
    """Unmount a file system whose device died; returns how."""
    how = "umount"
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=60)
    if r.returncode:
        run("umount", "-l", mp)
        how = f"umount -l ({r.stderr.strip()})"
    assert not os.path.ismount(mp)
    return how


def kill_daemon(mnt: Path) -> int:
    """kill -9 the mount process; return once it is dead and its FUSE
    connection gone."""
    pid = status_json(mnt)["daemon"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), timeout=30, what=f"mount process {pid} to die")
    wait_for(lambda: is_dead_fuse(mnt), timeout=10, what="the FUSE connection to drop")
    return pid


def crash_volume(env, size: int) -> tuple[int, random.Random, list[Path], Path]:
    """A drill's start: the master seed (printed, to reproduce the run) and a
    generator seeded with it; members a and b of a `size`-byte disk volume,
    mounted."""
    seed0 = master_seed()
    print(f"\nRAID1FS_CRASH_SEED={seed0}")
    members = env.create("a.img", "b.img", size=f"{size // MiB}M")
    return seed0, random.Random(seed0), members, env.mount(*members)


def start_writer(env, *args: object) -> subprocess.Popen:
    log = open(env.path(f"writer-{time.monotonic_ns()}.log"), "w")
    p = subprocess.Popen([sys.executable, __file__, *map(str, args)], stdout=log,
                         stderr=subprocess.STDOUT, cwd=env.tmp)
    log.close()
    env.cleanup.push(_stop_process, p)
    return p


def read_journal(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def wait_for_journal(writer: subprocess.Popen, journal: Path, kind: str, ctx: str) -> None:
    def ready() -> bool:
        assert writer.poll() is None, f"{ctx}: writer exited early ({writer.returncode}): " \
            f"{read_journal(journal)[-3:]}"
        return any(rec[0] == kind for rec in read_journal(journal))
    wait_for(ready, timeout=60, what=f"{ctx}: the writer's first {kind!r} record")


def writer_under_way(env, first: str, delay: float, ctx: str, mode: str, target: Path,
                     journal: Path, *args: object) -> subprocess.Popen:
    """Start a `mode` writer on `target`, journalling to `journal`, and return
    it `delay` seconds after its first `first` record, still writing."""
    writer = start_writer(env, mode, target, journal, *args)
    wait_for_journal(writer, journal, first, ctx)
    time.sleep(delay)
    assert writer.poll() is None, f"{ctx}: the writer finished before the kill"
    return writer


def finish_writer(writer: subprocess.Popen, journal: Path, ctx: str) -> str:
    """The writer must end on the dead mount's I/O error, not on a bug of its own."""
    try:
        writer.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{ctx}: writer still blocked 60 s after the kill") from None
    recs = read_journal(journal)
    assert writer.returncode == WRITER_IO_ERROR, \
        f"{ctx}: writer exited {writer.returncode}, journal tail {recs[-3:]}"
    assert recs and recs[-1][0] == "E" and int(recs[-1][1]) in DEAD_CONNECTION, \
        f"{ctx}: unexpected writer error {recs[-1:]}"
    return " ".join(recs[-1][2:])


def remount(members: list[Path], mnt: Path, ctx: str, opts=()) -> float:
    """Mount the same members on the dead mount point; the dead mount must be
    detached, not stacked under the new one."""
    t0 = time.monotonic()
    raid1fs("mount", *opts, *members, mnt)
    took = time.monotonic() - t0
    assert mounts_at(mnt) == ["fuse.raid1fs"], f"{ctx}: mounts at {mnt}: {mounts_at(mnt)}"
    assert not is_dead_fuse(mnt)
    return took


def resync_report(mnt: Path, members: list[Path], ctx: str) -> dict:
    """Right after the remount: what status shows; then `rebuild --wait`; then
    the finished resync. Returns the measurements."""
    st0 = status_json(mnt)
    seen_total = [member_entry(st0, p)["rebuild"]["total_bytes"] for p in members
                  if member_entry(st0, p)["rebuild"]]
    intent = st0["volume"]["regions"]["intent_bytes"]
    r = raid1fs("rebuild", "--wait", mnt, check=False, timeout=120)
    assert r.returncode == 0, f"{ctx}: rebuild --wait exited {r.returncode}: {r.stdout} {r.stderr}"
    st = status_json(mnt)
    assert st["volume"]["state"] == "clean", f"{ctx}: {st['volume']}"
    for p in members:
        mem = member_entry(st, p)
        assert mem["state"] == "online" and mem["rebuild"] is None, f"{ctx}: {mem}"
        assert mem["errors"] == {"read": 0, "write": 0, "checksum": 0}, f"{ctx}: {mem}"
    done = [(str(p), member_entry(st, p)["last_rebuild"]) for p in members
            if member_entry(st, p)["last_rebuild"]]
    assert len(done) <= len(members) - 1, f"{ctx}: every member was resynced: {done}"
    for path, lr in done:
        assert lr["kind"] == "resync", f"{ctx}: {path} had a {lr['kind']} rebuild after a crash"
    return {"status_total_bytes": seen_total, "intent_bytes_at_mount": intent,
            "copied_bytes": sum(lr["copied_bytes"] for _, lr in done),
            "seconds": sum(lr["seconds"] for _, lr in done),
            "resynced": [p for p, _ in done]}


def _first_diff(a: bytes, b: bytes) -> int | None:
    """Offset of the first 4K block where a and b differ, or None."""
    for c in range(0, max(len(a), len(b)), MiB):
        if a[c:c + MiB] != b[c:c + MiB]:
            for i in range(c, c + MiB, BLOCK):
                if a[i:i + BLOCK] != b[i:i + BLOCK]:
                    return i
    return None


def members_identical(members: list[Path], expected: str | None, ctx: str) -> None:
    st = status_json(*members)
    assert st["volume"]["clean_shutdown"] is True, f"{ctx}: {st['volume']}"
    with ThreadPoolExecutor(len(members)) as ex:
        hashes = list(ex.map(lambda p: data_region_hash(p, st), members))
    assert len(set(hashes)) == 1, f"{ctx}: members' data regions differ: " \
        f"{dict(zip(map(str, members), hashes, strict=True))}"
    if expected is not None:
        assert hashes[0] == expected, f"{ctx}: data regions hold something else than was written"


# ----- raw disk ---------------------------------------------------------------------


def check_window(disk: Path, known: bytes, journal: Path, seed: int, ctx: str
                 ) -> tuple[bytes, dict]:
    """Read the window back and hold it against the journal.

    Every block whose last write was followed by a completed fsync must hold
    exactly that write; a block touched by a write after the last completed
    fsync may hold its previous content or any of those writes; every other
    block must be as it was before. Returns the window and counts."""
    recs = read_journal(journal)
    synced = max((int(r[1]) for r in recs if r[0] == "S"), default=0)
    expected = bytearray(known)
    loose: dict[int, list[bytes]] = {}  # block -> acceptable contents
    unsynced = []
    nwrites = 0
    for r in recs:
        if r[0] != "W":
            continue
        nwrites += 1
        seq, off, length = int(r[1]), int(r[2]), int(r[3])
        data = block_data(seed, seq, off, length)
        assert hashlib.sha256(data).hexdigest() == r[4], f"{ctx}: journal/generator mismatch"
        rel = off - WINDOW_LO
        if seq <= synced:
            expected[rel:rel + length] = data
        else:
            unsynced.append((rel, data))
    for rel, data in unsynced:
        for i in range(0, len(data), BLOCK):
            b = (rel + i) // BLOCK
            loose.setdefault(b, [bytes(expected[rel + i:rel + i + BLOCK])]).append(
                data[i:i + BLOCK])
    drop_cache(disk)
    with open(disk, "rb") as f:
        f.seek(WINDOW_LO)
        actual = f.read(WINDOW)
    assert len(actual) == WINDOW
    bad = []
    new_blocks = 0
    for c in range(0, WINDOW, MiB):
        if actual[c:c + MiB] == expected[c:c + MiB]:
            continue
        for i in range(c, c + MiB, BLOCK):
            a, e = actual[i:i + BLOCK], expected[i:i + BLOCK]
            if a == e:
                continue
            if a in loose.get(i // BLOCK, ()):
                new_blocks += 1
                continue
            bad.append(f"offset {WINDOW_LO + i}: holds {describe_block(a)}, "
                       f"expected {describe_block(e)}"
                       + (" (or an unsynced write)" if i // BLOCK in loose else ""))
    assert not bad, f"{ctx}: {len(bad)} blocks lost or corrupted (fsynced up to #{synced} of " \
        f"{nwrites} writes): " + "; ".join(bad[:8])
    return actual, {"writes": nwrites, "fsynced_through": synced,
                    "unsynced_writes": len(unsynced), "unsynced_blocks_landed": new_blocks}


def test_kill9_during_raw_writes_resyncs_only_the_window(env):
    """A 1 GiB disk volume; a writer subprocess writes random 4K..1M blocks
    inside part of [256 MiB, 384 MiB) (64 MiB intent group 4, group 5, both,
    or 16 MiB straddling them) with an fsync every 1-4 writes; the mount
    process is killed with kill -9 at a random moment 0.3-2.5 s into the
    workload, ten times over (every other time the next workload starts on
    the resynced mount, with the crash's intent bits still set).
    Proves each time: offline status says the shutdown was not clean; the
    next mount detaches the dead mount and resyncs one member over more than
    nothing and at most the groups written (plus those the previous crash
    left marked), never the 1 GiB; every fsynced block reads back intact,
    blocks not written since read back unchanged, and an unsynced block holds
    its old content or one of its new ones; after umount the members' data
    regions are identical and hold exactly that."""
    seed0, rng, members, mnt = crash_volume(env, RAW_SIZE)
    disk = mnt / "disk"
    zeros = bytes(4 * MiB)
    prefix = hashlib.sha256()
    for _ in range(WINDOW_LO // len(zeros)):
        prefix.update(zeros)
    known = bytes(WINDOW)
    results = []
    carried: set[int] = set()  # groups an earlier crash's resync may still hold marked
    for it in range(RAW_ITERATIONS):
        seed, delay = rng.randrange(1 << 31), rng.uniform(0.3, 2.5)
        lo, hi = rng.choice(SUB_WINDOWS)
        groups = set(range(lo // GROUP, (hi - 1) // GROUP + 1))
        bound = len(groups | carried) * GROUP
        ctx = f"iteration {it} (RAID1FS_CRASH_SEED={seed0}, writer seed {seed}, writes in " \
              f"[{lo // MiB}, {hi // MiB}) MiB, kill {delay:.2f} s after the first fsync)"
        journal = env.path(f"journal-{it}")
        writer = writer_under_way(env, "S", delay, ctx, "raw", disk, journal, seed, lo, hi)
        kill_daemon(mnt)
        err = finish_writer(writer, journal, ctx)
        off = status_json(*members)
        assert off["volume"]["clean_shutdown"] is False, f"{ctx}: {off['volume']}"

        mount_s = remount(members, mnt, ctx)
        rs = resync_report(mnt, members, ctx)
        assert 0 < rs["copied_bytes"] <= bound, \
            f"{ctx}: resync copied {rs['copied_bytes']} bytes; writes in flight were all " \
            f"inside {bound} bytes of {bound // GROUP} intent groups of a {RAW_SIZE}-byte volume"
        assert len(rs["resynced"]) == 1, f"{ctx}: {rs}"
        known, counts = check_window(disk, known, journal, seed, ctx)

        full = it % 2 == 0 or it == RAW_ITERATIONS - 1
        if full:
            raid1fs("umount", mnt)
            h = prefix.copy()
            h.update(known)
            for _ in range((RAW_SIZE - WINDOW_HI) // len(zeros)):
                h.update(zeros)
            members_identical(members, h.hexdigest(), ctx)
            if it != RAW_ITERATIONS - 1:
                raid1fs("mount", *members, mnt)
            carried = set()
        else:
            carried = groups | carried  # marked again at the remount, cleared when idle
        res = {"iteration": it, "writer_seed": seed, "kill_after_s": round(delay, 2),
               "window_mib": [lo // MiB, hi // MiB], "bound_bytes": bound,
               "writer_error": err, "mount_s": round(mount_s, 2), **rs, **counts,
               "umounted": full}
        results.append(res)
        print("crash", json.dumps(res))
    print("copied MiB per crash:", [r["copied_bytes"] / MiB for r in results])


def test_kill9_during_the_resync_of_a_crash(env):
    """A crash, then a second kill -9 while the resync of the first is under
    way (slowed to 8 MiB/s) and a new writer is busy. After the first kill,
    member b is given a legal divergence: one more journalled, never fsynced
    write that reached b only (as a write in flight may), inside a marked
    group. Proves: right after the remount status shows b rebuilding, a
    resync of at most the window; every read during the resync matches the
    journal and the source's copy (b serves nothing it does not hold yet, so
    no read returns what the resync then undoes); after the second kill b is
    still recorded rebuilding (offline status); the third mount finishes the
    resync within the window; every fsynced block of both workloads is
    intact and the members end identical."""
    seed0, rng, members, mnt = crash_volume(env, RAW_SIZE)
    disk = mnt / "disk"
    known = bytes(WINDOW)
    out = {}
    t_remount = 0.0
    for round_ in range(2):
        seed, delay = rng.randrange(1 << 31), rng.uniform(0.3, 1.0)
        ctx = f"round {round_} (RAID1FS_CRASH_SEED={seed0}, writer seed {seed}, " \
              f"kill {delay:.2f} s after the first fsync)"
        journal = env.path(f"journal-{round_}")
        writer = writer_under_way(env, "S", delay, ctx, "raw", disk, journal, seed,
                                  WINDOW_LO, WINDOW_HI)
        if round_ == 1:
            st = status_json(mnt)
            now = [member_entry(st, p)["rebuild"] for p in members]
            assert any(x and x["running"] and x["done_bytes"] < x["total_bytes"] for x in now), \
                f"{ctx}: the resync is no longer running at the second kill: {now}"
            out["done_at_second_kill"] = max(x["done_bytes"] for x in now if x)
            out["second_kill_after_remount_s"] = round(time.monotonic() - t_remount, 2)
        kill_daemon(mnt)
        finish_writer(writer, journal, ctx)
        off = status_json(*members)
        assert off["volume"]["clean_shutdown"] is False, f"{ctx}: {off['volume']}"
        if round_ == 0:
            # Make the crash's divergence visible: a write "in flight" that
            # reached b only (journalled, never fsynced, so either version is
            # legal), over the last fsynced write, whose group is marked.
            recs = read_journal(journal)
            synced = max(int(r[1]) for r in recs if r[0] == "S")
            ws = [r for r in recs if r[0] == "W"]
            target = max((r for r in ws if int(r[1]) <= synced), key=lambda r: int(r[2]))
            fseq, foff = int(ws[-1][1]) + 1, int(target[2])
            flen = min(int(target[3]), 64 * BLOCK)
            fake = block_data(seed, fseq, foff, flen)
            with open(journal, "a") as j:
                j.write(f"W {fseq} {foff} {flen} {hashlib.sha256(fake).hexdigest()}\n")
            with open(members[1], "r+b") as f:
                os.pwrite(f.fileno(), fake, member_entry(off, members[1])["data_offset"] + foff)
                os.fsync(f.fileno())
            out["diverged_at"] = [foff, flen]
            remount(members, mnt, ctx, opts=("--max-rebuild-rate", "8M"))
            t_remount = time.monotonic()
            st = status_json(mnt)
            rb = {str(p): member_entry(st, p)["rebuild"] for p in members}
            resyncing = [p for p, r in rb.items() if r]
            assert len(resyncing) == 1, f"{ctx}: {rb}"
            r = rb[resyncing[0]]
            assert r["kind"] == "resync" and 0 < r["total_bytes"] <= WINDOW, f"{ctx}: {r}"
            assert member_entry(st, resyncing[0])["state"] == "rebuilding"
            assert st["volume"]["state"] == "rebuilding"
            out["first_resync_total"] = r["total_bytes"]
            known, _ = check_window(disk, known, journal, seed, ctx + ", read mid-resync")
            # What the mount served mid-resync is the source's copy, which the
            # resync gives b: no read returned what the resync then undid.
            src = next(p for p in members if str(p) != resyncing[0])
            with open(src, "rb") as f:
                f.seek(member_entry(off, src)["data_offset"] + WINDOW_LO)
                held = f.read(WINDOW)
            diff = _first_diff(held, known)
            assert diff is None, f"{ctx}: a read mid-resync at {WINDOW_LO + diff} returned " \
                f"{describe_block(known[diff:diff + BLOCK])}; the source holds " \
                f"{describe_block(held[diff:diff + BLOCK])}"
            got = known[foff - WINDOW_LO:foff - WINDOW_LO + flen]
            out["read_mid_resync"] = "b's diverged copy" if got == fake else "the source's copy"
            assert member_entry(status_json(mnt), resyncing[0])["rebuild"]["done_bytes"] < \
                r["total_bytes"], f"{ctx}: the resync was over before the read"
        else:
            states = {m["path"]: m["state"] for m in off["members"]}
            assert states[resyncing[0]] == "rebuilding", f"{ctx}: {states}"
            remount(members, mnt, ctx)
            rs = resync_report(mnt, members, ctx)
            assert rs["resynced"] == resyncing, f"{ctx}: {rs}"
            assert 0 < rs["copied_bytes"] <= WINDOW, f"{ctx}: {rs}"
            out["second_resync"] = rs
            known, _ = check_window(disk, known, journal, seed, ctx)
    raid1fs("umount", mnt)
    h = hashlib.sha256()
    zeros = bytes(4 * MiB)
    for _ in range(WINDOW_LO // len(zeros)):
        h.update(zeros)
    h.update(known)
    for _ in range((RAW_SIZE - WINDOW_HI) // len(zeros)):
        h.update(zeros)
    members_identical(members, h.hexdigest(), "after the second crash")
    print("crash-during-resync", json.dumps(out))


# ----- ext4 ---------------------------------------------------------------------------


def test_kill9_under_ext4_loses_no_fsynced_file(env):
    """ext4 on a 512 MiB disk volume (loop device); a writer subprocess
    creates files (0 B .. 2 MiB), fsyncing each and its directory before
    journalling it; the raid1fs process is killed with kill -9 mid-workload,
    three times. After each kill the dead stack (ext4 over a loop device over
    the dead FUSE file) is taken down without leaking the loop device, the
    volume is mounted again and resynced, ext4 replays its journal, and every
    file journalled in any round reads back with its hash; e2fsck -fn is
    clean, and after umount the members' data regions are identical."""
    seed0, rng, members, mnt = crash_volume(env, EXT4_SIZE)
    loop = env.losetup(mnt / "disk")
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
    files: dict[str, str] = {}
    results = []
    for it in range(EXT4_ITERATIONS):
        seed, delay = rng.randrange(1 << 31), rng.uniform(0.3, 2.0)
        ctx = f"ext4 round {it} (RAID1FS_CRASH_SEED={seed0}, writer seed {seed}, " \
              f"kill {delay:.2f} s after the first file)"
        data = env.mount_fs(loop, "data")
        journal = env.path(f"journal-{it}")
        writer = writer_under_way(env, "F", delay, ctx, "ext4", data / f"r{it}", journal, seed)
        kill_daemon(mnt)
        err = finish_writer(writer, journal, ctx)

        # Take the dead stack down: ext4, then the loop device over the dead file.
        how = _umount_dead_fs(data)
        run("losetup", "-d", loop)
        wait_for(lambda dev=loop: loop_backing(dev) is None, timeout=30,
                 what=f"{ctx}: {loop} over the dead mount to be released")
        assert status_json(*members)["volume"]["clean_shutdown"] is False, ctx

        mount_s = remount(members, mnt, ctx)
        rs = resync_report(mnt, members, ctx)
        assert rs["copied_bytes"] > 0, f"{ctx}: ext4 was writing, yet nothing resynced: {rs}"
        loop = env.losetup(mnt / "disk")
        data = env.mount_fs(loop, "data")  # replays the ext4 journal
        new = {r[1]: r[2] for r in read_journal(journal) if r[0] == "F"}
        assert not set(new) & set(files)
        files.update(new)
        bad = []
        for rel, want in files.items():
            try:
                got = sha256(data / rel)
            except OSError as e:
                got = f"{e!r}"
            if got != want:
                bad.append(f"{rel}: {got}")
        assert not bad, f"{ctx}: {len(bad)} of {len(files)} fsynced files lost or " \
            f"damaged: {bad[:8]}"
        run("umount", data)
        fsck = run("e2fsck", "-fn", loop, check=False)
        assert fsck.returncode == 0, f"{ctx}: e2fsck -fn: {fsck.returncode}\n{fsck.stdout}"
        run("losetup", "-d", loop)
        wait_for(lambda dev=loop: loop_backing(dev) is None, timeout=30,
                 what=f"{loop} detached")
        raid1fs("umount", mnt)
        members_identical(members, None, ctx)
        res = {"round": it, "writer_seed": seed, "kill_after_s": round(delay, 2),
               "writer_error": err, "dead_ext4": how, "mount_s": round(mount_s, 2), **rs,
               "files_fsynced": len(new), "files_total": len(files)}
        results.append(res)
        print("crash", json.dumps(res))
        raid1fs("mount", *members, mnt)
        loop = env.losetup(mnt / "disk")
    run("losetup", "-d", loop)
    raid1fs("umount", mnt)
    st = status_json(*members)
    dev = env.losetup(members[1], offset=st["members"][1]["data_offset"], readonly=True)
    run("e2fsck", "-fn", dev)


# ----- idle -------------------------------------------------------------------------------


def test_kill9_after_idle_resyncs_nothing(env):
    """Writes, an fsync, then nothing: status shows the write-intent bits set
    at once and cleared only after seconds of quiet (lazily). A kill -9 after
    they were cleared is still an unclean shutdown, but the next mount finds
    nothing that was in flight: no member rebuilding, no resync at all, and
    the members are identical with the fsynced data."""
    members = env.create("a.img", "b.img", size="1G")
    mnt = env.mount(*members)
    payload = random.Random(5).randbytes(8 * MiB)
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        os.pwrite(fd, payload, 300 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    t_write = time.monotonic()
    intent = status_json(mnt)["volume"]["regions"]["intent_bytes"]
    assert 0 < intent <= 128 * MiB, intent
    wait_for(lambda: status_json(mnt)["volume"]["regions"]["intent_bytes"] == 0, timeout=30,
             what="the write-intent bits to be cleared", interval=0.5)
    cleared_after = time.monotonic() - t_write
    assert cleared_after >= 3.0, f"intent bits cleared {cleared_after:.1f} s after the write"
    time.sleep(max(0.0, 7.0 - cleared_after) + 1.0)  # idle ~7 s; the clearing is on disk
    kill_daemon(mnt)
    assert status_json(*members)["volume"]["clean_shutdown"] is False

    remount(members, mnt, "after idle kill")
    st = status_json(mnt)
    assert st["volume"]["state"] == "clean", st["volume"]
    for p in members:
        mem = member_entry(st, p)
        assert mem["state"] == "online", mem
        assert mem["rebuild"] is None and mem["last_rebuild"] is None, mem
    r = raid1fs("rebuild", "--wait", mnt)
    assert "nothing to rebuild" in r.stdout, r.stdout
    st = status_json(mnt)
    assert all(member_entry(st, p)["last_rebuild"] is None for p in members), st["members"]
    drop_cache(mnt / "disk")
    with open(mnt / "disk", "rb") as f:
        f.seek(300 * MiB)
        assert f.read(len(payload)) == payload
    raid1fs("umount", mnt)
    members_identical(members, None, "after idle kill")
    print(f"\nintent bits: {intent / MiB:.0f} MiB set, cleared {cleared_after:.1f} s after "
          "the last write; resync after the idle kill: none")


# ----- the ordering a kill -9 can hardly hit -------------------------------------------


def test_a_member_missing_after_a_crash_is_resynced_over_the_crash_regions(env):
    """A crash leaves a region where the members may differ (its intent bit
    set); the next mount has only A (--degraded). When B comes back, it is
    sent that region too, not only what A wrote alone: the crash's regions
    go into the missed-writes bitmap. (A write that reached A alone before
    the kill stands in as A's copy changed behind raid1fs's back.)"""
    a, b = env.create("a.img", "b.img", size="64M")
    mnt = env.mount(a, b)
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        os.pwrite(fd, b"W" * MiB, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert status_json(mnt)["volume"]["regions"]["intent_bytes"] > 0
    kill_daemon(mnt)  # within the intent bits' linger: they stay set
    raid1fs("umount", mnt)
    off = status_json(a)["members"][0]["data_offset"]
    with open(a, "r+b") as f:  # in flight at the kill: reached A only
        f.seek(off)
        f.write(b"X" * 4096)
    raid1fs("mount", "--degraded", a, mnt)
    raid1fs("umount", mnt)
    raid1fs("mount", a, b, mnt)
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert member_entry(st, b)["last_rebuild"]["copied_bytes"] >= MiB, st["members"]
    raid1fs("umount", mnt)
    members_identical([a, b], None, "after the crash and a degraded mount")


def test_after_kill9_offline_status_and_umount_tell_the_truth(env):
    """After kill -9 with writes in flight: offline status says the members
    are not known to be in sync (exit 1, the resync pending, named in the
    human form); `raid1fs umount` of the dead mount detaches it and says the
    members were not marked clean; the next mount resyncs that much."""
    members = env.create("a.img", "b.img", size="256M")
    mnt = env.mount(*members)
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * MiB, 100 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    kill_daemon(mnt)

    r = raid1fs("status", "--json", *members, check=False)
    assert r.returncode == 1, r.stdout
    v = json.loads(r.stdout)["volume"]
    assert v["clean_shutdown"] is False and v["state"] == "rebuilding", v
    assert v["resync_pending_bytes"] == 64 * MiB == v["regions"]["intent_bytes"], v
    human = raid1fs("status", *members, check=False).stdout
    assert "resync: 64.0M" in human and "next mount" in human, human

    r = raid1fs("umount", mnt)
    assert "not marked clean" in r.stderr and len(r.stderr.strip().splitlines()) == 2, r.stderr
    assert not mounts_at(mnt)

    raid1fs("mount", *members, mnt)
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    copied = [member_entry(st, p)["last_rebuild"] for p in members]
    assert [c["copied_bytes"] for c in copied if c] == [64 * MiB], copied
    raid1fs("umount", mnt)
    assert status_json(*members)["volume"]["state"] == "clean"


def test_a_command_whose_mount_is_killed_mid_way_says_so(env):
    """`add` waiting on a slow new member when the mount gets kill -9: the
    command fails in one line saying the mount ended before answering and
    that whether the add happened is not known (status tells)."""
    src, ffs = env.faultfs()
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mount(a, b)
    faultfs("set", ffs, "delay", "--delay", "1")
    try:
        add = subprocess.Popen([sys.executable, "-m", "raid1fs", "add", str(mnt),
                                str(ffs / "c.img")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        # The mount has taken the request once it made the image (each call
        # on it then takes a second): kill it while it writes c's metadata.
        wait_for(lambda: (src / "c.img").exists(), timeout=30, what="the add to make c.img")
        time.sleep(0.5)
        kill_daemon(mnt)
        _, err = add.communicate(timeout=60)
    finally:
        faultfs("set", ffs, "ok")
    assert add.returncode not in (0, 2), err
    line = one_line(err)
    assert f"{mnt}: the mount process ended before answering (killed?)" in line, line
    assert "whether the add happened is not known" in line, line
    raid1fs("umount", mnt, check=False)


def test_write_into_a_group_being_marked_waits_for_the_mark(tmp_path, monkeypatch):
    """Write 1 starts a group's write-intent mark (its bitmap write is slow);
    write 2 goes to another region of the same group meanwhile. Write 2's
    data must not reach any member before the mark is durable on every
    member: a crash in between, with write 2 on one member only, would find
    no mark and resync nothing, leaving the members different (guarantee 5).
    The window is a few milliseconds, so the kill -9 drills above cannot aim
    at it; the engine is driven directly (no FUSE), the bitmap write slowed."""
    import trio

    import raid1fs.volume as volume_mod
    from raid1fs.assemble import assemble, close_all, read_members
    from raid1fs.bitmap import Bitmap
    from raid1fs.create import create_disk
    from raid1fs.regions import write_spans
    from raid1fs.superblock import read_bitmaps
    from raid1fs.volume import Volume

    paths = [str(tmp_path / "a.img"), str(tmp_path / "b.img")]
    create_disk(paths, "t", 256 * MiB, True, False)
    found = read_members(paths)
    vol = Volume(assemble(found))
    rl = vol.regions
    seen: list[tuple[int, list[bool]]] = []  # (volume offset, mark durable on each member)

    def marks_on_disk(offset: int) -> list[bool]:
        out = []
        for x in vol.members:
            raw, _ = read_bitmaps(x.fd, x.sb)
            out.append(Bitmap(rl.nregions, rl.nbytes, raw).test(offset // rl.region))
        return out

    def slow_write_spans(fd, spans):
        time.sleep(0.4)
        write_spans(fd, spans)

    real_pwrite = volume_mod.pwrite_full

    def watched_pwrite(fd, data, offset, sync):
        seen.append((offset - vol.members[0].data_offset, marks_on_disk(offset)))
        return real_pwrite(fd, data, offset, sync)

    async def scenario() -> None:
        await vol.start()
        monkeypatch.setattr(volume_mod, "write_spans", slow_write_spans)
        monkeypatch.setattr(volume_mod, "pwrite_full", watched_pwrite)

        async def write2() -> None:
            await trio.sleep(0.1)  # write 1's bitmap write is under way
            await vol.write(3 * MiB, b"2" * BLOCK)

        async with trio.open_nursery() as n:
            n.start_soon(vol.write, 0, b"1" * BLOCK)
            n.start_soon(write2)
        monkeypatch.undo()
        await vol.shutdown()

    try:
        trio.run(scenario)
    finally:
        close_all(found)
    w2 = [marks for off, marks in seen if off == 3 * MiB]
    assert len(w2) == 2, seen  # one data write per member
    assert all(all(m) for m in w2), \
        f"write 2 reached the members while its group's intent mark was durable on: {w2}"


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "raw":
        sys.exit(_raw_writer(args[0], args[1], int(args[2]), int(args[3]), int(args[4])))
    if mode == "ext4":
        sys.exit(_ext4_writer(args[0], args[1], int(args[2])))
    sys.exit(f"unknown mode {mode}")


def test_a_read_only_mount_after_a_crash_reads_one_member_and_changes_none(env):
    """kill -9 right after a write, B's copy of it then made different (as
    if the write had not reached it): `mount -o ro` resyncs nothing (it may
    not write) and so serves reads from one member only, the other shown
    stale, so a block reads the same every time; no member is changed. The
    next read-write mount resyncs, and the members end identical."""
    a, b = env.create("a.img", "b.img", size="32M")
    mnt = env.mount(a, b)
    with open(mnt / "disk", "r+b") as f:
        f.seek(4 * MiB)
        f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    kill_daemon(mnt)
    run("fusermount3", "-uz", mnt)
    off = status_json(a, b)["members"][0]["data_offset"]
    with open(b, "r+b") as f:
        f.seek(off + 4 * MiB)
        f.write(os.urandom(MiB))
    before = (sha256(a), sha256(b))
    raid1fs("mount", "-o", "ro", a, b, mnt)
    st = status_json(mnt)
    states = sorted(m["state"] for m in st["members"])
    assert states == ["online", "stale"], st["members"]
    reads = set()
    for _ in range(4):
        drop_cache(mnt / "disk")
        with open(mnt / "disk", "rb") as f:
            f.seek(4 * MiB)
            reads.add(hashlib.sha256(f.read(MiB)).hexdigest())
    assert len(reads) == 1
    raid1fs("umount", mnt)
    assert (sha256(a), sha256(b)) == before
    raid1fs("mount", a, b, mnt)
    raid1fs("rebuild", "--wait", mnt)
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b)
