"""`raid1fs create` for disk volumes: check every member, then initialise.

Every check (guarantee 9) runs before the first byte is written: a member of
another volume, a member named twice, a missing parent directory, a directory
given as a disk member, a member that holds data, one that is too small. Only
then are image files created (sparse), existing members zeroed (cheaply:
punched holes, BLKZEROOUT) so every member starts with identical data, and
both superblock copies written on every member.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from raid1fs import member as m
from raid1fs.assemble import check_distinct, fd_identities
from raid1fs.errors import BadMemberError, MetadataError, UsageError
from raid1fs.sizes import format_size
from raid1fs.superblock import (
    ACTIVE,
    BLOCK_SIZE,
    DATA_ALIGN,
    SB_COPIES,
    SB_SIZE,
    Layout,
    Slot,
    Superblock,
    has_signature,
    read_superblock,
    write_superblock,
)

BLKZEROOUT = 0x127F
DATA_SCAN_LIMIT = 64 << 20  # how much of each end of a block device is read for data
MIN_SIZE = 1 << 20
NEW_LOCK_WAIT = 2.0  # seconds a just-created member waits for a racing opener to let go


@dataclass
class Target:
    path: str
    exists: bool
    is_block: bool = False
    size: int = 0


def holds_data(fd: int, is_block: bool, path: str = "",
               alive: Callable[[], None] = lambda: None) -> bool:
    """Does the member hold anything but zeros (create and add would
    overwrite it)?

    An image file is read wherever it has data (SEEK_DATA: holes and
    preallocated space cost nothing), to its end; a loop device, in the
    file it serves. Any other block device cannot be read whole in
    reasonable time: its first and last DATA_SCAN_LIMIT bytes are read, and
    `blkid` looks for the signature of a file system, partition table or
    volume manager anywhere on it. `alive` is called after every read and
    seek (a caller that times the scan times each of them).
    """
    end = m.device_size(fd)
    if not is_block:
        return _extents_hold_data(fd, 0, end, alive)
    loop = m.loop_backing(fd)
    if loop is not None:
        backing, start = loop
        # What was written through the device may still be in its page
        # cache, not yet in the file: written back first, it is seen there.
        os.fsync(fd)
        try:
            bfd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass
        else:
            try:
                return _extents_hold_data(bfd, start, start + end, alive)
            finally:
                os.close(bfd)
    head = min(end, DATA_SCAN_LIMIT)
    return (_range_holds_data(fd, 0, head, alive)
            or _range_holds_data(fd, max(head, end - DATA_SCAN_LIMIT), end, alive)
            or bool(path and _signature(path)))


def _extents_hold_data(fd: int, lo: int, hi: int, alive: Callable[[], None]) -> bool:
    """A non-zero byte in [lo, hi) of a regular file, read only where it has data."""
    pos = lo
    while pos < hi:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return False  # no data after pos
        alive()
        if pos >= hi:
            return False
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), hi)
        alive()
        if _range_holds_data(fd, pos, hole, alive):
            return True
        pos = hole
    return False


def _range_holds_data(fd: int, lo: int, hi: int, alive: Callable[[], None]) -> bool:
    pos = lo
    while pos < hi:
        chunk = os.pread(fd, min(8 << 20, hi - pos), pos)
        alive()
        if not chunk:
            return False
        if chunk.count(0) != len(chunk):
            return True
        pos += len(chunk)
    return False


def _signature(path: str) -> str:
    """What `blkid -p` finds on a device (a file system, partition table,
    RAID or volume manager signature), or ""."""
    try:
        r = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if r.returncode != 0:
        return ""
    found = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return found.get("TYPE") or found.get("PTTYPE") or "a signature"

def _inspect(path: str, force: bool, alive: Callable[[], None] = lambda: None) -> Target:
    """What path is, with create's checks (`alive` as for open_new_member;
    called only on the new-path branch, which add uses)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        alive()
        if os.path.islink(path):
            raise BadMemberError(f"{path}: dangling symbolic link") from None
        alive()
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise BadMemberError(f"{path}: parent directory does not exist") from None
        alive()
        if not os.access(parent, os.W_OK):
            raise BadMemberError(f"{path}: cannot create: directory not writable") from None
        alive()
        return Target(path, exists=False)
    except OSError as e:
        raise BadMemberError(f"{path}: cannot access: {e.strerror}") from None
    fd = m.open_member(path, writable=True)  # refuses directories and busy devices
    try:
        t = Target(path, True, stat.S_ISBLK(st.st_mode), m.device_size(fd))
        if has_signature(fd):
            try:
                sb, _ = read_superblock(fd, path)
                what = f"belongs to raid1fs volume {sb.name or sb.volume_uuid}"
            except MetadataError:
                what = "carries raid1fs metadata (damaged)"
            if not force:
                raise BadMemberError(f"{path}: {what} (use --force to overwrite)")
        elif holds_data(fd, t.is_block, path) and not force:
            raise BadMemberError(f"{path}: holds data (use --force to overwrite)")
        return t
    except OSError as e:
        raise BadMemberError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        m.close_member(fd)


def _volume_size(targets: list[Target], size: int | None) -> int:
    if size is not None:
        if size % BLOCK_SIZE:
            raise UsageError(f"--size {size}: must be a multiple of {BLOCK_SIZE} bytes")
        if size < MIN_SIZE:
            raise UsageError("--size: a disk volume must be at least 1M")
        return size
    if not all(t.exists for t in targets):
        new = next(t for t in targets if not t.exists)
        raise UsageError(f"{new.path}: does not exist; give --size to create image files")
    avail = min(t.size for t in targets)
    guess = avail - Layout.for_size(avail).data_offset
    guess = guess // DATA_ALIGN * DATA_ALIGN
    if guess < MIN_SIZE:
        small = min(targets, key=lambda t: t.size)
        raise BadMemberError(f"{small.path}: too small for a raid1fs disk member "
                             f"({format_size(small.size)})")
    return guess


def create_disk(paths: list[str], name: str, size: int | None, checksums: bool,
                force: bool) -> Superblock:
    """Create a disk volume on `paths`; returns the first member's superblock."""
    paths = [os.path.abspath(p) for p in paths]
    check_distinct(paths)
    targets = [_inspect(p, force) for p in paths]
    vsize = _volume_size(targets, size)
    layout = Layout.for_size(vsize)
    for t in targets:
        if t.exists and t.size < layout.member_bytes:
            raise BadMemberError(
                f"{t.path}: too small: {format_size(t.size)}, a {format_size(vsize)} volume "
                f"needs {format_size(layout.member_bytes)} ({layout.member_bytes} bytes)"
            )

    # Everything checked: from here on members are written.
    volume_uuid = Superblock.new_uuid()
    uuids = [Superblock.new_uuid() for _ in targets]
    roster = [Slot(u, ACTIVE, t.path) for u, t in zip(uuids, targets, strict=True)]
    now = time.time()
    fds = _open_all(targets, layout.member_bytes)
    sbs = [Superblock(
        volume_uuid=volume_uuid, name=name, kind="disk", member_uuid=uuids[slot],
        slot=slot, members_expected=len(targets), events=1, clean=True, size=vsize,
        data_offset=layout.data_offset, region_size=layout.region_size,
        bitmap_offset=layout.bitmap_offset, bitmap_bytes=layout.bitmap_bytes,
        csum_offset=layout.csum_offset, csum_bytes=layout.csum_bytes,
        checksums=checksums, created=now, roster=list(roster),
    ) for slot in range(len(targets))]
    doing = targets[0].path
    written: list[int] = []
    try:
        # Every member zeroed before any is given metadata: a member that
        # fails here leaves no volume behind on the others.
        for t, fd in zip(targets, fds, strict=True):
            doing = t.path
            if t.exists:
                # Metadata area and data region both: every member must
                # start with identical data whatever it held before (zeros,
                # or what --force overrode).
                _zero(fd, t.is_block, 0, layout.data_offset + vsize)
            os.fsync(fd)  # the zeroing, durable before the metadata names it
        for t, fd, sb in zip(targets, fds, sbs, strict=True):
            doing = t.path
            written.append(fd)
            # Both copies, so no older superblock can outrank the new one.
            write_superblock(fd, sb)
            write_superblock(fd, sb)
    except OSError as e:
        for fd in written:  # the volume is not made: its metadata goes again
            try:
                os.pwrite(fd, bytes(SB_COPIES * SB_SIZE), 0)
                os.fsync(fd)
            except OSError:
                pass
        left = []
        for t in targets:
            if not t.exists:
                try:
                    os.unlink(t.path)
                except OSError:
                    left.append(t.path)
        raise BadMemberError(f"{doing}: write failed: {e.strerror} (no volume created"
                             + (f"; {', '.join(left)} could not be removed" if left else "")
                             + ")") from None
    finally:
        for fd in fds:
            m.close_member(fd)
    return sbs[0]


def _open_all(targets: list[Target], member_bytes: int,
              alive: Callable[[], None] = lambda: None) -> list[int]:
    """Open (or create, sparse) every member before writing any: if one
    cannot be had, the files made so far are removed and nothing was written.
    `alive` is called after each step."""
    fds: list[int] = []
    made: list[str] = []
    try:
        for t in targets:
            if t.exists:
                fds.append(m.open_member(t.path, writable=True))
                continue
            try:
                fd = os.open(t.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise BadMemberError(f"{t.path}: cannot create: {e.strerror}") from None
            made.append(t.path)
            fds.append(fd)
            alive()
            _lock_new(fd, t.path)
            try:
                os.ftruncate(fd, member_bytes)
            except OSError as e:
                raise BadMemberError(f"{t.path}: cannot size to {member_bytes} bytes: "
                                     f"{e.strerror}") from None
            alive()
    except BaseException:
        for fd in fds:
            m.close_member(fd)
        for p in made:
            os.unlink(p)
        raise
    return fds


def _lock_new(fd: int, path: str) -> None:
    """flock a file this process just created. Another raid1fs process
    (a second `add` of the same path) may have opened and locked it in the
    instant between; it finds it empty (too small) and lets go at once, so
    wait a moment for that rather than fail both."""
    deadline = time.monotonic() + NEW_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise BadMemberError(f"{path}: in use by another process since it was "
                                     "created") from None
            time.sleep(0.01)


def _zero(fd: int, is_block: bool, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros, cheaply where possible."""
    if length <= 0:
        return
    if is_block:
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass
    else:
        try:
            _punch(fd, offset, length)
            return
        except OSError:
            pass
    zeros = bytes(1 << 20)
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        os.pwrite(fd, zeros[:n], offset)
        offset += n
    os.fsync(fd)


def _punch(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
    r = libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                       ctypes.c_long(offset), ctypes.c_long(length))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))



@dataclass
class NewMember:
    """A path opened to join a running volume (`add`, `replace`)."""

    path: str
    fd: int
    created: bool  # a new sparse image: reads as zeros
    old_sb: Superblock | None  # it carries metadata of this volume already
    idents: frozenset[tuple[object, ...]] = frozenset()  # raid1fs.assemble.fd_identities
    parked: bool = False  # a call through fd was given up on: fd points at /dev/null


def open_new_member(path: str, member_bytes: int, volume_uuid: str,
                    alive: Callable[[], None] = lambda: None) -> NewMember:
    """Check and open a member to add; every check before anything is written.

    A new path becomes a sparse image file. An existing file or device must
    be large enough and hold nothing: no data, no metadata of another volume
    (there is no --force here: wipe it first). One that carries this
    volume's metadata is accepted; the caller decides what it is.

    `alive` is called after each step (each system call, or few): a caller
    that times this call times each step, so a slow path that answers is
    not taken for a hung one.
    """
    path = os.path.abspath(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        t = _inspect(path, False, alive)  # parent checks
        fd = _open_all([t], member_bytes, alive)[0]
        try:
            return NewMember(path, fd, True, None, fd_identities(fd))
        except OSError as e:
            m.close_member(fd)
            os.unlink(path)
            raise BadMemberError(f"{path}: cannot stat: {e.strerror}") from None
    except OSError as e:
        raise BadMemberError(f"{path}: cannot access: {e.strerror}") from None
    alive()
    fd = m.open_member(path, writable=True)
    try:
        alive()
        size = m.device_size(fd)
        alive()
        if size < member_bytes:
            raise BadMemberError(f"{path}: too small: {format_size(size)}, this volume needs "
                                 f"{format_size(member_bytes)} ({member_bytes} bytes)")
        old = None
        signed = has_signature(fd)
        alive()
        if signed:
            try:
                old, _ = read_superblock(fd, path)
            except MetadataError:
                raise BadMemberError(f"{path}: carries damaged raid1fs metadata "
                                     "(wipe it first)") from None
            if old.volume_uuid != volume_uuid:
                raise BadMemberError(f"{path}: belongs to raid1fs volume "
                                     f"{old.name or old.volume_uuid} (wipe it first)")
        elif holds_data(fd, stat.S_ISBLK(os.fstat(fd).st_mode), path, alive):
            raise BadMemberError(f"{path}: holds data (wipe it first; add never overwrites data)")
        return NewMember(path, fd, False, old, fd_identities(fd))
    except OSError as e:
        m.close_member(fd)
        raise BadMemberError(f"{path}: cannot read: {e.strerror}") from None
    except BaseException:
        m.close_member(fd)
        raise


def init_member(fd: int, sb: Superblock, alive: Callable[[], None] = lambda: None) -> None:
    """Give a joining member its superblock: both copies, after wiping any
    older ones (whose sequence numbers could outrank the new). `alive` is
    called after each write."""
    os.pwrite(fd, bytes(SB_COPIES * SB_SIZE), 0)
    alive()
    sb.seq = 0
    write_superblock(fd, sb)
    alive()
    write_superblock(fd, sb)
