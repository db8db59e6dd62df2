"""tools/faultfs on real mounts under tmp_path.

Each test states what it proves. Tests that do not unmount share one mount
(each in its own directory, mode reset to ok after it); the others get their
own. Every mount is ended by its fixture, even when the test fails: mode ok,
`faultfs umount`, `fusermount3 -uz` as a last resort. Self-contained on
purpose (no conftest helpers).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

FAULTFS = Path(__file__).resolve().parent.parent / "tools" / "faultfs"
MiB = 1 << 20


def ff(*args, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FAULTFS), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(pred, timeout: float = 5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return v


def sock_of(mp: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(mp))).hexdigest()[:16]
    return Path(os.environ.get("FAULTFS_RUN_DIR") or "/run/faultfs") / f"{key}.sock"


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def control(mp: Path, req: dict) -> dict:
    """One request on the control socket, without the CLI (fast polling)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_of(mp)))
        s.sendall(json.dumps(req).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"], reply
    return reply


@dataclass
class Mount:
    src: Path  # this test's directory in SOURCE
    mp: Path  # the same directory through the mount
    root: Path  # the mount point
    rel: str = ""  # mp relative to root, for --match

    def set(self, mode: str, *extra) -> None:
        ff("set", self.root, mode, *extra)

    def status(self) -> dict:
        return json.loads(ff("status", self.root).stdout)

    def blocked(self) -> int:
        return control(self.root, {"cmd": "status"})["status"]["blocked"]


def _end(mp: Path) -> None:
    if not os.path.ismount(mp):  # the root's getattr is never faulted
        return
    ff("set", mp, "ok", check=False)
    r = ff("umount", mp, check=False)
    if r.returncode and os.path.ismount(mp):
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory):
    base = tmp_path_factory.mktemp("faultfs")
    src, mp = base / "src", base / "mnt"
    src.mkdir()
    mp.mkdir()
    ff("mount", src, mp)
    try:
        yield src, mp
    finally:
        _end(mp)


@pytest.fixture
def mnt(shared_mount, request):
    """A directory of its own on the shared mount; mode ok afterwards."""
    src, mp = shared_mount
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)
    (src / name).mkdir()
    try:
        yield Mount(src / name, mp / name, mp, name)
    finally:
        if os.path.ismount(mp):
            control(mp, {"cmd": "set", "mode": "ok"})


@pytest.fixture
def own_mnt(tmp_path: Path):
    """A mount of its own, for tests that unmount it."""
    src, mp = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mp.mkdir()
    ff("mount", src, mp)
    try:
        yield Mount(src, mp, mp)
    finally:
        _end(mp)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("faultfs: "), r.stderr
    return lines[0]


# ---------------------------------------------------------------------------


def test_passthrough_file_io(mnt):
    """Reads, writes, fsync and truncate pass through to SOURCE, both ways and
    at once (no cache hides SOURCE changes); 1 MiB requests work and are
    delivered whole; inode numbers are faultfs's own."""
    faults_before = mnt.status()["faults_total"]
    data = os.urandom(4 * MiB + 123)
    f = mnt.mp / "f.bin"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
        os.fdatasync(fd)
        assert (mnt.src / "f.bin").read_bytes() == data
        assert os.pread(fd, MiB, MiB) == data[MiB:2 * MiB]
        assert os.pwrite(fd, b"x" * MiB, 2 * MiB) == MiB
        assert (mnt.src / "f.bin").read_bytes()[2 * MiB:3 * MiB] == b"x" * MiB
        with open(mnt.src / "f.bin", "r+b") as s:  # changed behind the mount
            s.write(b"SOURCE")
        assert os.pread(fd, 6, 0) == b"SOURCE"
        os.ftruncate(fd, 1000)
        assert os.fstat(fd).st_size == 1000 == (mnt.src / "f.bin").stat().st_size
    finally:
        os.close(fd)
    st = mnt.status()
    # Requests are capped at 256 pages of the caller's buffer: a buffer not
    # page-aligned gives 1 MiB minus its offset in the page, then the rest.
    assert MiB - 4096 < st["max_write"] <= MiB and MiB - 4096 < st["max_read"] <= MiB, st
    assert os.stat(f).st_ino != os.stat(mnt.src / "f.bin").st_ino
    assert st["ops"]["fsync"] >= 2 and st["faults_total"] == faults_before


def test_directory_operations(mnt):
    """Directory trees pass through: mkdir, a listing of 150 entries (several
    readdir requests) that is complete and stable, rename with NOREPLACE and
    EXCHANGE, symlink/readlink, hard links (one inode), mknod, chmod, chown,
    utimes, xattrs, statfs, unlink, rmdir."""
    d = mnt.mp / "d"
    d.mkdir()
    names = {f"file-{i:03d}" for i in range(150)}
    for n in names:
        (d / n).write_text(n)
    assert set(os.listdir(d)) == names == set(os.listdir(mnt.src / "d"))
    assert os.listdir(d) == os.listdir(d)  # the same order every time
    with os.scandir(d) as it:
        assert {e.name for e in it if e.is_file()} == names

    (d / "file-000").rename(mnt.mp / "moved")
    assert (mnt.src / "moved").read_text() == "file-000"
    libc = ctypes.CDLL(None, use_errno=True)
    a, b = os.fsencode(mnt.mp / "moved"), os.fsencode(d / "file-001")
    assert libc.renameat2(-100, a, -100, b, 1) == -1 and ctypes.get_errno() == errno.EEXIST
    assert libc.renameat2(-100, a, -100, b, 2) == 0  # RENAME_EXCHANGE
    assert (mnt.src / "moved").read_text() == "file-001"
    assert (d / "file-001").read_text() == "file-000"
    assert libc.renameat2(-100, a, -100, b, 4) == -1 and ctypes.get_errno() == errno.EINVAL

    os.symlink("moved", mnt.mp / "sl")
    assert os.readlink(mnt.mp / "sl") == "moved" == os.readlink(mnt.src / "sl")
    assert (mnt.mp / "sl").read_text() == "file-001"
    os.link(mnt.mp / "moved", mnt.mp / "hard")
    s1, s2 = os.stat(mnt.mp / "moved"), os.stat(mnt.mp / "hard")
    assert s1.st_ino == s2.st_ino and s1.st_nlink == 2
    os.mkfifo(mnt.mp / "fifo")
    assert stat.S_ISFIFO(os.lstat(mnt.src / "fifo").st_mode)

    f = mnt.mp / "moved"
    os.chmod(f, 0o640)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    os.setxattr(f, "user.k", b"v")
    s = os.stat(mnt.src / "moved")
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid) == (0o640, 1234, 5678)
    assert (s.st_atime_ns, s.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    assert os.getxattr(f, "user.k") == b"v" == os.getxattr(mnt.src / "moved", "user.k")
    assert "user.k" in os.listxattr(f)
    os.removexattr(f, "user.k")
    assert "user.k" not in os.listxattr(mnt.src / "moved")
    os.lchown(mnt.mp / "sl", 42, 43)
    assert os.lstat(mnt.src / "sl").st_uid == 42
    assert os.statvfs(mnt.mp).f_blocks == os.statvfs(mnt.src).f_blocks

    for n in os.listdir(d):
        os.unlink(d / n)
    os.rmdir(d)
    for n in ("moved", "hard", "sl", "fifo"):
        os.unlink(mnt.mp / n)
    assert os.listdir(mnt.mp) == [] == os.listdir(mnt.src)


def test_eio_fails_open_fd_and_ok_restores(mnt):
    """Mode eio: reads, writes and fsync of an already open fd fail with EIO,
    and so do new opens and listings; mode ok restores all of it."""
    (mnt.src / "f").write_bytes(b"a" * 8192)
    fd = os.open(mnt.mp / "f", os.O_RDWR)
    try:
        mnt.set("eio")
        for call in (lambda: os.pread(fd, 4096, 0), lambda: os.pwrite(fd, b"b", 0),
                     lambda: os.fsync(fd), lambda: open(mnt.mp / "f", "rb"),
                     lambda: os.listdir(mnt.mp), lambda: os.stat(mnt.mp / "f")):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EIO
        assert os.path.ismount(mnt.root)  # the root's getattr is spared
        st = mnt.status()
        assert st["mode"] == "eio" and st["faults"]["read"] >= 1 and st["faults"]["write"] >= 1
        mnt.set("ok")
        assert os.pwrite(fd, b"b", 0) == 1
        assert os.pread(fd, 2, 0) == b"ba"
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (mnt.src / "f").read_bytes()[:2] == b"ba"


def test_eio_read_fails_reads_only(mnt):
    """Mode eio-read: reads fail with EIO while writes, fsync and metadata
    changes succeed and land on SOURCE."""
    (mnt.src / "f").write_bytes(b"a" * 8192)
    fd = os.open(mnt.mp / "f", os.O_RDWR)
    try:
        mnt.set("eio-read")
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
        assert e.value.errno == errno.EIO
        assert os.pwrite(fd, b"new", 100) == 3
        os.fsync(fd)
        (mnt.mp / "created").write_bytes(b"c")
        os.mkdir(mnt.mp / "dir")
    finally:
        os.close(fd)
    assert (mnt.src / "f").read_bytes()[100:103] == b"new"
    assert (mnt.src / "created").read_bytes() == b"c"
    assert (mnt.src / "dir").is_dir()


def test_eio_write_fails_writes_only(mnt):
    """Mode eio-write: write, fsync, truncate and metadata changes fail with
    EIO and SOURCE is untouched, while reads succeed."""
    (mnt.src / "f").write_bytes(b"a" * 8192)
    fd = os.open(mnt.mp / "f", os.O_RDWR)
    try:
        mnt.set("eio-write")
        assert os.pread(fd, 4096, 0) == b"a" * 4096
        for call in (lambda: os.pwrite(fd, b"b", 0), lambda: os.fsync(fd),
                     lambda: os.ftruncate(fd, 10), lambda: os.mkdir(mnt.mp / "d"),
                     lambda: os.unlink(mnt.mp / "f"), lambda: open(mnt.mp / "g", "wb"),
                     lambda: os.chmod(mnt.mp / "f", 0o600)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EIO
        assert (mnt.mp / "f").read_bytes() == b"a" * 8192
    finally:
        os.close(fd)
    assert (mnt.src / "f").read_bytes() == b"a" * 8192
    assert sorted(os.listdir(mnt.src)) == ["f"]


def test_hang_blocks_until_mode_changes(mnt):
    """Mode hang: a read issued from a thread blocks (status counts it as
    blocked) until the mode is set back to ok; then it completes with the
    right data. The control channel answers meanwhile."""
    (mnt.src / "f").write_bytes(b"z" * 4096)
    fd = os.open(mnt.mp / "f", os.O_RDONLY)
    result = {}

    def reader():
        result["data"] = os.pread(fd, 4096, 0)

    try:
        mnt.set("hang")
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        wait_for(lambda: mnt.blocked() >= 1, what="a blocked read")
        t.join(0.3)
        assert t.is_alive(), "read returned while hung"
        mnt.set("ok")
        t.join(5)
        assert not t.is_alive()
        assert result["data"] == b"z" * 4096
        assert mnt.blocked() == 0
    finally:
        mnt.set("ok")
        os.close(fd)


def test_hang_then_eio_fails_blocked_operation(mnt):
    """A blocked operation decides again when the mode changes: switching
    from hang to eio makes the hung read fail with EIO."""
    (mnt.src / "f").write_bytes(b"z" * 4096)
    fd = os.open(mnt.mp / "f", os.O_RDONLY)
    result = {}

    def reader():
        try:
            os.pread(fd, 4096, 0)
        except OSError as e:
            result["errno"] = e.errno

    try:
        mnt.set("hang")
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        wait_for(lambda: mnt.blocked() >= 1, what="a blocked read")
        mnt.set("eio")
        t.join(5)
        assert result.get("errno") == errno.EIO
    finally:
        mnt.set("ok")
        os.close(fd)


def test_delay_slows_every_operation(mnt):
    """Mode delay --delay 0.5: a read of an open fd takes at least 0.5 s
    (and not much more); status reports the delay."""
    (mnt.src / "f").write_bytes(b"d" * 4096)
    fd = os.open(mnt.mp / "f", os.O_RDONLY)
    try:
        mnt.set("delay", "--delay", "0.5")
        assert mnt.status()["delay"] == 0.5
        t0 = time.monotonic()
        assert os.pread(fd, 4096, 0) == b"d" * 4096
        elapsed = time.monotonic() - t0
        assert 0.5 <= elapsed < 3, elapsed
    finally:
        mnt.set("ok")
        os.close(fd)


def test_flip_corrupts_block_starts_only(mnt):
    """Mode flip: reads succeed but the byte at every 4096-aligned file offset
    within the returned range is XORed with 0xFF, nothing else; SOURCE is
    unchanged and mode ok reads it intact."""
    data = os.urandom(3 * 4096 + 100)
    (mnt.src / "f").write_bytes(data)

    def flipped(off: int, n: int) -> bytes:
        b = bytearray(data[off:off + n])
        for p in range(len(b)):
            if (off + p) % 4096 == 0:
                b[p] ^= 0xFF
        return bytes(b)

    fd = os.open(mnt.mp / "f", os.O_RDONLY)
    try:
        mnt.set("flip")
        got = os.pread(fd, len(data), 0)
        assert got == flipped(0, len(data))
        assert sum(x != y for x, y in zip(got, data, strict=True)) == 4  # 0, 4K, 8K, 12K
        got = os.pread(fd, 8000, 100)
        assert got == flipped(100, 8000)
        assert got[3996] == data[4096] ^ 0xFF and got[:3996] == data[100:4096]
        assert os.pread(fd, 100, 4097) == data[4097:4197]  # no block start inside
        mnt.set("ok")
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert (mnt.src / "f").read_bytes() == data


def test_match_restricts_faults(mnt):
    """--match GLOB faults only matching paths (relative to the mount root,
    following renames); other files keep working."""
    (mnt.src / "sub").mkdir()
    (mnt.src / "sub" / "bad.img").write_bytes(b"b" * 4096)
    (mnt.src / "good.img").write_bytes(b"g" * 4096)
    bad = os.open(mnt.mp / "sub" / "bad.img", os.O_RDWR)
    good = os.open(mnt.mp / "good.img", os.O_RDWR)
    try:
        glob = f"{mnt.rel}/sub/bad*"
        mnt.set("eio", "--match", glob)
        assert mnt.status()["match"] == glob
        with pytest.raises(OSError) as e:
            os.pread(bad, 10, 0)
        assert e.value.errno == errno.EIO
        assert os.pread(good, 10, 0) == b"g" * 10
        assert os.pwrite(good, b"G", 0) == 1
        with pytest.raises(OSError):  # either name matching is enough
            os.rename(mnt.mp / "good.img", mnt.mp / "sub" / "bad2.img")
        mnt.set("ok")
        os.rename(mnt.mp / "good.img", mnt.mp / "sub" / "bad2.img")
        mnt.set("eio", "--match", glob)
        with pytest.raises(OSError):
            os.pread(good, 10, 0)  # the same file, now under a matching name
    finally:
        mnt.set("ok")
        os.close(bad)
        os.close(good)


def test_bad_input_gives_one_line_errors(mnt, tmp_path):
    """Unknown mode, --delay misuse, a mountpoint that is not a faultfs mount,
    a missing source: one line on stderr, exit 1, no traceback; argparse
    usage errors exit 2. The mount is unaffected."""
    assert "unknown mode" in one_line_error(ff("set", mnt.mp, "explode", check=False))
    assert "--delay" in one_line_error(ff("set", mnt.mp, "delay", check=False))
    assert "--delay" in one_line_error(ff("set", mnt.mp, "eio", "--delay", "1", check=False))
    assert "not a faultfs mount" in one_line_error(ff("set", tmp_path, "eio", check=False))
    assert "not a faultfs mount" in one_line_error(ff("status", tmp_path, check=False))
    assert "not a faultfs mount" in one_line_error(ff("umount", tmp_path, check=False))
    (tmp_path / "mp2").mkdir()
    one_line_error(ff("mount", tmp_path / "nope", tmp_path / "mp2", check=False))
    assert "already" in one_line_error(ff("mount", mnt.src, mnt.root, check=False))
    assert ff("set", mnt.mp, check=False).returncode == 2
    assert ff("frobnicate", check=False).returncode == 2
    assert mnt.status()["mode"] == "ok"


def test_umount_while_an_operation_hangs(own_mnt):
    """`faultfs umount` while a read hangs: it releases the read (which then
    completes normally), unmounts, and waits for the daemon to exit (control
    socket removed)."""
    mnt = own_mnt
    (mnt.src / "f").write_bytes(b"u" * 4096)
    pid = mnt.status()["pid"]
    result = {}

    def reader():
        fd = os.open(mnt.mp / "f", os.O_RDONLY)
        try:
            result["data"] = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)

    mnt.set("hang")
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    wait_for(lambda: mnt.blocked() >= 1, what="a blocked read")
    t0 = time.monotonic()
    ff("umount", mnt.mp)
    assert time.monotonic() - t0 < 5
    t.join(5)
    assert result.get("data") == b"u" * 4096
    assert not os.path.ismount(mnt.mp)
    assert not sock_of(mnt.mp).exists()
    assert wait_for(lambda: process_gone(pid), what="daemon exit")


def test_umount_releases_a_killed_hung_caller(own_mnt):
    """A caller SIGKILLed while hung cannot die until faultfs answers (FUSE
    waits for requests already in userspace); `faultfs umount` releases it,
    then unmounts."""
    mnt = own_mnt
    (mnt.src / "f").write_bytes(b"k" * 4096)
    mnt.set("hang")
    p = subprocess.Popen([sys.executable, "-c",
                          f"open({str(mnt.mp / 'f')!r}, 'rb').read()"])
    try:
        wait_for(lambda: mnt.blocked() >= 1, what="a blocked caller")
        p.send_signal(signal.SIGKILL)
        time.sleep(0.2)
        assert p.poll() is None  # still stuck in the kernel
        ff("umount", mnt.mp)
        assert p.wait(5) == -signal.SIGKILL
        assert not os.path.ismount(mnt.mp)
    finally:
        if p.poll() is None:
            ff("set", mnt.mp, "ok", check=False)
            p.wait(5)


def test_external_unmount_ends_daemon(own_mnt):
    """An unmount not done by faultfs (fusermount3 -u) ends the daemon
    promptly: control socket removed, process gone."""
    mnt = own_mnt
    pid = mnt.status()["pid"]
    subprocess.run(["fusermount3", "-u", str(mnt.mp)], check=True)
    wait_for(lambda: process_gone(pid), timeout=3, what="daemon exit")
    assert not sock_of(mnt.mp).exists()
    assert "not a faultfs mount" in one_line_error(ff("status", mnt.mp, check=False))


def test_lazy_unmount_while_hung_keeps_serving_until_released(own_mnt):
    """fusermount3 -uz while an operation hangs: the daemon stays (the
    connection lives while the caller does), its control channel still
    answers at the same path, and releasing the hang ends it."""
    mnt = own_mnt
    (mnt.src / "f").write_bytes(b"l" * 10)
    pid = mnt.status()["pid"]
    mnt.set("hang")
    p = subprocess.Popen([sys.executable, "-c",
                          f"print(open({str(mnt.mp / 'f')!r}).read())"],
                         stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: mnt.blocked() >= 1, what="a blocked caller")
        subprocess.run(["fusermount3", "-uz", str(mnt.mp)], check=True)
        assert not os.path.ismount(mnt.mp)
        time.sleep(0.3)
        assert not process_gone(pid)
        mnt.set("ok")
        assert p.communicate(timeout=5)[0].strip() == "l" * 10
        wait_for(lambda: process_gone(pid), timeout=3, what="daemon exit")
    finally:
        if p.poll() is None:
            ff("set", mnt.mp, "ok", check=False)
            p.wait(5)
