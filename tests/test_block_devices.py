"""Members that are block devices (loop devices over files): what is true
of an image file member must be true of them, under any of their names."""

from __future__ import annotations

import os
import time

from conftest import (
    MiB,
    _unmount_raid1fs,
    data_region_hash,
    faultfs,
    member_state,
    process_gone,
    raid1fs,
    run,
    sha256,
    status_json,
    wait_for,
)
from test_bad_input import assert_refused, assert_unchanged, snapshot


def _image(env, name: str, size: int = 64 * MiB) -> str:
    p = env.path(name)
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


def test_a_failed_loop_device_member_is_readded_under_any_of_its_names(env):
    """A loop device member is found by a symlink to it and by the file it
    serves (fail, add): re-added after `fail`, it is resynced (only what it
    missed), not refused as busy; `add` of it while online says it is a
    member already."""
    m1 = _image(env, "m1.img")
    dev = env.losetup(m1)
    b = env.path("b.img")
    raid1fs("create", "--kind", "disk", "--size", "40M", dev, b)
    mnt = env.mount(dev, b)
    line = assert_refused(raid1fs("add", mnt, m1, check=False), m1)
    assert "already a member" in line, line
    link = env.path("by-id-m1")
    link.symlink_to(dev)
    r = raid1fs("fail", mnt, link)
    assert r.stdout.strip() == f"{dev}: failed", r.stdout
    with open(mnt / "disk", "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(3 * MiB))
        os.fsync(f.fileno())
    r = raid1fs("add", mnt, dev, check=False)
    assert r.returncode == 0, r.stderr
    assert "resync" in r.stdout, r.stdout
    raid1fs("rebuild", "--wait", mnt)
    assert member_state(status_json(mnt), dev) == "online"
    r = raid1fs("fail", mnt, m1)  # the file it serves names it too
    assert r.stdout.strip() == f"{dev}: failed", r.stdout
    raid1fs("add", mnt, m1)
    raid1fs("rebuild", "--wait", mnt)
    raid1fs("umount", mnt)
    assert data_region_hash(m1, status_json(dev, b)) == data_region_hash(b)


def test_read_only_devices_are_refused_for_writing(env):
    """A read-only block device (`losetup -r`) is refused by create, a
    read-write mount, add and replace: one line naming it, and no member
    changed (create used to write the other members first and then fail;
    mount to fail it in the others' metadata); `mount -o ro` uses it."""
    ro_img, other = _image(env, "ro.img"), env.path("e1.img")
    dev = env.losetup(ro_img, readonly=True)
    before = snapshot(ro_img, other)
    line = assert_refused(raid1fs("create", "--kind", "disk", "--size", "16M", other, dev,
                                  check=False), dev)
    assert "read-only device" in line, line
    assert_unchanged(before)

    a, b = env.create("a.img", "b.img", size="16M")
    run("losetup", "-d", dev)
    dev = env.losetup(a, readonly=True)
    before = snapshot(a, b)
    mnt = env.mkdir("mnt-rw")
    r = raid1fs("mount", dev, b, mnt, check=False)
    if r.returncode == 0:
        raid1fs("umount", mnt)
    line = assert_refused(r, dev)
    assert "read-only device" in line, line
    assert_unchanged(before)
    mnt = env.mount(dev, b, mp="mnt-ro", opts=["-o", "ro"])
    assert status_json(mnt)["volume"]["state"] == "clean"
    raid1fs("umount", mnt)
    assert_unchanged(before)

    c_img = _image(env, "c.img")
    dev_c = env.losetup(c_img, readonly=True)
    x, y = env.create("x.img", "y.img", size="16M")
    mnt2 = env.mount(x, y, mp="mnt2")
    before = snapshot(c_img)
    for args in (["add", mnt2, dev_c], ["add", "--spare", mnt2, dev_c],
                 ["replace", mnt2, x, dev_c]):
        line = assert_refused(raid1fs(*args, check=False), dev_c)
        assert "read-only device" in line, (args, line)
    assert_unchanged(before)
    assert status_json(mnt2)["volume"]["state"] == "clean"


def test_create_finds_data_still_in_a_loop_devices_page_cache(env):
    """Data written through a loop device that someone holds open is in the
    device's page cache, not yet in the file it serves: create without
    --force still finds it and refuses, and the data stays."""
    img = _image(env, "d.img")
    dev = env.losetup(img)
    holder = os.open(dev, os.O_RDONLY)  # keeps the device's page cache alive
    try:
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, b"IMPORTANT" * 1000, 4 * MiB)
        finally:
            os.close(fd)
        line = assert_refused(raid1fs("create", "--kind", "disk", "--size", "16M", dev,
                                      env.path("n.img"), check=False), dev)
        assert "holds data" in line, line
        assert not env.path("n.img").exists()
        assert os.pread(holder, 9, 4 * MiB) == b"IMPORTANT"
    finally:
        os.close(holder)


def test_umount_lets_the_others_go_when_closing_a_failed_device_hangs(env):
    """A loop device member over a file on a hung faultfs, with writes still
    in the device's page cache, failed by the operator: closing it writes
    them back and hangs. `umount` still ends in about the I/O timeout, not
    stuck, and the healthy member is free for the next mount at once."""
    _, ffs = env.faultfs()
    with open(ffs / "a.img", "wb") as f:
        f.truncate(48 * MiB)
    dev = env.losetup(ffs / "a.img")
    b = env.path("b.img")
    raid1fs("create", "--kind", "disk", "--size", "32M", dev, b)
    mnt = env.mount(dev, b, opts=["--io-timeout", "2"])
    try:
        with open(mnt / "disk", "r+b") as f:
            f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        faultfs("set", ffs, "hang")
        with open(mnt / "disk", "r+b") as f:  # into the loop device's page cache
            f.seek(2 * MiB)
            f.write(os.urandom(256 * 1024))
        raid1fs("fail", mnt, dev)
        pid = status_json(mnt)["daemon"]["pid"]
        t0 = time.monotonic()
        r = raid1fs("umount", mnt, check=False, timeout=90)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert took < 15, f"umount took {took:.1f} s"
        st = status_json(b)
        assert not st["volume"].get("in_use"), st["volume"]
        mnt2 = env.mount(b, mp="mnt2", opts=["--degraded"])
        assert status_json(mnt2)["volume"]["state"] == "degraded"
        raid1fs("umount", mnt2)
    finally:
        faultfs("set", ffs, "ok")
    wait_for(lambda: process_gone(pid), what="the first mount process gone")


def test_a_loop_device_with_no_file_attached_is_named_so(env):
    """A loop device node with nothing attached (size 0) is not called "not
    a raid1fs member" or "too small": create, mount and status say it is
    an empty device."""
    free = run("losetup", "--find").stdout.strip()
    a, b = env.create("a.img", "b.img", size="16M")
    for args in (["create", "--kind", "disk", "--size", "16M", env.path("n.img"), free],
                 ["mount", a, free, env.mkdir("mnt")], ["status", free]):
        r = raid1fs(*args, check=False)
        if r.returncode == 0 and args[0] == "mount":
            raid1fs("umount", args[-1])
        line = assert_refused(r, free)
        assert "empty device" in line, (args, line)


def test_a_loop_device_member_whose_file_was_deleted_is_still_found(env):
    """The image behind a loop device member is deleted while mounted (the
    device goes on serving it): `fail` and `add` of the device still find
    the member (a re-add, resynced), not "device is busy"."""
    m1 = _image(env, "m1.img")
    dev = env.losetup(m1)
    b = env.path("b.img")
    raid1fs("create", "--kind", "disk", "--size", "40M", dev, b)
    mnt = env.mount(dev, b)
    os.unlink(m1)
    r = raid1fs("fail", mnt, dev)
    assert r.stdout.strip() == f"{dev}: failed", r.stdout
    r = raid1fs("add", mnt, dev, check=False)
    assert r.returncode == 0 and "resync" in r.stdout, (r.stdout, r.stderr)
    raid1fs("rebuild", "--wait", mnt)
    assert member_state(status_json(mnt), dev) == "online"


def test_the_renamed_file_behind_a_loop_device_member_is_known_as_that_member(env):
    """The image behind a loop device member was renamed before the mount:
    `add` of it under its new name is refused as already a member, its
    superblock untouched (the kernel names a loop device's file by where it
    is now, so the mount finds and locks it under the new name)."""
    m1 = _image(env, "m1.img")
    dev = env.losetup(m1)
    b = env.path("b.img")
    raid1fs("create", "--kind", "disk", "--size", "40M", dev, b)
    renamed = env.path("m1-renamed.img")
    os.rename(m1, renamed)
    mnt = env.mount(dev, b)
    before = sha256(renamed)
    line = assert_refused(raid1fs("add", mnt, renamed, check=False), renamed)
    assert "already a member" in line, line
    assert sha256(renamed) == before
    assert status_json(mnt)["volume"]["state"] == "clean"


def test_a_block_device_another_program_holds_exclusively_is_refused(env):
    """A device opened exclusively elsewhere (mounted, or a member of
    another array: O_EXCL) is refused as busy by create, mount and add,
    each in one line naming it, and nothing changes (a flock alone would
    not see such a holder)."""
    dev = env.losetup(_image(env, "m1.img"))
    b, c = env.path("b.img"), env.path("c.img")
    raid1fs("create", "--kind", "disk", "--size", "40M", dev, b)
    before = snapshot(dev, b)
    holder = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        mnt = env.mkdir("mnt")
        env.cleanup.push(_unmount_raid1fs, str(mnt))  # if it mounts after all
        r = raid1fs("mount", dev, b, mnt, check=False)
        assert "busy" in assert_refused(r, dev)
        assert not os.path.ismount(mnt)
        r = raid1fs("create", "--kind", "disk", "--size", "40M", "--force", dev, c, check=False)
        assert "busy" in assert_refused(r, dev)
        assert not os.path.exists(c)
        assert_unchanged(before)
        mnt = env.mount(b, opts=["--degraded"])
        r = raid1fs("add", mnt, dev, check=False)
        assert "busy" in assert_refused(r, dev)
    finally:
        os.close(holder)
