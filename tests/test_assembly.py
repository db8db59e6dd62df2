"""Assembly drills: stale members and split brain (guarantees 6 and 7)."""

from __future__ import annotations

import os

from conftest import MiB, data_region_hash, member_entry, member_state, raid1fs, status_json


def _write(mnt, data: bytes, offset: int = 0) -> None:
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(mnt, n: int, offset: int = 0) -> bytes:
    fd = os.open(mnt / "disk", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def _member_data(member, n: int) -> bytes:
    st = status_json(member)
    with open(member, "rb") as f:
        f.seek(st["members"][0]["data_offset"])
        return f.read(n)


def test_member_absent_from_degraded_mount_is_resynced(env):
    """A member missing while the volume was mounted --degraded missed
    writes: when it comes back it is resynced over exactly the regions
    written without it, serves no read of them until it holds them, and
    ends identical."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mount(b, opts=["--degraded"])
    st = status_json(mnt)
    assert member_state(st, a) == "missing" and st["volume"]["state"] == "degraded"
    _write(mnt, b"B" * MiB)
    _write(mnt, b"C" * MiB, 8 * MiB)
    raid1fs("umount", mnt)

    # Slow enough that both reads come while a still lacks those regions.
    raid1fs("mount", "--max-rebuild-rate", "256K", a, b, mnt)
    st = status_json(mnt)
    assert member_state(st, a) == "rebuilding"
    assert member_entry(st, a)["rebuild"]["total_bytes"] == 2 * MiB
    # a (slot 0) wins ties, so had it been asked, these would read zeros.
    assert _read(mnt, MiB) == b"B" * MiB
    assert _read(mnt, MiB, 8 * MiB) == b"C" * MiB
    assert member_state(status_json(mnt), a) == "rebuilding"
    r = raid1fs("rebuild", "--wait", "--max-rate", "0", mnt)
    assert "volume clean" in r.stdout
    st = status_json(mnt)
    assert member_state(st, a) == "online"
    assert member_entry(st, a)["last_rebuild"]["copied_bytes"] == 2 * MiB
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b)


def test_split_brain_is_refused_and_prefer_resolves_it(env):
    """Each member mounted --degraded alone and written: mount of both is
    refused naming both; --prefer picks the winner, whose data the volume
    then shows, and the loser is stale."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mkdir("mnt")
    for member, byte in ((a, b"A"), (b, b"B")):
        raid1fs("mount", "--degraded", member, mnt)
        _write(mnt, byte * MiB)
        raid1fs("umount", mnt)
    before = [open(p, "rb").read() for p in (a, b)]

    r = raid1fs("mount", a, b, mnt, check=False)
    assert r.returncode != 0
    assert "split brain" in r.stderr and str(a) in r.stderr and str(b) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert [open(p, "rb").read() for p in (a, b)] == before  # nothing written
    assert not os.path.ismount(mnt)
    # The offline view and the offline rebuild say so too, and how to settle it.
    st = status_json(a, b)
    assert sorted(st["volume"]["split_brain"]) == sorted([str(a), str(b)])
    assert "split: " in raid1fs("status", a, b, check=False).stdout
    r = raid1fs("rebuild", a, b, check=False)
    assert r.returncode != 0 and "mount with --prefer MEMBER" in r.stderr, r.stderr
    assert [open(p, "rb").read() for p in (a, b)] == before

    env.mount(b, a, opts=["--prefer", str(b)])
    assert _read(mnt, MiB) == b"B" * MiB
    st = status_json(mnt)
    assert member_state(st, b) == "online"
    assert member_state(st, a) in ("rebuilding", "online")  # resynced from b
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert member_state(st, a) == "online"
    # Only what either side wrote alone is copied.
    assert member_entry(st, a)["last_rebuild"]["copied_bytes"] == MiB
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b)
    assert _member_data(a, MiB) == b"B" * MiB


def test_failed_member_is_behind_unless_it_was_used_alone_since(env):
    """c is failed, d added in its place. Given back unused, c is stale (it
    does not know d, but left before d came: not split). Mounted alone and
    written after it was failed, c went on without the others: split brain
    with each of them, refused."""
    a, b, c = env.create("a.img", "b.img", "c.img", size="16M")
    d = env.path("d.img")
    mnt = env.mkdir("mnt")
    raid1fs("mount", a, b, c, mnt)
    raid1fs("fail", mnt, c)
    raid1fs("add", mnt, d)
    raid1fs("rebuild", "--wait", mnt)
    _write(mnt, b"N" * MiB)
    raid1fs("umount", mnt)
    untouched = open(c, "rb").read()

    raid1fs("mount", a, b, c, d, mnt)
    assert member_state(status_json(mnt), c) == "stale"
    raid1fs("umount", mnt)
    assert open(c, "rb").read() == untouched  # stale, left alone: not resynced

    raid1fs("mount", "--degraded", c, mnt)  # c used apart from the volume
    _write(mnt, b"C" * MiB)
    raid1fs("umount", mnt)
    before = [open(p, "rb").read() for p in (a, b, c, d)]
    r = raid1fs("mount", a, b, c, d, mnt, check=False)
    assert r.returncode != 0 and "split brain" in r.stderr and str(c) in r.stderr, r.stderr
    assert [open(p, "rb").read() for p in (a, b, c, d)] == before


def test_missing_member_refused_without_degraded(env):
    """A member of the volume missing at mount: refused, naming it, unless
    --degraded; nothing written to the member that is there."""
    a, b = env.create("a.img", "b.img", size="16M")
    before = open(b, "rb").read()
    r = raid1fs("mount", b, env.mkdir("mnt"), check=False)
    assert r.returncode != 0 and str(a) in r.stderr and "--degraded" in r.stderr
    assert open(b, "rb").read() == before
