"""The control channel of a running mount (guarantee 10).

A mount listens on a unix stream socket in the run directory, named after
its mount point. The socket itself is world-connectable (mode 0666) so that
anyone can ask for `status`; every request that changes the volume is
checked against the peer's credentials (SO_PEERCRED, from the kernel), and
only root and the user who mounted the volume may make it.

Protocol: one JSON object per line each way. A request is
{"cmd": NAME, ...arguments}; the answer {"ok": true, "result": ...} or
{"ok": false, "error": "one line", "exit": N}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from raid1fs.errors import ControlError, NotPermittedError, Raid1fsError

log = logging.getLogger("raid1fs.control")

PRIVILEGED = {"fail", "remove", "add", "replace", "rebuild", "scrub", "umount"}
MAX_REQUEST = 1 << 16


def run_dir() -> str:
    d = os.environ.get("RAID1FS_RUN_DIR")
    if d:
        return d
    if os.geteuid() == 0:
        return "/run/raid1fs"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/raid1fs-{os.getuid()}",
                        "raid1fs")


def _unescape(field: bytes) -> str:
    """A mountinfo field: octal escapes (\\040 for a space), then the bytes
    as a file name."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def fsname(volume_name: str) -> str:
    """The source a raid1fs mount shows in mountinfo: raid1fs:NAME, in ASCII
    (pyfuse3 passes mount options as ASCII; other letters become '?')."""
    return "raid1fs:" + (volume_name or "volume").encode("ascii", "replace").decode()


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, file system type, source) of every mount this process
    sees, from /proc/self/mountinfo."""
    out = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                sep = fields.index(b"-")
                out.append((_unescape(fields[4]), os.fsdecode(fields[sep + 1]),
                            _unescape(fields[sep + 2])))
    except (OSError, ValueError, IndexError):
        pass
    return out


def mount_key(mountpoint: str, resolved: bool = False) -> str:
    """The name of a mount point's socket and log. `resolved`: the path is
    already the real one (as in the mount table): it is not resolved again,
    which would ask the mount itself (and hang if it does not answer)."""
    real = mountpoint if resolved else os.path.realpath(mountpoint)
    return hashlib.sha256(real.encode()).hexdigest()[:16]


def socket_path(mountpoint: str, directory: str | None = None) -> str:
    return os.path.join(directory or run_dir(), mount_key(mountpoint) + ".sock")


def candidate_sockets(mountpoint: str) -> list[str]:
    """Where a client looks: its own run dir first, then root's."""
    paths = [socket_path(mountpoint)]
    if not os.environ.get("RAID1FS_RUN_DIR"):
        root = socket_path(mountpoint, "/run/raid1fs")
        if root not in paths:
            paths.append(root)
    return paths


def mounted_fstype(path: str) -> str | None:
    """The type of the file system mounted exactly at `path` (a real path), if any."""
    for mp, fstype, _ in mounts():
        if mp == path:
            return fstype
    return None


def exit_report_path(sock_path: str) -> str:
    """Where a mount, as it exits, says what its shutdown did (members that
    failed in the final flush), for the `raid1fs umount` that waits for it."""
    return sock_path + ".exit"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    """Serves requests for one mount until cancelled."""

    def __init__(self, path: str, handlers: dict[str, Handler], owner_uid: int,
                 mountpoint: str = "") -> None:
        self.path = path
        self.mountpoint = mountpoint
        self.handlers = handlers
        self.owner_uid = owner_uid

    def permitted(self, uid: int) -> bool:
        return uid == 0 or uid == self.owner_uid

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(self.path)
        os.chmod(self.path, 0o666)  # access is decided on peer credentials
        listener.listen(16)
        task_status.started()
        try:
            async with trio.open_nursery() as n:
                while True:
                    conn, _ = await listener.accept()
                    n.start_soon(self._handle, conn)
        finally:
            listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        async with stream:
            try:
                buf = b""
                while b"\n" not in buf and len(buf) < MAX_REQUEST:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buf += chunk
                reply = await self._dispatch(buf.split(b"\n", 1)[0], conn)
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.debug("control connection dropped: %s", e)
            except Exception:  # never let one client take the mount down
                log.exception("control connection failed")

    async def _dispatch(self, line: bytes, conn: trio.socket.SocketType) -> dict[str, Any]:
        try:
            req = json.loads(line)
            cmd = req["cmd"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed control request", "exit": 2}
        pid, uid, _ = peer_credentials(conn)  # type: ignore[arg-type]
        if cmd in PRIVILEGED and not self.permitted(uid):
            log.warning("refused %s from uid %d (pid %d)", cmd, uid, pid)
            return {"ok": False, "exit": NotPermittedError.exit_code,
                    "error": f"{self.mountpoint}: permission denied: only root and uid "
                             f"{self.owner_uid} "
                             f"(who mounted this volume) may run {cmd}"}
        handler = self.handlers.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown control command {cmd!r}", "exit": 2}
        try:
            return {"ok": True, "result": await handler(req)}
        except Raid1fsError as e:
            return {"ok": False, "error": str(e), "exit": e.exit_code}
        except Exception as e:  # a bug: say so, keep serving
            log.exception("control command %s failed", cmd)
            return {"ok": False, "error": f"internal error in {cmd}: {e}", "exit": 1}


def request(mountpoint: str, cmd: str, timeout: float | None = 120.0, **args: Any) -> Any:
    """Send one request to the mount at `mountpoint`; return its result.

    Raises ControlError when no mount answers, or the Raid1fsError the mount
    reported (with its exit status).
    """
    last_error = ""
    for path in candidate_sockets(mountpoint):
        if not os.path.exists(path):
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (ConnectionRefusedError, FileNotFoundError):
            last_error = "stale control socket"
            continue
        except ConnectionResetError:
            buf = b""  # dropped as the process ended: said below
        except TimeoutError:
            raise ControlError(
                f"{mountpoint}: the mount did not answer within {timeout:g} s") from None
        except OSError as e:
            raise ControlError(f"{mountpoint}: control channel: {e.strerror or e}") from None
        finally:
            s.close()
        if not buf:
            # The process ended (or dropped us) between request and answer.
            raise ControlError(f"{mountpoint}: the mount process ended before answering "
                               f"(killed?), so whether the {cmd} happened is not known; "
                               "`raid1fs status` of the members tells")
        reply = json.loads(buf.split(b"\n", 1)[0])
        if reply.get("ok"):
            return reply.get("result")
        err = Raid1fsError(reply.get("error", "unknown error"))
        err.exit_code = int(reply.get("exit", 1))
        raise err
    if last_error and mounted_fstype(os.path.realpath(mountpoint)) == "fuse.raid1fs":
        raise ControlError(f"{mountpoint}: the raid1fs process of this mount is gone (killed?); "
                           f"`raid1fs umount {mountpoint}` detaches it, and the next mount "
                           "resyncs what was in flight")
    raise ControlError(f"{mountpoint}: not a raid1fs mount point"
                       + (f" ({last_error})" if last_error else ""))

