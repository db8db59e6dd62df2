"""Assembly drills: stale members and split brain (guarantees 6 and 7)."""

from __future__ import annotations

import os

from conftest import MiB, member_entry, member_state, raid1fs, status_json


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


def test_member_absent_from_degraded_mount_is_stale(env):
    """A member missing while the volume was mounted --degraded missed
    writes: when it comes back it is stale, serves no reads, and the data
    written without it is what the volume shows."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mount(b, opts=["--degraded"])
    st = status_json(mnt)
    assert member_state(st, a) == "missing" and st["volume"]["state"] == "degraded"
    _write(mnt, b"B" * MiB)
    raid1fs("umount", mnt)

    raid1fs("mount", a, b, mnt)
    assert _read(mnt, MiB) == b"B" * MiB
    st = status_json(mnt)
    assert member_state(st, a) == "stale"
    assert member_entry(st, a)["reads"] == 0
    raid1fs("umount", mnt)


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

    env.mount(b, a, opts=["--prefer", str(b)])
    assert _read(mnt, MiB) == b"B" * MiB
    st = status_json(mnt)
    assert member_state(st, a) == "stale" and member_state(st, b) == "online"
    raid1fs("umount", mnt)


def test_missing_member_refused_without_degraded(env):
    """A member of the volume missing at mount: refused, naming it, unless
    --degraded; nothing written to the member that is there."""
    a, b = env.create("a.img", "b.img", size="16M")
    before = open(b, "rb").read()
    r = raid1fs("mount", b, env.mkdir("mnt"), check=False)
    assert r.returncode != 0 and str(a) in r.stderr and "--degraded" in r.stderr
    assert open(b, "rb").read() == before
