"""Assembly drills: stale members and split brain (guarantees 6 and 7)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import (
    MiB,
    _unmount_raid1fs,
    data_region_hash,
    member_entry,
    member_state,
    one_line,
    raid1fs,
    status_json,
)


def _mountpoint(env):
    """The test's mount point, unmounted at its end whatever happened (these
    tests mount and unmount by hand)."""
    mnt = env.mkdir("mnt")
    env.cleanup.push(_unmount_raid1fs, str(mnt))
    return mnt


def _spare_took_the_place_of_b(env):
    """A volume of a and b with spare s; b failed, s rebuilt in its place;
    unmounted. Returns a, b, s, the mount point."""
    a, b = env.create("a.img", "b.img", size="16M")
    s = env.path("s.img")
    mnt = _mountpoint(env)
    raid1fs("mount", a, b, mnt)
    raid1fs("add", "--spare", mnt, s)
    raid1fs("fail", mnt, b)
    r = raid1fs("rebuild", "--wait", mnt, check=False)
    # s in sync; the volume stays degraded while failed b is on the roster
    assert r.returncode == 1 and f"{b}: failed" in r.stdout, (r.stdout, r.stderr)
    assert member_state(status_json(mnt), s) == "online"
    raid1fs("umount", mnt)
    return a, b, s, mnt


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


@pytest.mark.parametrize("taken", ["mounts-ago", "while-mounted"])
def test_an_older_copy_of_a_member_put_back_is_stale_and_rebuilt_in_full(env, taken):
    """a's image (slot 0, which wins read ties) restored from a copy taken
    several mounts ago, or taken while mounted and put back after the clean
    unmount: its roster calls everyone in sync, but its event counter is
    behind b's (far behind; or one behind a clean b). It is stale (offline
    status says why, exit 1), serves no reads (they would be "A"s), and the
    mount rebuilds it in full; the members end identical."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = _mountpoint(env)
    raid1fs("mount", a, b, mnt)
    _write(mnt, b"A" * (16 * MiB))
    if taken == "mounts-ago":
        raid1fs("umount", mnt)
        old_a = a.read_bytes()
        for _ in range(2):
            raid1fs("mount", a, b, mnt)
            raid1fs("umount", mnt)
        raid1fs("mount", a, b, mnt)
    else:
        old_a = a.read_bytes()  # the written data is in a's page cache: the copy has it
    _write(mnt, b"N" * MiB, 3 * MiB)
    raid1fs("umount", mnt)
    a.write_bytes(old_a)  # behind raid1fs's back

    r = raid1fs("status", a, b, check=False)
    assert r.returncode == 1 and "older copy of this member" in r.stdout, r.stdout
    assert r.stderr == "", r.stderr
    st = status_json(a, b)
    assert member_state(st, a) == "stale" and st["volume"]["state"] == "degraded", st
    # Slow, so the reads come while a still lacks that region.
    raid1fs("mount", "--max-rebuild-rate", "1M", a, b, mnt)
    e = member_entry(status_json(mnt), a)
    assert e["state"] == "rebuilding" and e["rebuild"]["total_bytes"] == 16 * MiB, e
    for _ in range(4):
        assert _read(mnt, MiB, 3 * MiB) == b"N" * MiB
    raid1fs("rebuild", "--wait", "--max-rate", "0", mnt)
    assert member_state(status_json(mnt), a) == "online"
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b)
    assert raid1fs("status", a, b, check=False).returncode == 0


def test_split_brain_is_refused_and_prefer_resolves_it(env):
    """Each member mounted --degraded alone and written: mount of both is
    refused naming both; --prefer picks the winner, whose data the volume
    then shows, and the loser is stale."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = _mountpoint(env)
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
    mnt = _mountpoint(env)
    raid1fs("mount", a, b, c, mnt)
    raid1fs("fail", mnt, c)
    raid1fs("add", mnt, d)
    r = raid1fs("rebuild", "--wait", mnt, check=False)
    assert r.returncode == 1 and f"{c}: failed" in r.stdout, r.stdout  # c still listed
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


def test_a_failed_member_killed_in_its_first_mount_alone_is_split_not_behind(env):
    """The boundary of the rule above: c, failed, is mounted alone and
    written, and that mount is killed (kill -9), so its mount's own commit
    is the only change c made: c's event counter now equals the one the
    others recorded it gone at. It still went on without them: split brain,
    refused; every member unchanged."""
    from test_crash import kill_daemon

    a, b, c = env.create("a.img", "b.img", "c.img", size="16M")
    mnt = _mountpoint(env)
    raid1fs("mount", a, b, c, mnt)
    raid1fs("fail", mnt, c)
    _write(mnt, b"N" * MiB)
    raid1fs("umount", mnt)
    raid1fs("mount", "--degraded", c, mnt)  # c used apart from the volume
    _write(mnt, b"C" * MiB)
    kill_daemon(mnt)
    raid1fs("umount", mnt)  # detaches the dead mount
    before = [open(p, "rb").read() for p in (a, b, c)]
    r = raid1fs("mount", a, b, c, mnt, check=False)
    assert r.returncode != 0 and "split brain" in r.stderr and str(c) in r.stderr, r.stderr
    assert [open(p, "rb").read() for p in (a, b, c)] == before


def test_missing_member_refused_without_degraded(env):
    """A member of the volume missing at mount: refused, naming it, unless
    --degraded; nothing written to the member that is there."""
    a, b = env.create("a.img", "b.img", size="16M")
    before = open(b, "rb").read()
    r = raid1fs("mount", b, env.mkdir("mnt"), check=False)
    assert r.returncode != 0 and str(a) in r.stderr and "--degraded" in r.stderr
    assert open(b, "rb").read() == before


def test_split_brain_settled_by_prefer_stays_settled(env):
    """a and b, with spare s. b fails, s takes its place; b is then mounted
    alone and written. Offline status calls that volume not clean (exit 1),
    mount refuses it; --prefer a settles it for good: b, surplus now, stays
    stale, the next mount without --prefer works, and `add b` later resyncs
    b over what either side wrote alone (b's own writes too)."""
    a, b, s, mnt = _spare_took_the_place_of_b(env)
    raid1fs("mount", a, s, mnt)
    _write(mnt, b"A" * MiB)
    raid1fs("umount", mnt)
    raid1fs("mount", "--degraded", b, mnt)
    _write(mnt, b"B" * MiB, 4 * MiB)
    raid1fs("umount", mnt)

    r = raid1fs("status", "--json", a, b, s, check=False)
    st = json.loads(r.stdout)
    assert st["volume"]["split_brain"] and st["volume"]["state"] != "clean", st["volume"]
    assert r.returncode == 1
    assert raid1fs("mount", a, b, s, mnt, check=False).returncode != 0

    raid1fs("mount", "--prefer", a, a, b, s, mnt)
    assert member_state(status_json(mnt), b) == "stale"
    raid1fs("umount", mnt)
    r = raid1fs("status", "--json", a, b, s, check=False)
    st = json.loads(r.stdout)
    # Settled: no split; degraded (exit 1) only while b, stale, is listed.
    assert "split_brain" not in st["volume"], st["volume"]
    assert st["volume"]["state"] == "degraded" and r.returncode == 1, st["volume"]

    raid1fs("mount", a, b, s, mnt)  # no --prefer needed any more
    assert member_state(status_json(mnt), b) == "stale"
    assert _read(mnt, MiB, 4 * MiB) == bytes(MiB)  # a's side: b's write lost
    raid1fs("add", mnt, b)
    raid1fs("rebuild", "--wait", "--max-rate", "0", mnt)
    assert member_state(status_json(mnt), b) == "online"
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(b) == data_region_hash(s)


def test_removed_member_is_refused_and_shown_removed(env):
    """A member failed and removed is told so as it leaves: mounted alone,
    even --degraded, it is refused; offline status of it alone says it is
    no longer a member (exit 3), and with the others lists it as removed,
    apart from the members of a clean volume. Nothing is written."""
    a, b = env.create("a.img", "b.img", size="16M")
    c = env.path("c.img")
    mnt = _mountpoint(env)
    raid1fs("mount", a, b, mnt)
    raid1fs("add", mnt, c)
    raid1fs("rebuild", "--wait", mnt)
    raid1fs("fail", mnt, c)
    r = raid1fs("remove", mnt, c)
    assert "now a 2-way mirror" in r.stdout, r.stdout  # the add had widened it
    raid1fs("umount", mnt)
    before = [open(p, "rb").read() for p in (a, b, c)]

    r = raid1fs("status", c, check=False)
    assert r.returncode == 3 and "no longer a member" in one_line(r.stderr), r.stderr
    for args in ((c,), ("--degraded", c), (a, b, c)):
        r = raid1fs("mount", *args, mnt, check=False)
        assert r.returncode != 0 and str(c) in r.stderr and "removed" in r.stderr, r.stderr
        assert not os.path.ismount(mnt)
    r = raid1fs("status", "--json", a, b, c, check=False)
    st = json.loads(r.stdout)
    assert st["volume"]["removed"] == [str(c)] and st["volume"]["state"] == "clean"
    assert str(c) not in [m["path"] for m in st["members"]] and r.returncode == 0
    assert "removed: " in raid1fs("status", a, b, c).stdout
    assert [open(p, "rb").read() for p in (a, b, c)] == before


def test_member_removed_while_absent_is_refused_not_split(env):
    """A member removed while it was absent cannot be told, and `remove`
    says so (a member removed from the mount is told, and nothing is said);
    mounted alone and written since, it is still recognised, by the
    others' metadata, as removed: refused as such, not as half of a split
    brain."""
    a, b, c = env.create("a.img", "b.img", "c.img", size="16M")
    mnt = _mountpoint(env)
    raid1fs("mount", "--degraded", a, b, mnt)
    r = raid1fs("remove", mnt, c)
    assert f"note: {c} could not be told" in r.stdout and "old copy" in r.stdout, r.stdout
    d = env.path("d.img")
    raid1fs("add", mnt, d)
    raid1fs("rebuild", "--wait", mnt)
    raid1fs("fail", mnt, d)
    r = raid1fs("remove", mnt, d)
    assert r.stdout.startswith(f"{d}: removed") and "note:" not in r.stdout, r.stdout
    raid1fs("umount", mnt)
    raid1fs("mount", "--degraded", c, mnt)  # c cannot know
    _write(mnt, b"C" * MiB)
    raid1fs("umount", mnt)
    r = raid1fs("mount", a, b, c, mnt, check=False)
    assert r.returncode != 0 and "split brain" not in r.stderr, r.stderr
    assert str(c) in r.stderr and "removed" in r.stderr, r.stderr


def test_replace_of_a_member_not_in_the_mount_says_it_cannot_be_told(env):
    """replace OLD NEW with OLD missing from the mount: NEW is rebuilt and
    OLD dropped, and the command says OLD's own metadata will not know."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = _mountpoint(env)
    raid1fs("mount", "--degraded", a, mnt)
    c = env.path("c.img")
    r = raid1fs("replace", mnt, b, c)
    assert f"note: {b} could not be told" in r.stdout, r.stdout
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert [m["path"] for m in st["members"]] == [str(a), str(c)], st["members"]
    r = raid1fs("replace", mnt, c, env.path("d.img"))
    assert "note:" not in r.stdout, r.stdout
    raid1fs("rebuild", "--wait", mnt)
    raid1fs("umount", mnt)


def test_remove_narrows_the_mirror_down_to_two_ways(env):
    """`add` to a full mirror widens it (and says so); failing and removing
    a member narrows it again, so a mistaken add, or a new member that died
    in its rebuild, does not leave the volume degraded for good. A 2-way
    mirror stays 2-way: it is degraded until a member is added."""
    a, b = env.create("a.img", "b.img", size="16M")
    c = env.path("c.img")
    mnt = env.mount(a, b)
    r = raid1fs("add", mnt, c)
    assert "now a 3-way mirror" in r.stdout, r.stdout
    raid1fs("rebuild", "--wait", mnt)
    raid1fs("fail", mnt, c)
    assert status_json(mnt)["volume"]["state"] == "degraded"
    raid1fs("remove", mnt, c)
    r = raid1fs("status", "--json", mnt, check=False)
    st = json.loads(r.stdout)
    assert (st["volume"]["members_expected"], st["volume"]["state"], r.returncode) == \
        (2, "clean", 0)
    raid1fs("fail", mnt, b)
    r = raid1fs("remove", mnt, b)
    assert "-way mirror" not in r.stdout, r.stdout
    st = status_json(mnt)
    assert (st["volume"]["members_expected"], st["volume"]["state"]) == (2, "degraded")
    raid1fs("umount", mnt)
    st = status_json(a)
    assert (st["volume"]["members_expected"], st["volume"]["state"]) == (2, "degraded")


def test_a_new_split_after_prefer_is_found_again(env):
    """--prefer settles a split for good, but only that one: the loser,
    used alone once more afterwards, is split again, even when the winner's
    counter is far ahead of its own."""
    a, b, s, mnt = _spare_took_the_place_of_b(env)
    for _ in range(4):  # a's side goes on: its counter runs ahead of b's
        raid1fs("mount", a, s, mnt)
        raid1fs("umount", mnt)
    raid1fs("mount", "--degraded", b, mnt)
    _write(mnt, b"B" * MiB, 4 * MiB)
    raid1fs("umount", mnt)
    raid1fs("mount", "--prefer", a, a, b, s, mnt)
    raid1fs("umount", mnt)
    raid1fs("mount", "--degraded", b, mnt)  # a new split
    _write(mnt, b"C" * MiB, 8 * MiB)
    raid1fs("umount", mnt)
    r = raid1fs("mount", a, b, s, mnt, check=False)
    assert r.returncode != 0 and "split brain" in r.stderr and str(b) in r.stderr, r.stderr
    assert json.loads(raid1fs("status", "--json", a, b, s, check=False).stdout)[
        "volume"].get("split_brain")


def test_prefer_without_a_split_is_refused(env):
    """--prefer naming a member that is only behind (failed, not used since)
    would make its old roster call both members in sync with different
    data: refused, naming it; nothing written."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = _mountpoint(env)
    raid1fs("mount", a, b, mnt)
    raid1fs("fail", mnt, b)
    _write(mnt, b"A" * MiB)
    raid1fs("umount", mnt)
    before = [open(p, "rb").read() for p in (a, b)]
    r = raid1fs("mount", "--prefer", b, a, b, mnt, check=False)
    assert r.returncode != 0 and str(b) in one_line(r.stderr), r.stderr
    assert "split brain" in r.stderr
    assert [open(p, "rb").read() for p in (a, b)] == before
    assert not os.path.ismount(mnt)
    # --prefer naming no member given is bad usage
    c = env.path("c.img")
    r = raid1fs("mount", "--prefer", c, a, b, mnt, check=False)
    assert r.returncode == 2 and f"{c}: --prefer names a path" in one_line(r.stderr), r.stderr
    assert [open(p, "rb").read() for p in (a, b)] == before


def test_remove_narrows_by_at_most_the_slot_removed(env):
    """Failed and missing members still count: removing one member of a
    4-way mirror whose other member is missing leaves it 3-way (the missing
    one is resynced when it comes back), and a 3-way mirror whose failed
    member was re-added stays 3-way after a newcomer that died is removed."""
    a, b, c, d = env.create("a.img", "b.img", "c.img", "d.img", size="16M")
    mnt = _mountpoint(env)
    raid1fs("mount", "--degraded", a, b, d, mnt)  # c missing
    raid1fs("fail", mnt, d)
    r = raid1fs("remove", mnt, d)
    assert "now a 3-way mirror" in r.stdout, r.stdout
    raid1fs("umount", mnt)
    raid1fs("mount", a, b, c, mnt)
    assert member_state(status_json(mnt), c) in ("rebuilding", "online")
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert (st["volume"]["members_expected"], st["volume"]["state"]) == (3, "clean")

    e = env.path("e.img")
    raid1fs("fail", mnt, c)
    raid1fs("add", mnt, e)  # takes c's place: not widened
    raid1fs("fail", mnt, e)
    r = raid1fs("remove", mnt, e)
    assert "-way mirror" not in r.stdout, r.stdout
    raid1fs("add", mnt, c)
    raid1fs("rebuild", "--wait", mnt)
    st = status_json(mnt)
    assert (st["volume"]["members_expected"], st["volume"]["state"]) == (3, "clean")
    raid1fs("umount", mnt)


def test_new_member_not_yet_named_by_its_own_metadata_is_not_removed(env):
    """A spare whose own metadata is as `add` first wrote it (a roster
    without itself: the commit naming it reached only the others) is still
    a member: the mount takes it, as a spare."""
    from raid1fs.superblock import read_superblock, write_superblock

    a, b = env.create("a.img", "b.img", size="16M")
    s = env.path("s.img")
    mnt = _mountpoint(env)
    raid1fs("mount", a, b, mnt)
    raid1fs("add", "--spare", mnt, s)
    raid1fs("umount", mnt)
    fd = os.open(s, os.O_RDWR)
    try:
        sb, _ = read_superblock(fd, str(s))
        sb.roster = [e for e in sb.roster if e.uuid != sb.member_uuid]
        write_superblock(fd, sb)
    finally:
        os.close(fd)
    raid1fs("mount", a, b, s, mnt)
    assert member_state(status_json(mnt), s) == "spare"
    raid1fs("umount", mnt)


def test_a_member_whose_place_a_spare_took_stays_out_until_removed_or_added(env):
    """b failed and spare s took its place. b, given at the next mount, is
    stale and surplus: `rebuild` does not make it a third copy of a 2-way
    mirror (it says why), the volume is degraded (exit 1: not every member
    is in sync) and status says what to do; `remove b` makes it clean."""
    a, b, s, mnt = _spare_took_the_place_of_b(env)
    raid1fs("mount", a, b, s, mnt)
    r = raid1fs("rebuild", "--wait", mnt, check=False)
    assert f"{b}: not resynced: the volume already has its 2 members" in r.stdout, r.stdout
    assert r.returncode == 1
    st = status_json(mnt)
    assert member_state(st, b) == "stale" and st["volume"]["members_expected"] == 2
    assert [m["state"] for m in st["members"]].count("online") == 2
    assert st["volume"]["state"] == "degraded"
    r = raid1fs("status", mnt, check=False)
    assert r.returncode == 1 and f"`raid1fs remove` {b}" in r.stdout, r.stdout
    raid1fs("remove", mnt, b)
    st = status_json(mnt)
    assert st["volume"]["state"] == "clean" and st["volume"]["members_expected"] == 2
    assert raid1fs("status", mnt, check=False).returncode == 0
    raid1fs("umount", mnt)
    assert data_region_hash(a) == data_region_hash(s)
