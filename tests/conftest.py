"""Shared fixtures: real raid1fs volumes on real image files, real mounts.

Everything a test mounts, attaches or starts is torn down here, in reverse
order, even when the test fails: loop devices detached, file systems
unmounted, raid1fs and faultfs mounts ended (lazily as a last resort), also
when the mount process was killed and left a dead FUSE mount behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAULTFS = ROOT / "tools" / "faultfs"
MiB = 1 << 20
# The unprivileged user, as a uid: run(user=NOBODY) drops to it, and the
# mount's log names refused requests by this number.
NOBODY = "65534"


def run(*args: str | os.PathLike, check: bool = True, timeout: float = 120,
        user: str | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = [str(a) for a in args]
    if user:
        import pwd

        pw = pwd.getpwnam(user) if not str(user).isdigit() else pwd.getpwuid(int(user))
        cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
               "--"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def raid1fs(*args: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "raid1fs", *args, check=check, **kw)


def faultfs(*args: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run(sys.executable, FAULTFS, *args, check=check, **kw)


def status_json(target: str | os.PathLike, *more: str | os.PathLike) -> dict:
    r = raid1fs("status", "--json", target, *more, check=False)
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


def member_entry(st: dict, path: str | os.PathLike) -> dict:
    for m in st["members"]:
        if m["path"] == str(path):
            return m
    raise KeyError(path)


def member_state(st: dict, path: str | os.PathLike) -> str:
    return member_entry(st, path)["state"]


def sha256(path: str | os.PathLike, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = f.read(4 * MiB if left is None else min(4 * MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def data_region_hash(member: str | os.PathLike, st: dict | None = None) -> str:
    """Hash of a member's data region, read directly (not through raid1fs)."""
    st = st or status_json(member)
    offset = st["members"][0]["data_offset"]
    return sha256(member, offset, st["volume"]["size"])


def one_line(stderr: str) -> str:
    """The single `raid1fs: ...` line of a refusal (no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"not one line: {stderr!r}"
    assert lines[0].startswith("raid1fs: "), lines[0]
    return lines[0]


def drop_cache(path: str | os.PathLike) -> None:
    """Drop the page cache of the file at `path`, so the next read reaches
    the file system underneath."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def process_gone(pid: int) -> bool:
    """Has process `pid` exited (gone, or a zombie nobody reaped yet)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:  # ENOENT, or ESRCH while it goes
        return True


def mounts_at(path: str | os.PathLike) -> list[str]:
    """The fs types of every mount stacked exactly at `path`, bottom first,
    from /proc/self/mountinfo (which, unlike os.path.ismount, also lists a
    dead FUSE mount)."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == real:
                out.append(fields[fields.index("-") + 1])
    return out


def is_dead_fuse(path: str | os.PathLike) -> bool:
    """Does the FUSE mount at `path` answer that its process is gone?"""
    try:
        os.statvfs(path)  # always reaches the mount process (stat may be cached)
        return False
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def loop_backing(dev: str) -> str | None:
    """The file loop device `dev` serves, or None once it is detached."""
    try:
        return Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def wait_for(pred, timeout: float = 30, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Cleanup:
    """Teardown steps, run last-in first-out."""

    steps: list = field(default_factory=list)

    def push(self, fn, *args) -> None:
        self.steps.append((fn, args))

    def run(self) -> list[str]:
        errors = []
        while self.steps:
            fn, args = self.steps.pop()
            try:
                fn(*args)
            except Exception as e:  # keep tearing down
                errors.append(f"{getattr(fn, '__name__', fn)}{args}: {e}")
        return errors


def _detach_dead_fuse(mp: str, fstype: str) -> None:
    """Detach what a killed mount process left at `mp`: os.path.ismount is
    False there (ENOTCONN), so the unmounts below would pass it by."""
    for _ in range(5):
        if fstype not in mounts_at(mp) or not is_dead_fuse(mp):
            return
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    raise AssertionError(f"a dead {fstype} mount is still attached at {mp}")


def _unmount_raid1fs(mp: str) -> None:
    if os.path.ismount(mp):
        r = raid1fs("umount", mp, check=False)
        if r.returncode and os.path.ismount(mp):
            subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    _detach_dead_fuse(mp, "fuse.raid1fs")


def _unmount_faultfs(mp: str) -> None:
    if os.path.ismount(mp):
        r = faultfs("umount", mp, check=False, timeout=60)
        if r.returncode and os.path.ismount(mp):
            subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    _detach_dead_fuse(mp, "fuse.faultfs")


def _umount(mp: str) -> None:
    if os.path.ismount(mp):
        r = subprocess.run(["umount", mp], capture_output=True)
        if r.returncode:
            subprocess.run(["umount", "-l", mp], capture_output=True)


def _losetup_detach(dev: str, tmp: str) -> None:
    """Detach `dev` only while it still serves a file under this test's `tmp`:
    if the test detached it already, the name may by now be another test's."""
    backing = loop_backing(dev)
    if backing is not None and backing.startswith(tmp + os.sep):
        subprocess.run(["losetup", "-d", dev], capture_output=True)


class Env:
    """One test's sandbox: a directory, and helpers that clean up after it."""

    def __init__(self, tmp: Path, cleanup: Cleanup) -> None:
        self.tmp = tmp
        self.cleanup = cleanup

    def path(self, name: str) -> Path:
        return self.tmp / name

    def mkdir(self, name: str) -> Path:
        p = self.tmp / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def create(self, *members: str | os.PathLike, size: str = "64M", extra=()) -> list[Path]:
        paths = [Path(m) if os.path.isabs(m) else self.tmp / m for m in members]
        raid1fs("create", "--kind", "disk", "--size", size, *extra, *paths)
        return paths

    def mount(self, *members: str | os.PathLike, mp: str = "mnt", opts=()) -> Path:
        mpath = self.mkdir(mp)
        raid1fs("mount", *opts, *members, mpath)
        self.cleanup.push(_unmount_raid1fs, str(mpath))
        assert os.path.ismount(mpath)
        return mpath

    def volume(self, n: int = 2, size: str = "64M", opts=(),
               prefix: str = "m") -> tuple[list[Path], Path]:
        members = self.create(*[f"{prefix}{i}.img" for i in range(n)], size=size)
        return members, self.mount(*members, opts=opts)

    def faultfs(self, name: str = "ffs") -> tuple[Path, Path]:
        """A faultfs mount over a fresh source directory: (source, mountpoint)."""
        src = self.mkdir(name + "-src")
        mp = self.mkdir(name)
        faultfs("mount", src, mp)
        self.cleanup.push(_unmount_faultfs, str(mp))
        return src, mp

    def losetup(self, target: str | os.PathLike, offset: int = 0, readonly: bool = False,
                direct_io: bool = False) -> str:
        """A loop device over `target`, a file under this test's directory;
        the test may detach it itself."""
        args = ["losetup", "--find", "--show"]
        if offset:
            args += ["-o", str(offset)]
        if readonly:
            args.append("-r")
        if direct_io:
            args.append("--direct-io=on")
        dev = run(*args, target).stdout.strip()
        self.cleanup.push(_losetup_detach, dev, os.path.realpath(self.tmp))
        return dev

    def mount_fs(self, dev: str, name: str = "data", opts: str | None = None) -> Path:
        mp = self.mkdir(name)
        run("mount", *(["-o", opts] if opts else []), dev, mp)
        self.cleanup.push(_umount, str(mp))
        return mp


def pytest_sessionstart(session: pytest.Session) -> None:
    """The mounts' control sockets and logs go to a directory of this run
    (one log per mount point: a run leaves hundreds), removed after a run
    that passed and kept, with its path printed, after one that failed."""
    if "RAID1FS_RUN_DIR" in os.environ:
        return
    try:
        d = tempfile.mkdtemp(prefix="raid1fs-tests-", dir="/run")
    except OSError:
        d = tempfile.mkdtemp(prefix="raid1fs-tests-")
    os.chmod(d, 0o755)  # the unprivileged client of the control tests looks in
    os.environ["RAID1FS_RUN_DIR"] = d
    session.config.stash[_RUN_DIR] = d


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    d = session.config.stash.get(_RUN_DIR, None)
    if d is None:
        return
    if exitstatus == 0 or not os.listdir(d):
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"\nthe mounts' logs are kept in {d}", file=sys.stderr)


_RUN_DIR = pytest.StashKey[str]()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    cleanup = Cleanup()
    e = Env(tmp_path, cleanup)
    try:
        yield e
    finally:
        errors = cleanup.run()
        assert not errors, f"teardown failed: {errors}"
