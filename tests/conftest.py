"""Shared fixtures: real raid1fs volumes on real image files, real mounts.

Everything a test mounts, attaches or starts is torn down here, in reverse
order, even when the test fails: loop devices detached, file systems
unmounted, raid1fs and faultfs mounts ended (lazily as a last resort).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAULTFS = ROOT / "tools" / "faultfs"
MiB = 1 << 20


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


def _unmount_raid1fs(mp: str) -> None:
    if not os.path.ismount(mp):
        return
    r = raid1fs("umount", mp, check=False)
    if r.returncode and os.path.ismount(mp):
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)


def _unmount_faultfs(mp: str) -> None:
    if not os.path.ismount(mp):
        return
    r = faultfs("umount", mp, check=False, timeout=60)
    if r.returncode and os.path.ismount(mp):
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)


def _umount(mp: str) -> None:
    if os.path.ismount(mp):
        r = subprocess.run(["umount", mp], capture_output=True)
        if r.returncode:
            subprocess.run(["umount", "-l", mp], capture_output=True)


def _losetup_detach(dev: str) -> None:
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

    def losetup(self, target: str | os.PathLike, offset: int = 0, readonly: bool = False) -> str:
        args = ["losetup", "--find", "--show"]
        if offset:
            args += ["-o", str(offset)]
        if readonly:
            args.append("-r")
        dev = run(*args, target).stdout.strip()
        self.cleanup.push(_losetup_detach, dev)
        return dev

    def mount_fs(self, dev: str, name: str = "data", opts: str | None = None) -> Path:
        mp = self.mkdir(name)
        run("mount", *(["-o", opts] if opts else []), dev, mp)
        self.cleanup.push(_umount, str(mp))
        return mp


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    cleanup = Cleanup()
    e = Env(tmp_path, cleanup)
    os.environ.setdefault("RAID1FS_RUN_DIR", "/run/raid1fs")
    try:
        yield e
    finally:
        errors = cleanup.run()
        assert not errors, f"teardown failed: {errors}"
