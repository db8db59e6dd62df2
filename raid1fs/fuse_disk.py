"""The FUSE face of a disk volume: a directory holding one file, `disk`.

Internal errors become FUSEError(errno) here and nowhere deeper. The file's
size is the volume's and never changes: a truncate gets EPERM. Since the
contents of `disk` change only through this mount, the kernel page cache is
kept across opens (keep_cache) and attributes are cached for long.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import Any

import pyfuse3

from raid1fs.errors import Raid1fsError
from raid1fs.volume import Volume

log = logging.getLogger("raid1fs.fuse")

ROOT = pyfuse3.ROOT_INODE
DISK = ROOT + 1
DISK_NAME = b"disk"
CACHE_TIMEOUT = 300.0
ROOT_KEY = "root_"  # the mount's root directory's attributes, in Superblock.attrs


def _apply(a: dict[str, Any], kept: dict[str, int]) -> None:
    """Set the attributes `kept` names (as in Superblock.attrs) in `a`."""
    if "mode" in kept:
        a["mode"] = (a["mode"] & ~0o7777) | (kept["mode"] & 0o7777)
    for key in ("uid", "gid"):
        if key in kept:
            a[key] = kept[key]
    for key in ("atime", "mtime"):
        if key + "_ns" in kept:
            a[key] = kept[key + "_ns"]


class DiskOperations(pyfuse3.Operations):
    """pyfuse3 operations for a disk volume."""

    def __init__(self, volume: Volume, uid: int, gid: int) -> None:
        super().__init__()
        self.volume = volume
        now_ns = time.time_ns()
        self.attrs: dict[int, dict[str, Any]] = {
            ROOT: {"mode": stat.S_IFDIR | 0o755, "uid": uid, "gid": gid, "atime": now_ns,
                   "mtime": now_ns, "ctime": now_ns},
            DISK: {"mode": stat.S_IFREG | 0o600, "uid": uid, "gid": gid, "atime": now_ns,
                   "mtime": now_ns, "ctime": now_ns},
        }
        # What chmod/chown/utimens set before, on the disk and on the root.
        _apply(self.attrs[DISK], volume.sb.attrs)
        _apply(self.attrs[ROOT], {k.removeprefix(ROOT_KEY): v for k, v in volume.sb.attrs.items()
                                  if k.startswith(ROOT_KEY)})
        self.direct: set[int] = set()  # handles of opens with O_DIRECT
        self._next_fh = DISK + 1

    def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        a = self.attrs[inode]
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        e.st_mode = a["mode"]
        e.st_nlink = 2 if inode == ROOT else 1
        e.st_uid = a["uid"]
        e.st_gid = a["gid"]
        e.st_rdev = 0
        e.st_size = self.volume.size if inode == DISK else 0
        e.st_blksize = 1 << 20
        e.st_blocks = -(-e.st_size // 512)
        e.st_atime_ns = a["atime"]
        e.st_mtime_ns = a["mtime"]
        e.st_ctime_ns = a["ctime"]
        return e

    def _check(self, inode: int) -> None:
        if inode not in self.attrs:
            raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self._check(inode)
        return self._entry(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == DISK_NAME:
            return self._entry(DISK)
        if name in (b".", b".."):
            return self._entry(ROOT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id < 1:
            pyfuse3.readdir_reply(token, DISK_NAME, self._entry(DISK), 1)

    async def releasedir(self, fh: int) -> None:
        return None

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        self._check(inode)
        a = self.attrs[inode]
        if fields.update_size and (inode != DISK or attr.st_size != self.volume.size):
            raise pyfuse3.FUSEError(errno.EPERM)  # the disk's size is the volume's
        if self.volume.readonly and (fields.update_mode or fields.update_uid
                                     or fields.update_gid):
            raise pyfuse3.FUSEError(errno.EROFS)
        now = time.time_ns()
        new: dict[str, int] = {}
        if fields.update_mode:
            new["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            new["uid"] = attr.st_uid
        if fields.update_gid:
            new["gid"] = attr.st_gid
        if fields.update_atime:
            new["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            new["mtime_ns"] = attr.st_mtime_ns
        if new:
            kept = new if inode == DISK else {ROOT_KEY + k: v for k, v in new.items()}
            try:
                await self.volume.set_attrs(kept)  # on every member first
            except Raid1fsError as e:
                log.error("setattr: %s", e)
                raise pyfuse3.FUSEError(e.errno) from None
        _apply(a, new)
        a["ctime"] = now
        return self._entry(inode)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self._check(inode)
        if self.volume.readonly and flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:  # atomic O_TRUNC arrives here, not as a setattr
            raise pyfuse3.FUSEError(errno.EPERM)
        fh = inode
        if flags & os.O_DIRECT:
            fh, self._next_fh = self._next_fh, self._next_fh + 1
            self.direct.add(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if off >= self.volume.size or size <= 0:
            return b""
        size = min(size, self.volume.size - off)
        try:
            return await self.volume.read(off, size)
        except Raid1fsError as e:
            log.error("read at %d+%d: %s", off, size, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off >= self.volume.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if off + len(buf) > self.volume.size:
            if fh in self.direct:
                # The kernel turns a short direct write into EIO, with the
                # part before the end written: refuse it whole instead.
                raise pyfuse3.FUSEError(errno.ENOSPC)
            buf = buf[: self.volume.size - off]
        try:
            n = await self.volume.write(off, buf)
        except Raid1fsError as e:
            log.error("write at %d+%d: %s", off, len(buf), e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            await self.volume.fsync(datasync)
        except Raid1fsError as e:
            log.error("fsync: %s", e)
            raise pyfuse3.FUSEError(e.errno) from None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        self.direct.discard(fh)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_blocks = self.volume.size // 4096
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = 2
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True

    async def _refuse(self, *args: Any, **kw: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mknod = mkdir = unlink = rmdir = symlink = link = rename = _refuse  # type: ignore

    # No xattr handlers: pyfuse3 answers ENOSYS, after which the kernel
    # stops asking. Answering ENODATA instead cost a GETXATTR round trip
    # (security.capability, checked to drop privileges) before every write:
    # half the time of a 4 KiB write.
