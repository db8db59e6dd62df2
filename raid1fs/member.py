"""Member I/O: opening members, and every read, write and sync on them.

Member I/O never runs on the trio event loop. Each operation runs in one of
the member's own worker threads (raid1fs.iobatch) under the volume's I/O
timeout; a call that does not come back in time is abandoned (a hung member
ties up only its own threads) and raises MemberTimeoutError. `fanout` issues
one call on many members at once. The engine decides what a failure means.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import math
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from raid1fs.errors import BadMemberError, MemberIOError, MemberTimeoutError
from raid1fs.iobatch import Workers, run_batch
from raid1fs.superblock import Superblock

T = TypeVar("T")

# Member states, as `status` shows them.
ONLINE = "online"
REBUILDING = "rebuilding"
STALE = "stale"
FAILED = "failed"
MISSING = "missing"
SPARE = "spare"

ERROR_HALF_LIFE = 60.0  # seconds: how fast "recent errors" are forgotten
LATENCY_ALPHA = 0.2  # weight of the newest sample in the latency average
LATENCY_HALF_LIFE = 10.0  # seconds: how fast an unused member's latency is forgotten


LOOP_MAJOR = 7
BLKROGET = 0x125E
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = 232  # sizeof(struct loop_info64)

# A member that is a loop device also holds a lock on the file behind it
# (member fd -> that file's fd): close member fds with close_member.
_backing_locks: dict[int, int] = {}


def loop_backing_file(fd: int) -> str | None:
    """The file a loop device serves, when fd is one and the file still has
    that name; else None."""
    found = loop_backing(fd)
    return found[0] if found is not None else None


def backing_file_of(path: str) -> str | None:
    """The file the loop device at `path` serves; None for anything else
    (or a loop device that cannot be opened)."""
    try:
        st = os.stat(path)
        if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return loop_backing_file(fd)
    finally:
        os.close(fd)


def loop_backing(fd: int) -> tuple[str, int] | None:
    """(the file a loop device serves, where in it the device starts), when
    fd is a loop device and the file still has that name; else None."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
        return None
    sysfs = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/loop/backing_file"
    try:
        with open(sysfs) as f:
            path = f.read().rstrip("\n")
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64))
        bst = os.stat(path)
    except OSError:
        return None  # not attached, or the file was deleted or renamed
    # struct loop_info64: lo_device (the kernel's encoding of st_dev),
    # lo_inode, lo_rdevice, lo_offset, ...
    dev, ino, _, offset = struct.unpack_from("=QQQQ", info)
    major, minor = (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    if (bst.st_ino, os.major(bst.st_dev), os.minor(bst.st_dev)) != (ino, major, minor):
        return None
    return path, offset


def _lock_backing_file(path: str, fd: int) -> None:
    """A loop device over a file is that file under another name: lock the
    file too, so a mount of the file itself (or of another loop device
    over it) is refused while this one uses it, and the other way round."""
    backing = loop_backing_file(fd)
    if backing is None:
        return
    try:
        bfd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(bfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(bfd)
        raise BadMemberError(f"{path}: in use by another raid1fs process (as {backing}, the "
                             "file this loop device serves)") from None
    _backing_locks[fd] = bfd


def backing_file_locked(fd: int) -> bool:
    """For `status`: is the file behind this loop device in use by a mount?"""
    backing = loop_backing_file(fd)
    if backing is None:
        return False
    try:
        bfd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(bfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(bfd)


def let_go_of_backing_file(fd: int) -> None:
    """Drop the lock on the file behind a loop device member (its fd is
    being closed or parked)."""
    bfd = _backing_locks.pop(fd, None)
    if bfd is not None:
        os.close(bfd)


def close_member(fd: int) -> None:
    """Close a member fd from open_member, and what it holds besides."""
    let_go_of_backing_file(fd)
    os.close(fd)


def open_member(path: str, writable: bool = True, lock: bool = True) -> int:
    """Open an existing image file or block device as a member.

    Block devices are opened O_EXCL so one that is mounted or in use elsewhere
    is refused; every member is flock()ed so two mounts cannot share it, and
    a loop device also locks the file it serves. With lock=False (to read
    metadata for `status`) none of this is done. Close it with close_member.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadMemberError(f"{path}: no such file or device") from None
    except OSError as e:
        raise BadMemberError(f"{path}: cannot access: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadMemberError(f"{path}: is a directory "
                             "(disk members are image files or block devices)")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BadMemberError(f"{path}: not a regular file or block device")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    if stat.S_ISBLK(st.st_mode) and lock:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise BadMemberError(f"{path}: device is busy (mounted or in use)") from None
        raise BadMemberError(f"{path}: cannot open: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode) and device_size(fd) == 0:
        os.close(fd)
        raise BadMemberError(f"{path}: empty device (size 0: a loop device with no file "
                             "attached?)")
    if writable and stat.S_ISBLK(st.st_mode) and _read_only_device(fd):
        # Opening it for writing works; every write fails (EPERM).
        os.close(fd)
        raise BadMemberError(f"{path}: read-only device (`blockdev --setrw` makes it "
                             "writable; a mount with -o ro can use it as it is)")
    try:
        if lock:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BadMemberError(f"{path}: in use by another raid1fs process") from None
    if lock:
        try:
            _lock_backing_file(path, fd)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _read_only_device(fd: int) -> bool:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, BLKROGET, bytes(4)))[0] != 0
    except OSError:
        return False


def device_size(fd: int) -> int:
    """Size in bytes of an open image file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


@dataclass
class MemberStats:
    """Counters `status` reports for one member."""

    reads: int = 0
    writes: int = 0
    read_errors: int = 0
    write_errors: int = 0
    checksum_errors: int = 0
    # Decaying error score and its timestamp, for the read policy.
    recent_errors: float = 0.0
    recent_errors_at: float = field(default_factory=time.monotonic)
    latency: float = 0.0  # moving average of read latency, seconds
    last_read_at: float = 0.0
    inflight: int = 0
    next_offset: int = -(1 << 62)  # where the last read ended: keeps streams on one member

    def error_score(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        age = now - self.recent_errors_at
        return self.recent_errors * math.pow(0.5, age / ERROR_HALF_LIFE)

    def recent_latency(self, now: float) -> float:
        """The latency average, halved for every LATENCY_HALF_LIFE without a
        read: a member once slow is tried again later and can prove it is not."""
        return self.latency * math.pow(0.5, (now - self.last_read_at) / LATENCY_HALF_LIFE)

    def note_error(self) -> None:
        now = time.monotonic()
        self.recent_errors = self.error_score(now) + 1.0
        self.recent_errors_at = now


class Member:
    """One open member of a running volume."""

    def __init__(self, path: str, fd: int, sb: Superblock, timeout: float, state: str,
                 idents: frozenset[tuple[object, ...]] = frozenset()) -> None:
        self.path = path
        self.fd = fd
        # What makes another path name this member (raid1fs.assemble.identity),
        # taken when it was opened: asking its fd later could hang with it.
        self.idents = idents
        self.sb = sb
        self.timeout = timeout
        self.state = state
        self.stats = MemberStats()
        self.workers = Workers(os.path.basename(path))
        self.fail_reason = ""
        self.rebuild: Any = None  # raid1fs.rebuild.Progress while rebuilding
        self.last_rebuild: dict[str, Any] | None = None  # the outcome of the last one

    def __repr__(self) -> str:
        return f"<Member slot={self.sb.slot} {self.path} {self.state}>"

    @property
    def uuid(self) -> str:
        return self.sb.member_uuid

    @property
    def slot(self) -> int:
        return self.sb.slot

    @property
    def data_offset(self) -> int:
        return self.sb.data_offset

    async def _run(self, op: str, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) in one of this member's threads under the I/O timeout."""
        results, errors, finished = await run_batch([(self.workers, fn, args)], self.timeout)
        return self._outcome(op, results[0], errors[0], finished[0])

    def _outcome(self, op: str, result: T, error: BaseException | None, finished: bool) -> T:
        if not finished:
            raise MemberTimeoutError(
                self.path, op, f"no answer within the {self.timeout:g} s I/O timeout")
        if error is not None:
            if isinstance(error, OSError):
                raise MemberIOError(self.path, op, error)
            raise error
        return result

    async def pread(self, offset: int, length: int) -> bytes:
        """Read `length` bytes of volume data at volume offset `offset`."""
        t0 = time.monotonic()
        self.stats.inflight += 1
        try:
            data = await self._run("read", pread_full, self.fd, length, self.data_offset + offset)
        finally:
            self.stats.inflight -= 1
        now = time.monotonic()
        dt = now - t0
        s = self.stats
        s.last_read_at = now
        s.latency = dt if s.reads == 0 else (1 - LATENCY_ALPHA) * s.latency + LATENCY_ALPHA * dt
        s.reads += 1
        s.next_offset = offset + length
        return data


async def fanout(members: list[Member], op: str,
                 call: Callable[[Member], tuple[Callable[..., Any], tuple]],
                 quick: float = 0) -> tuple[list[Any], dict[Member, MemberIOError]]:
    """Run call(member) on every member at once (one batch, one wake-up).

    Returns the results in member order (None where it failed) and the
    members that failed, each with its MemberIOError. Every fan-out writes
    (data, metadata, bitmaps, flushes): a failure counts as a write error
    of its member (status's WRITE column).
    """
    if not members:
        return [], {}
    calls = []
    for x in members:
        fn, args = call(x)
        calls.append((x.workers, fn, args))
    timeout = max(x.timeout for x in members)
    results, errs, finished = await run_batch(calls, timeout, quick)
    out: list[Any] = []
    failed: dict[Member, MemberIOError] = {}
    for x, r, e, f in zip(members, results, errs, finished, strict=True):
        try:
            out.append(x._outcome(op, r, e, f))
        except MemberIOError as err:
            failed[x] = err
            x.stats.write_errors += 1
            out.append(None)
    return out, failed


def pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"short read at offset {offset + got} (member truncated?)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2
WRITEOUT_MIN = 256 << 10  # large writes start their write-out at once
# pwritev2 flag (Linux 6.14): a buffered write whose write-out starts at
# once and whose pages leave the cache once written. A mirror dirties two
# copies of everything; on this project's VM, copying into the page cache
# got several times slower (in CPU) while write-out of the same files ran,
# and two 1 GiB streams wrote at 1,125-1,200 MiB/s this way against 500-860
# with sync_file_range and 700-890 plain (then fsync). Older kernels and
# file systems without it (FUSE, tmpfs) say EOPNOTSUPP: then the write is
# buffered and its write-out started by sync_file_range.
RWF_DONTCACHE = getattr(os, "RWF_DONTCACHE", 0x80)
_no_dontcache: set[int] = set()  # fds whose file refused RWF_DONTCACHE


def start_writeout(fd: int, offset: int, length: int) -> None:
    """Start (not wait for) write-out of a range: a member gets two copies'
    worth of dirty data, and an fsync at the end would otherwise find all of
    it still in memory. Best effort: errors show up at fsync."""
    _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def pwrite_full(fd: int, data: bytes, offset: int, sync: bool) -> None:
    view = memoryview(data)
    if len(view) >= WRITEOUT_MIN and not sync and fd not in _no_dontcache:
        try:
            n = os.pwritev(fd, [view], offset, RWF_DONTCACHE)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _no_dontcache.add(fd)
        else:
            if n < len(view):
                _pwrite_all(fd, view[n:], offset + n)
            return
    _pwrite_all(fd, view, offset)
    if sync:
        os.fdatasync(fd)
    elif len(view) >= WRITEOUT_MIN:
        start_writeout(fd, offset, len(view))
