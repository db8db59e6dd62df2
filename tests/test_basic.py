"""The user story of a disk volume, on real image files and a real mount."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random

import pytest
from conftest import (
    MiB,
    data_region_hash,
    drop_cache,
    member_state,
    raid1fs,
    run,
    sha256,
    status_json,
)


def test_story_create_mount_fail_remove_umount(env):
    """The issue's scenario end to end: ext4 on the mirrored disk survives a
    failed and removed member; members are clean and consistent afterwards."""
    (a, b), mnt = env.volume(size="128M")
    loop = env.losetup(mnt / "disk")
    run("mkfs.ext4", "-q", loop)
    data = env.mount_fs(loop)
    payload = os.urandom(3 * MiB)
    (data / "f1").write_bytes(payload)
    run("sync")
    assert data_region_hash(a) == data_region_hash(b)

    raid1fs("fail", mnt, a)
    st = status_json(mnt)
    assert st["volume"]["state"] == "degraded"
    assert member_state(st, a) == "failed"
    (data / "f2").write_bytes(payload)
    run("sync")
    raid1fs("remove", mnt, a)
    st = status_json(mnt)
    assert [m["path"] for m in st["members"]] == [str(b)]
    assert (data / "f1").read_bytes() == payload

    run("umount", data)
    run("losetup", "-d", loop)
    raid1fs("umount", mnt)
    assert not os.path.ismount(mnt)
    r = raid1fs("status", "--json", b, check=False)
    assert r.returncode == 1  # degraded: one of two slots empty
    # The survivor alone holds the whole file system.
    chk = env.losetup(b, offset=status_json(b)["members"][0]["data_offset"], readonly=True)
    run("e2fsck", "-fn", chk)


def test_members_identical_after_workload(env):
    """Every write lands on every member: data regions are byte-identical."""
    (a, b), mnt = env.volume(size="64M")
    disk = mnt / "disk"
    with open(disk, "r+b") as f:
        for i in range(200):
            off = (i * 7919 * 4096) % (64 * MiB - 65536)
            f.seek(off)
            f.write(os.urandom(1 + (i * 997) % 65536))
        f.flush()
        os.fsync(f.fileno())
    want = sha256(disk)
    raid1fs("umount", mnt)
    st = status_json(a, b)
    assert st["volume"]["state"] == "clean"
    assert data_region_hash(a) == data_region_hash(b) == want


def test_disk_size_cannot_change(env):
    """A truncate of `disk` fails with EPERM and changes nothing."""
    _, mnt = env.volume(size="16M")
    disk = mnt / "disk"
    for size in (0, 8 * MiB, 32 * MiB):
        with pytest.raises(OSError) as e:
            os.truncate(disk, size)
        assert e.value.errno == errno.EPERM
    assert os.stat(disk).st_size == 16 * MiB
    with pytest.raises(OSError) as e:
        open(disk, "wb")  # O_TRUNC
    assert e.value.errno == errno.EPERM
    fd = os.open(disk, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 16 * MiB)
        assert e.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"xyz", 16 * MiB - 2) == 2  # clipped at the end
    finally:
        os.close(fd)
    # O_DIRECT across the end: refused whole with ENOSPC (a short direct
    # write would reach the caller as EIO, with its first part written).
    buf = mmap.mmap(-1, 8192)
    buf.write(b"D" * 8192)
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, buf, 16 * MiB - 4096)
        assert e.value.errno == errno.ENOSPC
        assert os.pwrite(fd, buf, 16 * MiB - 8192) == 8192  # up to the end: fine
    finally:
        os.close(fd)
    with open(disk, "rb") as f:
        f.seek(16 * MiB - 8192)
        assert f.read() == b"D" * 8192


def test_fusermount_leaves_members_clean(env):
    """Unmounting with fusermount3 -u also marks every member clean."""
    (a, b), mnt = env.volume(size="16M")
    pid = status_json(mnt)["daemon"]["pid"]
    run("fusermount3", "-u", mnt)
    from conftest import wait_for
    wait_for(lambda: not os.path.exists(f"/proc/{pid}/status")
             or "zombie" in open(f"/proc/{pid}/status").read(), what="mount process exit")
    st = status_json(a, b)
    assert st["volume"]["clean_shutdown"] is True
    assert st["volume"]["state"] == "clean"


def test_block_device_members(env):
    """Members may be block devices: two loop devices, sized from the smaller
    one when --size is not given; a device in use by a mount is refused."""
    imgs = []
    for name, size in (("a.raw", 40 * MiB), ("b.raw", 48 * MiB)):
        p = env.path(name)
        with open(p, "wb") as f:
            f.truncate(size)
        imgs.append(p)
    a, b = env.losetup(imgs[0]), env.losetup(imgs[1])
    raid1fs("create", "--kind", "disk", a, b)
    st = status_json(a, b)
    assert st["volume"]["size"] == 40 * MiB - st["members"][0]["data_offset"]
    mnt = env.mount(a, b)
    r = raid1fs("mount", a, b, env.mkdir("mnt2"), check=False)
    assert r.returncode != 0 and a in r.stderr and len(r.stderr.strip().splitlines()) == 1
    payload = os.urandom(st["volume"]["size"])
    with open(mnt / "disk", "r+b") as f:
        f.write(payload)
    raid1fs("umount", mnt)
    for dev in (a, b):
        assert data_region_hash(dev) == hashlib.sha256(payload).hexdigest()


def test_block_device_members_leave_and_come_back(env):
    """A block device removed or replaced is let go at once (its exclusive
    open too, not only its lock), so `add` takes the same device back, as
    with md; nothing of the old open can reach the device afterwards."""
    devs = []
    for name in ("a.raw", "b.raw", "c.raw"):
        p = env.path(name)
        with open(p, "wb") as f:
            f.truncate(40 * MiB)
        devs.append(env.losetup(p))
    a, b, c = devs
    raid1fs("create", "--kind", "disk", a, b)
    mnt = env.mount(a, b)
    payload = os.urandom(MiB)
    with open(mnt / "disk", "r+b") as f:
        f.write(payload)
    raid1fs("replace", mnt, a, c)
    raid1fs("rebuild", "--wait", mnt)
    r = raid1fs("add", "--spare", mnt, a, check=False)
    assert r.returncode == 0, r.stderr
    raid1fs("fail", mnt, b)  # the spare a takes over
    raid1fs("remove", mnt, b)
    raid1fs("rebuild", "--wait", mnt)
    r = raid1fs("add", mnt, b, check=False)
    assert r.returncode == 0, r.stderr
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert {x["path"]: x["state"] for x in st["members"]} == {
        a: "online", b: "online", c: "online"}
    with open(mnt / "disk", "r+b") as f:
        f.seek(2 * MiB)
        f.write(payload)
    raid1fs("umount", mnt)
    want = data_region_hash(a)
    assert data_region_hash(b) == want and data_region_hash(c) == want


def test_existing_member_starts_identical_to_new_one(env):
    """An existing image with old data far in (behind 70 MiB of written
    zeros), taken with --force: create zeroes it, so both members' data
    regions are identical from the start."""
    a = env.path("a.img")
    with open(a, "wb") as f:
        f.write(bytes(70 * MiB))  # allocated zeros
        f.seek(75 * MiB)
        f.write(os.urandom(MiB))  # old data
        f.truncate(91 * MiB)
    b = env.path("b.img")
    raid1fs("create", "--kind", "disk", "--size", "90M", "--force", a, b)
    assert data_region_hash(a) == data_region_hash(b)


@pytest.mark.parametrize("faulty", [False, True], ids=["ext4", "one-on-faultfs"])
def test_writes_of_every_size_mixed_over_the_same_ranges(env, faulty):
    """Small, large and unaligned writes over the same ranges, in any order
    (ext4 on the disk sends all three): every uncached read, and in the end
    every member, holds the last write. Large writes take another path
    (RWF_DONTCACHE) where the member's file system has it (ext4), and the
    old one (sync_file_range) where it has not (a FUSE member)."""
    if faulty:
        _, ffs = env.faultfs()
        a, b = env.create(env.path("a.img"), ffs / "b.img", size="16M")
        mnt = env.mount(a, b)
    else:
        (a, b), mnt = env.volume(size="16M")
    model = bytearray(16 * MiB)
    rnd = random.Random(7)
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        for _ in range(300):
            kind = rnd.choice(["small", "large", "unaligned", "large"])
            if kind == "small":
                n, off = rnd.choice([512, 4096, 8192]), rnd.randrange(0, 16 * MiB - 8192)
            elif kind == "large":
                n = rnd.choice([128 << 10, 256 << 10, 1 * MiB])
                off = rnd.randrange(0, (16 * MiB - n) // 4096) * 4096
            else:
                n, off = rnd.randrange(130_000, 900_000), rnd.randrange(0, 15 * MiB)
            data = rnd.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            model[off:off + n] = data
            if rnd.random() < 0.1:  # uncached reads reach the members
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                r = rnd.randrange(0, 15 * MiB)
                assert os.pread(fd, MiB, r) == model[r:r + MiB], f"read at {r}"
        os.fsync(fd)
    finally:
        os.close(fd)
    want = hashlib.sha256(model).hexdigest()
    drop_cache(mnt / "disk")
    assert sha256(mnt / "disk") == want
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b) == want
