"""Guarantee 9 for disk volumes: bad input changes nothing.

Every refusal must be one line on stderr that starts with `raid1fs: ` and
names the path at fault, a non-zero exit status (2 only for bad usage), no
Python traceback, and every member byte-identical afterwards (image files
that did not exist before must still not exist).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MiB, faultfs, member_entry, member_state, raid1fs, sha256, status_json

SIZE = "16M"


# ----- helpers ----------------------------------------------------------------

def assert_refused(r: subprocess.CompletedProcess, must_name: str | os.PathLike,
                   code: int | None = None) -> str:
    """`r` is a clean refusal naming `must_name`; returns the message line.

    code=2 is bad usage: argparse may print its usage lines first, so only
    the last line (the error) is held to naming what is wrong.
    """
    assert r.returncode != 0, f"accepted: {r.stdout!r}"
    if code is not None:
        assert r.returncode == code, f"exit {r.returncode}, wanted {code}: {r.stderr!r}"
    else:
        assert r.returncode != 2, f"exit 2 is for bad usage only: {r.stderr!r}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, "no message on stderr"
    if code == 2:
        line = lines[-1]
        assert line.startswith("raid1fs"), r.stderr
    else:
        assert len(lines) == 1, f"not one line: {r.stderr!r}"
        line = lines[0]
        assert line.startswith("raid1fs: "), line
    assert str(must_name) in line, f"{must_name} not named in {line!r}"
    return line


def snapshot(*paths: str | os.PathLike) -> dict[str, str | None]:
    """Hash of every path that is a file; None for one that does not exist."""
    out: dict[str, str | None] = {}
    for p in paths:
        out[str(p)] = sha256(p) if os.path.lexists(p) else None
    return out


def assert_unchanged(before: dict[str, str | None]) -> None:
    assert snapshot(*before) == before


def create(*args: str | os.PathLike, size: str = SIZE) -> subprocess.CompletedProcess:
    return raid1fs("create", "--kind", "disk", "--size", size, *args, check=False)


def mount(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    r = raid1fs("mount", *args, check=False)
    if r.returncode == 0:  # accepted by mistake: do not leave it mounted
        raid1fs("umount", args[-1], check=False)
    return r


def flip_byte(path: str | os.PathLike, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def blank_image(env, name: str, size: int = 20 * MiB) -> Path:
    """An existing, sparse, all-zero image file large enough for SIZE."""
    p = env.path(name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


# ----- a member of another volume ------------------------------------------------

@pytest.mark.parametrize("first", [True, False], ids=["taken-first", "taken-second"])
def test_create_refuses_member_of_another_volume(env, first):
    """create with a member of an existing volume (no --force) is refused,
    naming it; neither that volume's members nor the new image change."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    new = env.path("new.img")
    before = snapshot(a, b, new)
    r = create(a, new) if first else create(new, a)
    assert_refused(r, a)
    assert_unchanged(before)


def test_mount_refuses_members_of_two_volumes(env):
    """mount mixing members of two volumes is refused, naming the odd one;
    all four members stay byte-identical and nothing is mounted."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    c, d = env.create("c.img", "d.img", size=SIZE)
    mnt = env.mkdir("mnt")
    before = snapshot(a, b, c, d)
    assert_refused(mount(a, c, mnt), c)
    assert_unchanged(before)
    assert not os.path.ismount(mnt)


# ----- a member named twice ---------------------------------------------------------

@pytest.mark.parametrize("how", ["same", "dotted", "symlink", "hardlink"])
def test_create_refuses_existing_member_named_twice(env, how):
    """An existing image named twice (same path, a ./ spelling, a symlink, a
    hard link) is refused by create; the image is unchanged."""
    x = blank_image(env, "x.img")
    other = {"same": x, "dotted": Path(f"{x.parent}/./{x.name}"),
             "symlink": env.path("x-sym"), "hardlink": env.path("x-hard")}[how]
    if how == "symlink":
        other.symlink_to(x)
    elif how == "hardlink":
        other.hardlink_to(x)
    before = snapshot(x)
    assert_refused(create(x, other), other)
    assert_unchanged(before)


@pytest.mark.parametrize("how", ["same", "symlink"])
def test_create_refuses_new_member_named_twice(env, how):
    """A not-yet-existing image named twice (the same path, or a dangling
    symlink to it) is refused by create, and no image file is created."""
    new = env.path("new.img")
    if how == "same":
        other = new
    else:
        other = env.path("new-sym")
        other.symlink_to(new)
    before = snapshot(new)
    assert_refused(create(new, other), other)
    assert_unchanged(before)


def test_create_with_dangling_symlink_is_all_or_nothing(env):
    """A member that is a symlink to a file that does not exist yet is either
    followed (the volume is created and both members carry it) or refused
    cleanly, naming the link, with no image file left behind."""
    new = env.path("new.img")
    link = env.path("link")
    link.symlink_to(env.path("elsewhere.img"))
    r = create(new, link)
    if r.returncode == 0:
        st = status_json(new, link)
        assert st["volume"]["state"] == "clean"
        return
    assert_refused(r, link)
    assert not new.exists() and not env.path("elsewhere.img").exists()


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_mount_refuses_member_named_twice(env, how):
    """mount with one member named twice (same path, symlink, hard link) is
    refused naming the duplicate; both members are unchanged."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    other = {"same": a, "symlink": env.path("a-sym"), "hardlink": env.path("a-hard")}[how]
    if how == "symlink":
        other.symlink_to(a)
    elif how == "hardlink":
        other.hardlink_to(a)
    mnt = env.mkdir("mnt")
    before = snapshot(a, b)
    assert_refused(mount(a, other, mnt), other)
    assert_unchanged(before)
    assert not os.path.ismount(mnt)


# ----- missing and unreadable paths -------------------------------------------------

def test_create_refuses_missing_parent_directory(env):
    """create with an image in a directory that does not exist is refused
    naming it; the other image is not created and no directory appears."""
    a = env.path("a.img")
    b = env.path("nodir") / "b.img"
    before = snapshot(a)
    assert_refused(create(a, b), b)
    assert_unchanged(before)
    assert not env.path("nodir").exists()


def test_mount_refuses_nonexistent_member(env):
    """mount naming a member that does not exist is refused, naming it."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    nope = env.path("nope.img")
    mnt = env.mkdir("mnt")
    before = snapshot(a, b, nope)
    assert_refused(mount(a, nope, mnt), nope)
    assert_unchanged(before)
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("command", ["create", "mount", "status"])
def test_fifo_as_disk_member_is_refused_at_once(env, command):
    """A FIFO given as a member is refused at once (not after the I/O
    timeout, as a path that hangs), naming it; nothing changes."""
    fifo = env.path("fifo")
    os.mkfifo(fifo)
    a, b = env.create("a.img", "b.img", size=SIZE)
    before = snapshot(a, b)
    mnt = env.mkdir("mnt")
    args = {"create": ["create", "--kind", "disk", "--size", SIZE, env.path("c.img"), fifo],
            "mount": ["mount", a, fifo, mnt], "status": ["status", a, fifo]}[command]
    r = raid1fs(*args, check=False, timeout=15)
    if command == "mount" and r.returncode == 0:
        raid1fs("umount", mnt, check=False)
    line = assert_refused(r, fifo, code=3 if command == "status" else None)
    assert "not a regular file or block device" in line, line
    assert_unchanged(before)
    assert not env.path("c.img").exists() and not os.path.ismount(mnt)


@pytest.mark.parametrize("command", ["create", "mount"])
def test_directory_as_disk_member_is_refused(env, command):
    """A directory given as a disk member is refused by create and mount,
    naming it; the directory stays empty and the other members unchanged."""
    d = env.mkdir("adir")
    if command == "create":
        a = env.path("a.img")
        before = snapshot(a)
        assert_refused(create(a, d), d)
    else:
        a, b = env.create("a.img", "b.img", size=SIZE)
        before = snapshot(a, b)
        mnt = env.mkdir("mnt")
        assert_refused(mount(a, d, mnt), d)
        assert not os.path.ismount(mnt)
    assert_unchanged(before)
    assert os.listdir(d) == []


def test_mount_refuses_member_that_cannot_be_read(env):
    """A member whose every I/O fails (faultfs eio) makes mount refuse with
    one line naming it; the healthy member is unchanged."""
    src, ffs = env.faultfs()
    a, b = env.create(ffs / "a.img", "b.img", size=SIZE)
    before = snapshot(src / "a.img", b)
    faultfs("set", ffs, "eio")
    try:
        mnt = env.mkdir("mnt")
        assert_refused(mount(a, b, mnt), a)
        assert not os.path.ismount(mnt)
    finally:
        faultfs("set", ffs, "ok")
    assert_unchanged(before)


@pytest.mark.parametrize("command", ["create", "add", "mount"])
def test_a_member_that_cannot_be_read_is_named_so(env, command):
    """Reads of the member fail (faultfs eio-read): create, add and mount
    refuse it in one line that says it cannot be read (not a traceback, an
    "internal error" or "corrupted metadata"), and nothing changes."""
    src, ffs = env.faultfs()
    if command == "mount":
        x, b = env.create(ffs / "x.img", "b.img", size=SIZE)
        others = [b]
    else:
        with open(ffs / "x.img", "wb") as f:
            f.truncate(20 * MiB)
        x, others = ffs / "x.img", [env.path("new.img")]
    if command == "add":
        others, mnt = env.volume(size=SIZE)
    before = snapshot(src / "x.img", *others)
    faultfs("set", ffs, "eio-read")
    try:
        if command == "create":
            r = create(others[0], x)
        elif command == "add":
            r = raid1fs("add", mnt, x, check=False)
        else:
            r = mount(x, *others, env.mkdir("mnt"))
        line = assert_refused(r, x)
        assert "cannot read" in line, line
    finally:
        faultfs("set", ffs, "ok")
    assert_unchanged(before)


def test_create_that_fails_writing_a_member_leaves_no_volume(env):
    """create whose writes fail on its second member (faultfs eio-write):
    one line naming it, the image made for the first member is gone again,
    and the second is as it was (before, the first got its metadata first:
    a volume of one member that nobody asked for)."""
    src, ffs = env.faultfs()
    x = ffs / "x.img"
    with open(x, "wb") as f:
        f.truncate(20 * MiB)
    new = env.path("new.img")
    before = snapshot(src / "x.img", new)
    faultfs("set", ffs, "eio-write")
    try:
        line = assert_refused(create(new, x), x)
        assert "no volume created" in line, line
    finally:
        faultfs("set", ffs, "ok")
    assert_unchanged(before)


# ----- too small ------------------------------------------------------------------

@pytest.mark.parametrize("with_size", [True, False], ids=["size-given", "size-guessed"])
def test_create_refuses_member_too_small(env, with_size):
    """An existing image smaller than the volume needs is refused naming it;
    it is unchanged and the other image is not created / not changed."""
    small = blank_image(env, "small.img", 8 * MiB if with_size else 512 << 10)
    if with_size:
        other = env.path("new.img")
        before = snapshot(small, other)
        r = create(other, small)
    else:
        other = blank_image(env, "big.img", 32 * MiB)
        before = snapshot(small, other)
        r = raid1fs("create", "--kind", "disk", other, small, check=False)
    assert_refused(r, small)
    assert_unchanged(before)


@pytest.mark.parametrize("cut", [MiB, 4096])
def test_a_member_cut_short_since_create_is_refused(env, cut):
    """A member image truncated (or a smaller device put in its place) after
    create, by a lot or by one block: mount, mount --degraded with it and
    offline status refuse it in one line naming it and its size, and
    nothing is changed; without it the volume mounts degraded."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    os.truncate(b, os.path.getsize(b) - cut)
    before = snapshot(a, b)
    mnt = env.mkdir("mnt")
    for r in (mount(a, b, mnt), mount("--degraded", b, mnt)):
        assert "too small for its volume" in assert_refused(r, b)
        assert not os.path.ismount(mnt)
    assert_refused(raid1fs("status", a, b, check=False), b, code=3)
    assert_unchanged(before)
    env.mount(a, mp="mnt", opts=["--degraded"])


def test_a_member_whose_add_did_not_finish_is_named_so(env):
    """c got its superblock from an `add` that was killed before the commit
    naming it landed (made here the way add does it): mount refuses it
    saying so (not "removed"), status lists it failed with the same
    explanation, nothing is changed, and `add` takes it. An empty image
    (killed even earlier) is "not a raid1fs member"."""
    from raid1fs.create import init_member
    from raid1fs.superblock import Superblock, read_superblock

    a, b = env.create("a.img", "b.img", size=SIZE)
    c = blank_image(env, "c.img", os.path.getsize(a))
    with open(a, "rb") as f:
        sb, _ = read_superblock(f.fileno(), str(a))
    sb.member_uuid, sb.slot = Superblock.new_uuid(), 2
    with open(c, "r+b") as f:
        init_member(f.fileno(), sb)
    before = snapshot(a, b, c)
    mnt = env.mkdir("mnt")
    line = assert_refused(mount(a, b, c, mnt), c)
    assert "an `add` of it that did not finish?" in line and "removed" not in line, line
    st = status_json(a, b, c)
    e = member_entry(st, c)
    assert e["state"] == "failed" and "did not finish" in e["fail_reason"], e
    assert_unchanged(before)
    empty = env.path("empty.img")
    empty.touch()
    line = assert_refused(raid1fs("status", a, b, empty, check=False), empty, code=3)
    assert "not a raid1fs member" in line, line
    mnt = env.mount(a, b)
    raid1fs("add", mnt, c)
    raid1fs("rebuild", "--wait", mnt)
    assert member_state(status_json(mnt), c) == "online"


# ----- corrupted metadata -----------------------------------------------------------

def test_both_superblock_copies_corrupt_is_refused(env):
    """With both superblock copies of a member damaged, mount refuses naming
    it, `status MEMBER` exits 3 with one line, and no member is touched."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    flip_byte(a, 100)
    flip_byte(a, 4096 + 100)
    before = snapshot(a, b)
    mnt = env.mkdir("mnt")
    assert_refused(mount(a, b, mnt), a)
    assert not os.path.ismount(mnt)
    assert_refused(raid1fs("status", a, check=False), a, code=3)
    assert_refused(raid1fs("status", "--json", a, b, check=False), a, code=3)
    assert_unchanged(before)
    # create without --force does not overwrite the damaged member either
    assert_refused(create(a, env.path("new.img")), a)
    assert_unchanged(before)


@pytest.mark.parametrize("copy", [0, 1])
def test_one_superblock_copy_corrupt_still_mounts(env, copy):
    """With one superblock copy damaged the other is used: status reports the
    problem, the volume mounts and serves data, and after umount both
    members' metadata is whole and the volume clean."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    flip_byte(a, copy * 4096 + 100)
    st = status_json(a, b)
    problems = next(m for m in st["members"] if m["path"] == str(a))["metadata_problems"]
    assert any(p.startswith(f"copy {copy}") for p in problems), problems
    mnt = env.mount(a, b)
    payload = os.urandom(MiB)
    with open(mnt / "disk", "r+b") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    assert member_state(status_json(mnt), a) == "online"
    raid1fs("umount", mnt)
    r = raid1fs("status", "--json", a, b, check=False)
    assert r.returncode == 0, r.stderr
    st = status_json(a, b)
    assert st["volume"]["state"] == "clean"
    assert all(m["metadata_problems"] == [] for m in st["members"]), st["members"]
    assert len({m["events"] for m in st["members"]}) == 1


# ----- the mount point --------------------------------------------------------------

@pytest.mark.parametrize("case", ["is-member", "member-inside", "loop-over-member-inside",
                                  "does-not-exist", "not-a-directory", "already-mounted"])
def test_bad_mount_point_is_refused(env, case):
    """A mount point that is a member, that holds a member (or the file a
    loop device member serves), that does not exist, that is a file, or
    where something is already mounted: refused, naming the path at fault;
    no member changes."""
    sub = env.mkdir("sub")
    a, b = env.create(sub / "a.img", "b.img", size=SIZE)
    others: list[Path] = []
    if case == "is-member":
        mp, fault = a, a
    elif case == "member-inside":
        mp, fault = sub, a
    elif case == "loop-over-member-inside":
        loop = env.losetup(a)
        mp, fault = sub, loop
        before = snapshot(a, b)
        line = assert_refused(mount(loop, b, mp), fault)
        assert f"loop device over {a}" in line, line
        assert_unchanged(before)
        return
    elif case == "does-not-exist":
        mp = fault = env.path("nomnt")
    elif case == "not-a-directory":
        mp = fault = env.path("file")
        mp.write_bytes(b"not a directory\n")
        others.append(mp)
    else:
        others = env.create("c.img", "d.img", size=SIZE)
        mp = fault = env.mount(*others, mp="mnt")
        others = []  # in use by their own mount: not ours to hash
    before = snapshot(a, b, *others)
    assert_refused(mount(a, b, mp), fault)
    assert_unchanged(before)
    if case == "does-not-exist":
        assert not mp.exists()
    if case == "already-mounted":
        assert status_json(mp)["volume"]["state"] == "clean"  # the first mount is fine


def test_mount_refuses_members_in_use(env):
    """Members already mounted elsewhere cannot be mounted a second time."""
    (a, b), mnt = env.volume(size=SIZE)
    mnt2 = env.mkdir("mnt2")
    assert_refused(mount(a, b, mnt2), a)
    assert not os.path.ismount(mnt2)
    assert status_json(mnt)["volume"]["state"] == "clean"



@pytest.mark.parametrize("first", ["loop", "file"])
def test_a_member_in_use_under_another_name_is_refused(env, first):
    """A loop device over a member's image file is that member: while a
    mount uses the member under one name (the file, or the loop device), a
    second mount under the other name is refused naming it (it would be a
    second, diverging copy of the volume), and so is create --force."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    la, lb = env.losetup(a), env.losetup(b)
    names = {"loop": (la, lb), "file": (a, b)}
    second = "file" if first == "loop" else "loop"
    mnt = env.mount(*names[first])
    mnt2 = env.mkdir("mnt2")
    line = assert_refused(mount(*names[second], mnt2), names[second][0])
    assert "in use by another raid1fs process" in line, line
    assert not os.path.ismount(mnt2)
    r = raid1fs("create", "--kind", "disk", "--force", names[second][0], env.path("n.img"),
                check=False)
    assert_refused(r, names[second][0])
    assert not env.path("n.img").exists()
    assert status_json(mnt)["volume"]["state"] == "clean"
    # Under either name, status finds the members in use and asks the mount.
    for names_given in ((la, lb), (a, b)):
        v = status_json(*names_given)["volume"]
        assert v.get("mountpoint") == str(mnt), v


def test_mount_refuses_a_member_named_as_its_file_and_a_loop_device(env):
    """A member named twice, once as its image file and once as a loop device
    over that file, is refused as named twice; nothing changes."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    la = env.losetup(a)
    mnt = env.mkdir("mnt")
    before = snapshot(a, b)
    line = assert_refused(mount(a, la, mnt), la)
    assert "named twice" in line, line
    assert_unchanged(before)
    assert not os.path.ismount(mnt)

# ----- members that hold data -------------------------------------------------------

def test_member_holding_data_needs_force(env):
    """An image that holds data is refused without --force (nothing changes,
    the other image is not created); with --force it is accepted and the
    volume's disk then reads as zeros, identical on both members."""
    x = blank_image(env, "x.img")
    with open(x, "r+b") as f:
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    new = env.path("new.img")
    before = snapshot(x, new)
    assert_refused(create(new, x), x)
    assert_unchanged(before)

    r = raid1fs("create", "--kind", "disk", "--size", SIZE, "--force", new, x)
    assert r.returncode == 0, r.stderr
    mnt = env.mount(new, x)
    with open(mnt / "disk", "rb") as f:
        data = f.read()
    assert len(data) == 16 * MiB
    assert data.count(0) == len(data), "disk does not read as zeros after --force"
    raid1fs("umount", mnt)
    st = status_json(new, x)
    off = st["members"][0]["data_offset"]
    assert sha256(new, off, 16 * MiB) == sha256(x, off, 16 * MiB)



@pytest.mark.parametrize("via", ["file", "loop"])
def test_data_far_into_a_member_is_found(env, via):
    """Data past the first 64 MiB, behind 100 MiB of written zeros, is still
    found: create and add refuse the member (one line naming it, nothing
    changed), whether it is the image file or a loop device over it."""
    x = env.path("x.img")
    with open(x, "wb") as f:
        f.write(bytes(100 * MiB))  # allocated zeros: read, not skipped
        f.write(os.urandom(MiB))
        f.truncate(200 * MiB)
    target = env.losetup(x) if via == "loop" else x
    new = env.path("new.img")
    before = snapshot(x, new)
    assert_refused(create(new, target, size="64M"), target)
    assert_unchanged(before)
    (a, b), mnt = env.volume(size="64M")
    line = assert_refused(raid1fs("add", mnt, target, check=False), target)
    assert "holds data" in line, line
    assert_unchanged(before)

# ----- usage errors -----------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e12", "soon"])
def test_mount_io_timeout_out_of_range_is_bad_usage(env, value):
    """--io-timeout must be a number of seconds above zero and at most a
    day: anything else (not a number, infinite, so large that timers
    overflow) is bad usage, exit 2, with nothing mounted or changed."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    before = snapshot(a, b)
    mnt = env.mkdir("mnt")
    assert_refused(mount("--io-timeout", value, a, b, mnt), "--io-timeout", code=2)
    assert not os.path.ismount(mnt)
    assert_unchanged(before)


def test_io_timeout_from_the_environment_is_bounded(env):
    """RAID1FS_IO_TIMEOUT=inf (or nan) does not break the commands that
    take it: status still answers."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    for value in ("inf", "nan", "1e300"):
        r = raid1fs("status", a, b, check=False,
                    env={**os.environ, "RAID1FS_IO_TIMEOUT": value})
        assert r.returncode == 0 and "Traceback" not in r.stderr, (value, r.stderr)


@pytest.mark.parametrize("args,name", [
    (["--size", SIZE], "two members"),
    (["--size", "12Q"], "12Q"),
    (["--size=-5M"], "-5M"),
    (["--size", "1000"], "1000"),
    (["--size", "1.5"], "'1.5': not a whole number of bytes"),
    (["--size", "64M/s"], "64M/s"),
], ids=["one-member", "bad-size", "negative-size", "unaligned-size", "fraction-of-a-byte",
        "a-rate"])
def test_create_usage_errors_exit_2(env, args, name):
    """create with one member, or a --size that is unparsable, negative, not
    a multiple of 4 KiB, not whole bytes or a rate, is bad usage: exit 2,
    no traceback, and no image file is created."""
    a, b = env.path("a.img"), env.path("b.img")
    members = [a] if name == "two members" else [a, b]
    r = raid1fs("create", "--kind", "disk", *args, *members, check=False)
    assert_refused(r, name, code=2)
    assert not a.exists() and not b.exists()


# ----- a missing member -------------------------------------------------------------

def test_missing_member_needs_degraded(env):
    """mount with a member missing is refused naming it unless --degraded;
    with --degraded it mounts, status shows the member missing and the volume
    degraded (exit 1)."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    os.rename(b, env.path("b.away"))
    mnt = env.mkdir("mnt")
    before = snapshot(a, env.path("b.away"))
    assert_refused(mount(a, mnt), b)
    line = assert_refused(mount(a, b, mnt), b)  # named, but gone
    assert "with --degraded" in line, line
    assert_unchanged(before)
    assert not os.path.ismount(mnt)

    env.mount(a, opts=["--degraded"])
    r = raid1fs("status", "--json", mnt, check=False)
    assert r.returncode == 1, r.stderr
    st = status_json(mnt)
    assert st["volume"]["state"] == "degraded"
    assert member_state(st, a) == "online"
    assert member_state(st, b) == "missing"
    raid1fs("umount", mnt)
    # The refusal's advice taken literally: the same command, --degraded.
    r = raid1fs("mount", "--degraded", a, b, mnt, check=False)
    assert r.returncode == 0, r.stderr
    assert f"{b}: not there" in r.stderr
    assert member_state(status_json(mnt), b) == "missing"
    raid1fs("umount", mnt)
    # Only a path that does not exist is left out: one that cannot be
    # reached is an error, as without --degraded.
    before = snapshot(a)
    bad = a / "x"  # ENOTDIR
    assert_refused(mount("--degraded", a, bad, mnt), bad)
    assert_unchanged(before)


# ----- mount options and names ------------------------------------------------------

@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_mount_option_fuse_refuses_changes_nothing(env, foreground):
    """An -o option FUSE does not know is bad usage (exit 2) in one line
    naming it (what libfuse said), and fails the mount before any member is
    written (their metadata would otherwise record a mount that never was)."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    mnt = env.mkdir("mnt")
    before = snapshot(a, b)
    r = mount(*(["-f"] if foreground else []), "-o", "noatime,no_such_option", a, b, mnt)
    line = assert_refused(r, mnt, code=2)  # with -f the log is on stderr too: the last line
    assert foreground or len(r.stderr.splitlines()) == 1, r.stderr
    assert line == f"raid1fs: {mnt}: unknown option(s): `-o no_such_option'", line
    assert_unchanged(before)
    assert not os.path.ismount(mnt)


def test_fuse_mount_refused_by_the_system_says_why(env):
    """A mount the system refuses (here /dev/fuse is not the FUSE device:
    /dev/null bound over it in a private mount namespace) fails in one line
    with libfuse's reason, not a guess about -o options, exit 1; the members
    are unchanged."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    mnt = env.mkdir("mnt")
    before = snapshot(a, b)
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount --bind /dev/null /dev/fuse && exec "$@"', "-",
         sys.executable, "-m", "raid1fs", "mount", a, b, mnt],
        capture_output=True, text=True, timeout=60)
    line = assert_refused(r, mnt)
    assert r.returncode == 1 and "FUSE mount failed: mount failed: Invalid argument" in line, line
    assert_unchanged(before)
    assert not os.path.ismount(mnt)


def test_volume_name_with_a_comma_mounts(env):
    """The name goes into FUSE's comma-separated options (fsname): escaped."""
    a, b = env.path("a.img"), env.path("b.img")
    raid1fs("create", "--kind", "disk", "--size", SIZE, "--name", r"web,data\1", a, b)
    mnt = env.mount(a, b)
    assert status_json(mnt)["volume"]["name"] == r"web,data\1"


def test_a_run_directory_others_can_write_to_is_refused(env):
    """The run directory (control sockets, mount-point locks) must be the
    mounting user's and writable only by them: another user who could make
    files there could hold a lock that blocks every mount. A mount given
    one anyone can write to is refused, naming it, with nothing changed."""
    a, b = env.create("a.img", "b.img", size=SIZE)
    run_dir = env.mkdir("open-run-dir")
    os.chmod(run_dir, 0o777)
    before = snapshot(a, b)
    mnt = env.mkdir("mnt")
    r = raid1fs("mount", a, b, mnt, check=False,
                env={**os.environ, "RAID1FS_RUN_DIR": str(run_dir)})
    if r.returncode == 0:
        raid1fs("umount", mnt, env={**os.environ, "RAID1FS_RUN_DIR": str(run_dir)})
    assert_refused(r, run_dir)
    assert_unchanged(before)
