"""Asking member paths whether they answer, without getting stuck with them.

A path on a hung file system or device (an NFS server gone, a FUSE file
system that stopped answering, a dying disk) can block any process that
touches it, often in a wait no signal ends. A command that must read its
members' metadata (mount, status, offline rebuild, create) first lets a
throw-away child process stat, open and read each path; if the child has not
answered within the I/O timeout, the command fails naming the path, instead
of hanging with it. The child is killed and left to the kernel (it ends when
its I/O returns, or stays stuck); a thread of the command waits for it, so a
long-running command (`mount -f`) keeps no dead child behind. The command
has changed nothing.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import threading
import time

from raid1fs.errors import BadMemberError

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 86400.0  # a day: longer is no timeout at all, and overflows timers
ENV_TIMEOUT = "RAID1FS_IO_TIMEOUT"


def default_timeout() -> float:
    """--io-timeout's default: RAID1FS_IO_TIMEOUT (seconds, at most
    MAX_TIMEOUT) or 30."""
    try:
        t = float(os.environ.get(ENV_TIMEOUT, ""))
    except ValueError:
        return DEFAULT_TIMEOUT
    return min(t, MAX_TIMEOUT) if t > 0 else DEFAULT_TIMEOUT  # NaN > 0 is False


def _touch(path: str) -> None:
    """What reading a member's metadata does first: stat, open, read. Only
    what a member can be is opened: opening a FIFO waits for a writer, and
    the command refuses anything else at once anyway."""
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # the command itself reports what is wrong with it
    try:
        os.pread(fd, 4096, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def answer(paths: list[str], timeout: float | None = None) -> None:
    """Raise BadMemberError naming the first of `paths` that does not
    answer within `timeout` seconds (default: default_timeout())."""
    timeout = default_timeout() if timeout is None else timeout
    stuck = hung(paths, timeout)
    if stuck:
        raise no_answer(stuck[0], timeout)


def no_answer(path: str, timeout: float) -> BadMemberError:
    return BadMemberError(f"{path}: no answer within {timeout:g} s (a hung file system or "
                          "device?); nothing was changed")


def _reap(pid: int) -> None:
    """Wait for a killed child in the background (it may never end)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def hung(paths: list[str], timeout: float | None = None) -> list[str]:
    """Those of `paths` (made absolute) that do not answer within `timeout`
    seconds, each asked by a child of its own, all at once."""
    timeout = default_timeout() if timeout is None else timeout
    asking: dict[int, tuple[str, int]] = {}  # read end -> (path, child pid)
    for p in (os.path.abspath(p) for p in paths):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no Python clean-up, no flushing of shared buffers
            status = 0
            try:
                os.close(r)
                # It may outlive the command (stuck): it must not hold the
                # command's output open, or whoever reads it waits for it too.
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                _touch(p)
            except BaseException:
                status = 1
            os._exit(status)  # closing w: the answer
        os.close(w)
        asking[r] = (p, pid)
    deadline = time.monotonic() + timeout
    try:
        while asking:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(asking), [], [], left)
            for r in ready:
                os.read(r, 1)  # end of file: the child is done (or died: the command finds out)
                os.close(r)
                os.waitpid(asking.pop(r)[1], 0)
    finally:
        for r, (_, pid) in asking.items():
            os.close(r)
            try:
                os.kill(pid, signal.SIGKILL)  # ends it once its I/O returns, if ever
            except OSError:
                pass
            threading.Thread(target=_reap, args=(pid,), name=f"reap-{pid}", daemon=True).start()
    stuck = {p for p, _ in asking.values()}
    return [p for p in (os.path.abspath(p) for p in paths) if p in stuck]
