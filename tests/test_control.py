"""Guarantee 10 (the control path is private), `status`, counters, events
and mount options, on a mounted disk volume."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    NOBODY,
    MiB,
    _unmount_raid1fs,
    member_state,
    one_line,
    process_gone,
    raid1fs,
    run,
    sha256,
    status_json,
    wait_for,
)

from raid1fs import control
from raid1fs.superblock import read_superblock


def member(st: dict, path) -> dict:
    return next(m for m in st["members"] if m["path"] == str(path))


# ----- guarantee 10 -----------------------------------------------------------------

def test_the_user_who_mounted_is_let_through_and_other_users_are_not():
    """Guarantee 10 for a mount made by an unprivileged user (uid nobody
    here): the control channel serves that user and root, and refuses any
    other user, by the peer's credentials (the socket itself is 0666). The
    mount's own server, on a socket of its own (this machine lets only
    root open /dev/fuse, so nobody cannot mount for real)."""
    import tempfile

    import trio

    other = str(int(NOBODY) - 1)  # a uid with no account: a stranger
    d = tempfile.mkdtemp(prefix="raid1fs-ctl-")
    os.chmod(d, 0o755)
    sock = os.path.join(d, "c.sock")
    client = ("import json, socket, sys; s = socket.socket(socket.AF_UNIX); "
              "s.connect(sys.argv[1]); s.sendall(b'{\"cmd\": \"fail\"}\\n'); "
              "print(json.loads(s.makefile().readline()))")
    answers = {}

    async def failed(req):
        return "failed"

    async def main() -> None:
        server = control.ControlServer(sock, {"fail": failed}, owner_uid=int(NOBODY))
        async with trio.open_nursery() as n:
            await n.start(server.serve)
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
            for who in (NOBODY, other, "0"):
                cmd = ["setpriv", f"--reuid={who}", f"--regid={who}", "--clear-groups", "--",
                       sys.executable, "-c", client, sock]
                r = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                           check=False)
                answers[who] = (r.stdout.decode() + r.stderr.decode()).strip()
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        subprocess.run(["rm", "-rf", d])
    assert answers[NOBODY] == "{'ok': True, 'result': 'failed'}", answers
    assert answers["0"] == "{'ok': True, 'result': 'failed'}", answers
    assert "'ok': False" in answers[other] and "permission denied" in answers[other], answers
    assert f"only root and uid {NOBODY}" in answers[other], answers


def test_nobody_can_run_the_client():
    """Sanity for the tests below: user nobody can start the raid1fs CLI
    from the project's venv (else a refusal would prove nothing)."""
    r = run(sys.executable, "-m", "raid1fs", "--version", user=NOBODY, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("raid1fs ")


@pytest.mark.parametrize("cmd", ["fail", "remove"])
def test_other_user_cannot_fail_or_remove(env, cmd):
    """A user who neither is root nor mounted the volume gets "permission
    denied" (one line, non-zero exit) from fail and remove, and the member
    keeps its state; root can still do it afterwards."""
    (a, b), mnt = env.volume(size="16M")
    if cmd == "remove":
        raid1fs("fail", mnt, a)  # remove needs a failed member
    want = member_state(status_json(mnt), a)
    r = raid1fs(cmd, mnt, a, user=NOBODY, check=False)
    assert r.returncode not in (0, 2), (r.returncode, r.stderr)
    line = one_line(r.stderr)
    assert "permission denied" in line.lower(), line
    # The refusal came from the mount, on the peer's credentials: it reached
    # the control socket (not a client-side EACCES) and was logged there.
    log = os.path.join(os.environ["RAID1FS_RUN_DIR"], control.mount_key(str(mnt)) + ".log")
    refusals = [ln for ln in open(log) if "refused" in ln and cmd in ln and NOBODY in ln]
    assert refusals, f"no refusal of {cmd} by uid {NOBODY} in {log}"
    st = status_json(mnt)
    assert member_state(st, a) == want
    assert [m["path"] for m in st["members"]] == [str(a), str(b)]
    raid1fs(cmd, mnt, a)  # root may
    st = status_json(mnt)
    if cmd == "fail":
        assert member_state(st, a) == "failed"
    else:
        assert [m["path"] for m in st["members"]] == [str(b)]


# ----- status -----------------------------------------------------------------------

def test_status_human_table(env):
    """The human form has a header with READ/WRITE/CKSUM columns and one row
    per member with its state."""
    (a, b), mnt = env.volume(size="16M")
    raid1fs("fail", mnt, a)
    r = raid1fs("status", mnt, check=False)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    header = next(ln for ln in lines if "READ" in ln)
    assert {"STATE", "READ", "WRITE", "CKSUM"} <= set(header.split()), header
    rows = {p: [ln for ln in lines if str(p) in ln.split()] for p in (a, b)}
    assert len(rows[a]) == 1 and len(rows[b]) == 1, r.stdout
    assert "failed" in rows[a][0].split()
    assert "online" in rows[b][0].split()
    assert "DEGRADED" in r.stdout


def test_status_shows_an_empty_slot_and_what_a_rebuild_replaces(env):
    """After `remove` on a 2-way mirror the table says a slot has no member;
    while `replace` runs, the new member's progress line names the old one
    (JSON: members[].rebuild.replaces)."""
    (a, b), mnt = env.volume(size="64M", opts=["--max-rebuild-rate", "1M"])
    c = env.path("c.img")
    raid1fs("replace", mnt, b, c)
    r = raid1fs("status", mnt, check=False)
    assert f"(replacing {b})" in r.stdout, r.stdout
    assert member(status_json(mnt), c)["rebuild"]["replaces"] == str(b)
    raid1fs("fail", mnt, c)
    raid1fs("remove", mnt, c)
    r = raid1fs("status", mnt, check=False)
    assert "empty: 1 of the 2 slots without a member" not in r.stdout, r.stdout  # a, b
    raid1fs("fail", mnt, b)
    raid1fs("remove", mnt, b)
    r = raid1fs("status", mnt, check=False)
    assert r.returncode == 1 and "empty: 1 of the 2 slots without a member" in r.stdout, \
        r.stdout


def test_status_json_has_every_contract_field(env):
    """`status --json` carries every field the contract lists, with the
    right types, for a mount and for the members of an unmounted volume."""
    (a, b), mnt = env.volume(size="16M")
    for target, mounted in (((mnt,), True), ((a, b), False)):
        if not mounted:
            raid1fs("umount", mnt)
        st = status_json(*target)
        v = st["volume"]
        assert isinstance(v["uuid"], str) and len(v["uuid"]) == 36
        assert isinstance(v["name"], str)
        assert v["kind"] == "disk"
        assert v["state"] == "clean"
        assert v["members_expected"] == 2 and isinstance(v["members_expected"], int)
        assert v["mounted"] is mounted
        assert [m["path"] for m in st["members"]] == [str(a), str(b)]
        uuids = set()
        for slot, m in enumerate(st["members"]):
            assert os.path.isabs(m["path"])
            assert isinstance(m["uuid"], str) and len(m["uuid"]) == 36
            uuids.add(m["uuid"])
            assert m["slot"] == slot
            assert m["state"] == "online"
            assert isinstance(m["events"], int) and not isinstance(m["events"], bool)
            assert set(m["errors"]) >= {"read", "write", "checksum"}
            assert all(type(m["errors"][k]) is int for k in ("read", "write", "checksum"))
            assert type(m["reads"]) is int and type(m["writes"]) is int
            assert m["rebuild"] is None
            assert type(m["data_offset"]) is int
            assert m["data_offset"] > 0 and m["data_offset"] % MiB == 0
        assert len(uuids) == 2 and v["uuid"] not in uuids


@pytest.mark.parametrize("what", ["plain-dir", "plain-file", "nonexistent"])
def test_status_exit_3_when_it_cannot_tell(env, what):
    """status of a path that is neither a raid1fs mount nor a member exits 3
    with one line naming it."""
    p = env.path("thing")
    if what == "plain-dir":
        p.mkdir()
    elif what == "plain-file":
        p.write_bytes(b"\0" * 65536)
    for args in ((p,), ("--json", p)):
        r = raid1fs("status", *args, check=False)
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        assert str(p) in one_line(r.stderr)


def test_status_exit_codes_clean_and_degraded(env):
    """status exits 0 while every member is in sync and 1 once one failed,
    for the mount and for the members after umount."""
    (a, b), mnt = env.volume(size="16M")
    assert raid1fs("status", mnt, check=False).returncode == 0
    assert raid1fs("status", "--json", mnt, check=False).returncode == 0
    raid1fs("fail", mnt, a)
    assert raid1fs("status", mnt, check=False).returncode == 1
    assert raid1fs("status", "--json", mnt, check=False).returncode == 1
    raid1fs("umount", mnt)
    assert raid1fs("status", a, b, check=False).returncode == 1


def test_events_counter_rises_on_every_state_change(env):
    """Members' event counters are equal when clean and rise at mount, at a
    fail (on the survivor, not on the failed member) and at umount."""
    a, b = env.create("a.img", "b.img", size="16M")
    st = status_json(a, b)
    e0 = member(st, a)["events"]
    assert member(st, b)["events"] == e0 == st["volume"]["events"]

    mnt = env.mount(a, b)
    st = status_json(mnt)
    e1 = member(st, a)["events"]
    assert e1 > e0 and member(st, b)["events"] == e1

    raid1fs("fail", mnt, a)
    st = status_json(mnt)
    e2 = member(st, b)["events"]
    assert e2 > e1
    assert member(st, a)["events"] < e2  # the failed member missed the change

    raid1fs("umount", mnt)
    st = status_json(b)
    assert member(st, b)["events"] > e2
    st = status_json(a, b)
    assert member(st, a)["events"] < member(st, b)["events"]
    assert member_state(st, a) == "stale"


# ----- fail and remove refusals -----------------------------------------------------

def test_fail_and_remove_refusals(env):
    """fail of an unknown path, fail of the last in-sync member, fail of an
    already failed member and remove of an online member are refused with
    one line naming the member; the volume keeps running on the survivor."""
    (a, b), mnt = env.volume(size="16M")
    stranger = env.path("stranger.img")
    r = raid1fs("fail", mnt, stranger, check=False)
    assert r.returncode not in (0, 2) and str(stranger) in one_line(r.stderr)
    r = raid1fs("remove", mnt, a, check=False)
    assert r.returncode not in (0, 2) and str(a) in one_line(r.stderr)
    assert status_json(mnt)["volume"]["state"] == "clean"

    raid1fs("fail", mnt, a)
    r = raid1fs("fail", mnt, b, check=False)
    assert r.returncode not in (0, 2) and str(b) in one_line(r.stderr)
    r = raid1fs("fail", mnt, a, check=False)
    assert r.returncode not in (0, 2) and str(a) in one_line(r.stderr)
    st = status_json(mnt)
    assert member_state(st, a) == "failed"
    assert member_state(st, b) == "online"
    assert st["volume"]["state"] == "degraded"
    payload = os.urandom(MiB)
    with open(mnt / "disk", "r+b") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(mnt / "disk", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MiB)
        assert os.preadv(fd, [buf], 0) == MiB
        assert bytes(buf) == payload
    finally:
        os.close(fd)


def test_control_commands_on_a_path_that_is_not_a_mount(env):
    """fail and remove against a directory that is not a raid1fs mount fail
    with one line naming it."""
    a, _ = env.create("a.img", "b.img", size="16M")
    d = env.mkdir("notmounted")
    for cmd in ("fail", "remove"):
        r = raid1fs(cmd, d, a, check=False)
        assert r.returncode not in (0, 2)
        assert str(d) in one_line(r.stderr)


# ----- I/O counters -----------------------------------------------------------------

def test_reads_and_writes_counters(env):
    """Writes through the disk count on both members; reads count on at
    least one; nothing counts as an error."""
    (a, b), mnt = env.volume(size="16M")
    payload = os.urandom(4 * MiB)
    fd = os.open(mnt / "disk", os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(payload))
        buf[:] = payload
        assert os.pwritev(fd, [buf], 0) == len(payload)
        os.fsync(fd)
        back = mmap.mmap(-1, len(payload))
        assert os.preadv(fd, [back], 0) == len(payload)
        assert bytes(back) == payload
    finally:
        os.close(fd)
    st = status_json(mnt)
    ma, mb = member(st, a), member(st, b)
    assert ma["writes"] > 0 and mb["writes"] > 0
    assert ma["writes"] == mb["writes"]
    assert ma["reads"] + mb["reads"] > 0
    for m in (ma, mb):
        assert m["errors"]["read"] == m["errors"]["write"] == m["errors"]["checksum"] == 0


def test_concurrent_reads_are_spread_over_members(env):
    """Several threads reading different regions at once (O_DIRECT, so
    every read reaches raid1fs) are served by both members."""
    (a, b), mnt = env.volume(size="32M")
    with open(mnt / "disk", "r+b") as f:
        f.write(os.urandom(32 * MiB))
        f.flush()
        os.fsync(f.fileno())
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def reader(i: int) -> None:
        try:
            fd = os.open(mnt / "disk", os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 256 << 10)
                start.wait()
                for k in range(16):
                    os.preadv(fd, [buf], i * 8 * MiB + k * (256 << 10))
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    st = status_json(mnt)
    reads = {m["path"]: m["reads"] for m in st["members"]}
    assert sum(reads.values()) >= 64, reads
    assert reads[str(a)] > 0 and reads[str(b)] > 0, reads


# ----- events -----------------------------------------------------------------------

def test_on_event_runs_the_command(env):
    """--on-event runs the command through the shell with RAID1FS_EVENT,
    RAID1FS_MEMBER, RAID1FS_VOLUME and RAID1FS_MOUNTPOINT: failing a member
    logs member-failed (naming it) and degraded."""
    a, b = env.create("a.img", "b.img", size="16M")
    log = env.path("events.log")
    cmd = (f'echo "$RAID1FS_EVENT $RAID1FS_MEMBER|$RAID1FS_VOLUME|$RAID1FS_MOUNTPOINT"'
           f' >> {log}')
    mnt = env.mount(a, b, opts=["--on-event", cmd])
    uuid = status_json(mnt)["volume"]["uuid"]
    raid1fs("fail", mnt, a)

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    wait_for(lambda: any(ln.startswith("degraded") for ln in lines())
             and any(ln.startswith("member-failed") for ln in lines()),
             timeout=10, what="member-failed and degraded in the event log")
    failed = next(ln for ln in lines() if ln.startswith("member-failed"))
    assert failed.startswith(f"member-failed {a}|")
    assert failed.split("|")[1:] == [uuid, str(mnt)]


def test_a_hook_still_running_at_umount_is_stopped_with_all_it_started(env):
    """An --on-event command that does not end (it started a long `sleep`)
    is stopped when the mount ends, with what it started: nothing of it
    outlives the mount process. The members end clean."""
    a, b = env.create("a.img", "b.img", size="16M")
    pids = env.path("hook.pids")
    mnt = env.mount(a, b, opts=["--on-event", f"sleep 300 & echo $! >> {pids}; wait"])
    pid = status_json(mnt)["daemon"]["pid"]
    raid1fs("fail", mnt, a)
    wait_for(lambda: pids.exists() and pids.read_text().strip(), timeout=10,
             what="the hook to start its sleep")
    raid1fs("umount", mnt, timeout=60)  # queued events get a few seconds, then it is stopped
    wait_for(lambda: process_gone(pid), timeout=30, what="the mount process to end")
    sleeps = [int(x) for x in pids.read_text().split()]
    wait_for(lambda: all(process_gone(p) for p in sleeps), timeout=10,
             what=f"the hook's sleep {sleeps} to be stopped")
    assert raid1fs("status", b, a, check=False).returncode == 1  # a failed: clean, degraded
    assert status_json(a, b)["volume"]["clean_shutdown"] is True


# ----- mount options ----------------------------------------------------------------

def test_readonly_mount(env):
    """-o ro: opening the disk for writing fails with EROFS, reads work, and
    no member changes across the mount and the umount."""
    a, b = env.create("a.img", "b.img", size="16M")
    before = {str(p): sha256(p) for p in (a, b)}
    mnt = env.mount(a, b, opts=["-o", "ro"])
    with pytest.raises(OSError) as e:
        os.open(mnt / "disk", os.O_RDWR)
    assert e.value.errno == errno.EROFS
    with open(mnt / "disk", "rb") as f:
        assert f.read(MiB) == bytes(MiB)
    st = status_json(mnt)
    assert st["volume"]["state"] == "clean"
    assert st["volume"].get("readonly") is True
    # fail works for this mount (reads leave the member) and writes nothing
    r = raid1fs("fail", mnt, a, check=False)
    assert r.returncode == 0, r.stderr
    st = status_json(mnt)
    assert member_state(st, a) == "failed" and st["volume"]["state"] == "degraded"
    with open(mnt / "disk", "rb") as f:
        assert f.read(MiB) == bytes(MiB)
    r = raid1fs("add", mnt, env.path("c.img"), check=False)
    assert r.returncode == 1 and "read-only" in r.stderr
    r = raid1fs("remove", mnt, a, check=False)  # would last only until the next mount
    assert r.returncode == 1 and "read-only" in r.stderr
    r = raid1fs("rebuild", mnt, check=False)
    assert r.returncode == 1 and one_line(r.stderr).startswith(f"raid1fs: {mnt}: "), r.stderr
    assert "read-only" in r.stderr
    raid1fs("umount", mnt)
    assert {str(p): sha256(p) for p in (a, b)} == before


def test_readonly_mount_with_a_spare_survives_a_failure(env):
    """A spare does not take over on a read-only mount (its rebuild would
    write): the mount stays up and no member changes."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mount(a, b)
    s = env.path("s.img")
    raid1fs("add", "--spare", mnt, s)
    raid1fs("umount", mnt)
    before = {str(p): sha256(p) for p in (a, b, s)}
    mnt = env.mount(a, b, s, opts=["-o", "ro"])
    raid1fs("fail", mnt, a)
    time.sleep(0.5)  # a takeover would start at once
    st = status_json(mnt)
    assert member_state(st, s) == "spare" and member_state(st, a) == "failed"
    with open(mnt / "disk", "rb") as f:
        assert f.read(MiB) == bytes(MiB)
    raid1fs("umount", mnt)
    assert {str(p): sha256(p) for p in (a, b, s)} == before


def test_sync_mount_round_trips_data(env):
    """-o sync: the mount works, and data written lands identically on both
    members (read directly from their data regions)."""
    (a, b), mnt = env.volume(size="16M", opts=["-o", "sync"])
    payload = os.urandom(2 * MiB)
    with open(mnt / "disk", "r+b") as f:
        f.seek(MiB)
        f.write(payload)
    with open(mnt / "disk", "rb") as f:
        f.seek(MiB)
        assert f.read(len(payload)) == payload
    st = status_json(mnt)
    off = member(st, a)["data_offset"]
    # Both members hold the data, read directly from their data regions.
    for p in (a, b):
        with open(p, "rb") as f:
            f.seek(off + MiB)
            assert f.read(len(payload)) == payload
    raid1fs("umount", mnt)
    assert json.loads(raid1fs("status", "--json", a, b).stdout)["volume"]["state"] == "clean"


def test_on_event_commands_run_in_order_from_where_mount_ran(env):
    """A relative command (and what it writes) is found from the directory
    `mount` ran in, although the mount process itself runs in /; handlers
    run one at a time, in the order of the events, even when one is slow,
    and those queued at unmount are still delivered."""
    a, b = env.create("a.img", "b.img", size="16M")
    script = env.path("ev.sh")
    script.write_text('#!/bin/sh\n[ "$RAID1FS_EVENT" = member-failed ] && sleep 0.3\n'
                      'echo "$RAID1FS_EVENT" >> events.log\n')
    script.chmod(0o755)
    mnt = env.mkdir("mnt")
    raid1fs("mount", "--on-event", "./ev.sh", a, b, mnt, cwd=env.tmp)
    env.cleanup.push(_unmount_raid1fs, str(mnt))
    raid1fs("fail", mnt, a)
    raid1fs("umount", mnt)  # at once: what is queued is still delivered
    log = env.path("events.log")
    assert log.read_text().split() == ["member-failed", "degraded"]


def test_mount_point_named_through_a_symlink(env):
    """Mounted through a symlink, a relative one: status shows the real
    directory, and both names reach the mount (status, umount)."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mkdir("mnt")
    os.symlink("mnt", env.path("link"))
    raid1fs("mount", a, b, "link/", cwd=env.tmp)
    env.cleanup.push(_unmount_raid1fs, str(mnt))
    assert status_json(env.path("link"))["volume"]["mountpoint"] == str(mnt)
    raid1fs("umount", "link", cwd=env.tmp)
    assert not os.path.ismount(mnt)
    assert status_json(a, b)["volume"]["clean_shutdown"] is True


def test_status_into_a_closed_pipe_prints_no_traceback(env):
    """`raid1fs status --json ... | head -c1`: the reader goes away early
    (here before status writes anything)."""
    a, b = env.create("a.img", "b.img", size="16M")
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "raid1fs", "status", "--json", a, b],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()
        err = p.stderr.read().decode()
        p.wait(timeout=30)
        assert err == "", err


def test_status_of_members_of_a_running_mount(env):
    """`raid1fs status MEMBER` while a mount holds the members: their own
    metadata lags behind (it says dirty, and a subset looks degraded), so
    the running mount is asked; one that does not answer gives 'cannot
    tell' (exit 3), and JSON says mounted."""
    a, b, c = env.create("a.img", "b.img", "c.img", size="16M")
    mnt = env.mount(a, b, c)
    r = raid1fs("status", "--json", a, check=False)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["volume"]["mounted"] is True and st["volume"]["mountpoint"] == str(mnt)
    assert [m["state"] for m in st["members"]] == ["online"] * 3
    pid = st["daemon"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        r = raid1fs("status", "--json", a, check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        st = json.loads(r.stdout)
        assert st["volume"]["mounted"] is True and st["volume"]["in_use"] == [str(a)]
        r = raid1fs("status", a, check=False)
        assert r.returncode == 3 and "did not answer" in r.stdout
    finally:
        os.kill(pid, signal.SIGCONT)


def test_disk_attributes_outlive_the_mount(env):
    """chmod, chown and utimens on `disk` (and on the mount's root) are
    written to every member before they return (guarantee 1), so a remount
    shows them again."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mount(a, b)
    disk = mnt / "disk"
    os.chmod(disk, 0o640)
    os.chown(disk, 1234, 5678)
    os.utime(disk, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    events = status_json(mnt)["volume"]["events"]
    for p in (a, b):  # on each member on its own, already while mounted
        fd = os.open(p, os.O_RDONLY)
        try:
            sb, _ = read_superblock(fd, str(p))
        finally:
            os.close(fd)
        assert sb.attrs == {"mode": 0o640, "uid": 1234, "gid": 5678,
                            "atime_ns": 1_600_000_000_000_000_000,
                            "mtime_ns": 1_500_000_000_000_000_000}, sb.attrs
    os.chmod(disk, 0o640)  # no change: nothing written
    assert status_json(mnt)["volume"]["events"] == events
    raid1fs("umount", mnt)
    mnt = env.mount(a, b)
    st = os.stat(mnt / "disk")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_600_000_000_000_000_000,
                                                1_500_000_000_000_000_000)
    # The mount's root directory too (chmod 700 to keep others out of it).
    os.chmod(mnt, 0o700)
    os.chown(mnt, 4321, 8765)
    raid1fs("umount", mnt)
    mnt = env.mount(a, b)
    st = os.stat(mnt)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 4321, 8765)
    assert stat.S_IMODE(os.stat(mnt / "disk").st_mode) == 0o640


def test_status_of_members_finds_a_mount_with_an_unusual_name(env):
    """Mount point and volume name with a space, a comma and non-ASCII
    letters: the mount is still found from its members (mountinfo escapes)."""
    a, b = env.path("a.img"), env.path("b.img")
    raid1fs("create", "--kind", "disk", "--size", "16M", "--name", "vö lume,1", a, b)
    mnt = env.mount(a, b, mp="mnt vö")
    r = raid1fs("status", "--json", a, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["volume"]["mountpoint"] == str(mnt)


def test_members_named_another_way(env):
    """fail and remove take a member under another name of the same file
    (a symlink, as /dev/disk/by-id names a disk) and answer with the name
    the volume knows it by."""
    (a, b), mnt = env.volume(size="16M")
    link = env.path("by-id-a")
    link.symlink_to(a)
    r = raid1fs("fail", mnt, link)
    assert r.stdout.strip() == f"{a}: failed", r.stdout
    r = raid1fs("remove", mnt, link)
    assert r.stdout.strip() == f"{a}: removed", r.stdout
    assert [m["path"] for m in status_json(mnt)["members"]] == [str(b)]


def test_commands_after_the_mount_process_was_killed(env):
    """kill -9 of the mount process: status and fail say that its process is
    gone and how to go on (not "not a raid1fs mount point"); umount detaches
    it."""
    (a, b), mnt = env.volume(size="16M")
    pid = status_json(mnt)["daemon"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), what="mount gone")
    for cmd in (("status", mnt), ("fail", mnt, a)):
        r = raid1fs(*cmd, check=False)
        line = one_line(r.stderr)
        assert r.returncode not in (0, 2) and "process of this mount is gone" in line, r.stderr
        assert f"raid1fs umount {mnt}" in line
    raid1fs("umount", mnt)
    assert not os.path.ismount(mnt)


def test_degraded_mount_names_the_members_not_given(env):
    """--degraded with a member simply not named: mount says which."""
    a, b, c = env.create("a.img", "b.img", "c.img", size="16M")
    mnt = env.mkdir("mnt")
    r = raid1fs("mount", "--degraded", a, b, mnt)
    env.cleanup.push(_unmount_raid1fs, str(mnt))
    assert f"{c}: not given; mounting without it" in r.stderr, r.stderr
    assert member_state(status_json(mnt), c) == "missing"


def test_other_user_cannot_umount(env):
    """A user who neither is root nor mounted the volume gets a clear
    refusal from `raid1fs umount`, and the mount stays."""
    (a, b), mnt = env.volume(size="16M")
    r = raid1fs("umount", mnt, user=NOBODY, check=False)
    line = one_line(r.stderr)
    assert r.returncode not in (0, 2) and "only root and the user who mounted it" in line, line
    assert os.path.ismount(mnt)


def test_resync_after_a_crash_is_not_reported_degraded(env):
    """After kill -9 with writes in flight the next mount resyncs with every
    member there: `rebuild-started`, but no `degraded` (a pager on it would
    fire at every crash recovery); a member missing at mount still is."""
    a, b = env.create("a.img", "b.img", size="16M")
    script = env.path("ev.sh")
    script.write_text('#!/bin/sh\necho "$RAID1FS_EVENT" >> events.log\n')
    script.chmod(0o755)
    log = env.path("events.log")
    mnt = env.mkdir("mnt")
    env.cleanup.push(_unmount_raid1fs, str(mnt))
    raid1fs("mount", a, b, mnt)
    with open(mnt / "disk", "r+b") as f:
        f.write(os.urandom(MiB))
    pid = status_json(mnt)["daemon"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), what="mount gone")
    raid1fs("umount", mnt)
    raid1fs("mount", "--on-event", "./ev.sh", a, b, mnt, cwd=env.tmp)
    raid1fs("rebuild", "--wait", mnt)
    raid1fs("umount", mnt)
    events = log.read_text().split()
    assert "rebuild-started" in events and "degraded" not in events, events
    raid1fs("mount", "--degraded", "--on-event", "./ev.sh", b, mnt, cwd=env.tmp)
    raid1fs("umount", mnt)
    assert log.read_text().split()[len(events):] == ["degraded"], log.read_text()


def test_mount_prunes_old_logs_of_mount_points_not_in_use(env):
    """Each mount point ever used leaves a log in the run directory; mount
    removes those (and unread exit reports) untouched for 30 days, and the
    sockets a killed mount left behind (nobody listens) once an hour old,
    unless that mount point is mounted now."""
    run_dir = os.environ["RAID1FS_RUN_DIR"]
    old = time.time() - 40 * 86400
    (a, b), mnt = env.volume(size="16M")
    live_log = os.path.join(run_dir, control.mount_key(str(mnt)) + ".log")
    stale = [os.path.join(run_dir, n) for n in ("0123456789abcdef.log",
                                                  "0123456789abcdef.sock.exit")]
    fresh = os.path.join(run_dir, "fedcba9876543210.log")
    live_sock = control.socket_path(str(mnt))
    dead_socks = [os.path.join(run_dir, n) for n in ("0123456789abcdef.sock",
                                                       "1123456789abcdef.sock")]
    for p in dead_socks:  # what kill -9 leaves: a bound socket nobody serves
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(p)
    # A mount in another mount namespace: not in our mount table, but it listens.
    elsewhere = socket.socket(socket.AF_UNIX)
    elsewhere_path = os.path.join(run_dir, "2123456789abcdef.sock")
    elsewhere.bind(elsewhere_path)
    elsewhere.listen()
    hour_ago = time.time() - 2 * 3600
    os.utime(dead_socks[0], (hour_ago, hour_ago))
    os.utime(elsewhere_path, (hour_ago, hour_ago))
    os.utime(live_sock, (old, old))
    for p in [*stale, fresh]:
        with open(p, "w") as f:
            f.write("x\n")
    for p in [*stale, live_log]:
        os.utime(p, (old, old))
    c, d = env.create("c.img", "d.img", size="16M")
    env.mount(c, d, mp="mnt2")
    assert not any(os.path.exists(p) for p in [*stale, dead_socks[0]])
    assert all(os.path.exists(p) for p in (fresh, live_log, live_sock, dead_socks[1],
                                            elsewhere_path))
    assert status_json(mnt)["volume"]["mounted"]  # its socket still answers
    elsewhere.close()
    for p in (fresh, dead_socks[1], elsewhere_path):
        os.unlink(p)


def test_umount_refused_while_a_loop_device_holds_the_disk_names_it(env):
    """umount while the disk is attached to a loop device: refused in one
    line that names the loop device and what to do; the mount goes on."""
    _, mnt = env.volume(size="16M")
    loop = env.losetup(mnt / "disk")
    r = raid1fs("umount", mnt, check=False)
    assert r.returncode not in (0, 2), r.stderr
    line = one_line(r.stderr)
    assert str(mnt) in line and f"{loop} attached to its disk" in line, line
    assert os.path.ismount(mnt) and status_json(mnt)["volume"]["state"] == "clean"


def test_umounts_at_the_same_time_all_succeed(env):
    """Three `raid1fs umount` of one mount at once: the mount ends with its
    members clean; each command exits 0, or, when the mount was gone before
    it asked, says so (one that asked while the mount was there and then
    lost the race to unmount it used to fail with fusermount3's "Invalid
    argument")."""
    (a, b), mnt = env.volume(size="16M")
    cmd = [sys.executable, "-m", "raid1fs", "umount", str(mnt)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or ("not a raid1fs mount point" in err
                             or "ended before answering" in err), results
    assert not os.path.ismount(mnt)
    assert status_json(a, b)["volume"]["state"] == "clean"


def test_another_user_cannot_hold_a_mount_point_against_root(env):
    """The claim a mount process holds on its mount point cannot be taken by
    another user first: `nobody`, running raid1fs's own claim for the mount
    point, is refused, and root's mount there works (an abstract socket
    named after the mount point, as the claim first was, could be bound by
    anyone and blocked every mount there)."""
    a, b = env.create("a.img", "b.img", size="16M")
    mnt = env.mkdir("mnt")
    code = ("import sys, time\n"
            "from raid1fs.mount import claim_mountpoint\n"
            "try:\n"
            "    claim_mountpoint(sys.argv[1], sys.argv[1])\n"
            "except Exception as e:\n"
            "    print('refused', e, flush=True); sys.exit(0)\n"
            "print('held', flush=True)\n"
            "time.sleep(30)\n")
    pw = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    holder = subprocess.Popen([*pw, sys.executable, "-c", code, os.path.realpath(mnt)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = holder.stdout.readline()
        assert said.startswith("refused"), (said, holder.stderr.read() if holder.poll() else "")
        mnt = env.mount(a, b)
    finally:
        holder.kill()
        holder.communicate()
    assert status_json(mnt)["volume"]["state"] == "clean"
