"""`raid1fs mount`: assemble the volume, mount it, serve until unmounted.

    check the mount point and assemble the members (raid1fs.assemble)
    daemonise unless -f (the parent waits until the mount is usable and
        reports any error that happened before that)
    mount the FUSE file system (no request is served yet), so that an
        option FUSE refuses leaves every member as it was
    mark every online member dirty (the event counter rises)
    start the control channel, serve
    serve until the kernel says the file system was unmounted (by
        `raid1fs umount`, `fusermount3 -u` or `umount`) or SIGTERM/SIGINT
    make every member durable and mark it clean, then exit

The exit uses os._exit: threads abandoned on a hung member must not keep a
finished mount process alive.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pyfuse3
import trio

from raid1fs import control, probe
from raid1fs import member as m
from raid1fs.assemble import Plan, assemble, close_all, read_members
from raid1fs.errors import BadMemberError, Raid1fsError, UsageError
from raid1fs.events import EventSink
from raid1fs.fuse_disk import DiskOperations
from raid1fs.volume import Volume

log = logging.getLogger("raid1fs.mount")

READAHEAD_KB = 1024  # FUSE requests are at most 1 MiB: make readahead use them
OUR_OPTIONS = {"ro", "sync"}


EVENT_GRACE = 10.0  # seconds queued --on-event commands get at unmount


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # run from a directory since deleted
        return "/"


@dataclass
class MountRequest:
    members: list[str]
    mountpoint: str
    foreground: bool = False
    degraded: bool = False
    prefer: str | None = None
    io_timeout: float = 30.0
    max_rebuild_rate: int | None = None
    on_event: str | None = None
    cwd: str = field(default_factory=_cwd)  # where `mount` ran (the daemon runs in /)
    options: list[str] = field(default_factory=list)

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    @property
    def sync(self) -> bool:
        return "sync" in self.options


def clear_dead_mount(mp: str) -> None:
    """Detach a raid1fs mount whose process died (kill -9, crash).

    Only a mount of type fuse.raid1fs that answers ENOTCONN is touched.
    """
    if control.mounted_fstype(mp) != "fuse.raid1fs":
        return
    try:
        os.statvfs(mp)  # always reaches the mount process (stat may be cached)
        return  # alive
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            return
    r = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, text=True)
    if r.returncode == 0:
        print(f"raid1fs: note: detached the dead raid1fs mount left at {mp}", file=sys.stderr)


def _not_there(path: str) -> bool:
    """No such file (any other error is left for the member checks to name)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        pass
    return False


def check_mountpoint(req: MountRequest) -> str:
    mp = os.path.abspath(req.mountpoint)
    clear_dead_mount(os.path.realpath(mp))
    if not os.path.exists(mp):
        raise BadMemberError(f"{req.mountpoint}: mount point does not exist")
    real = os.path.realpath(mp)
    for p in req.members:
        rp = os.path.realpath(p)
        if rp == real:
            raise BadMemberError(f"{req.mountpoint}: the mount point is a member")
        if rp.startswith(real.rstrip("/") + "/"):
            raise BadMemberError(f"{p}: member lies under the mount point {req.mountpoint}")
        backing = m.backing_file_of(rp)  # a loop device: where its data lies
        if backing is not None and os.path.realpath(backing).startswith(real.rstrip("/") + "/"):
            raise BadMemberError(f"{p}: loop device over {backing}, which lies under the "
                                 f"mount point {req.mountpoint}")
    if not os.path.isdir(mp):
        raise BadMemberError(f"{req.mountpoint}: mount point is not a directory (the mount "
                             "point comes last, after the members)")
    if os.path.ismount(mp) or control.mounted_fstype(real):
        raise BadMemberError(f"{req.mountpoint}: something is already mounted there")
    return real  # where the kernel mounts it: what status shows, what umount needs


def claim_mountpoint(real: str, given: str) -> int:
    """One raid1fs mount process per mount point at a time, from its checks
    until it has removed its control socket: two mounts started at once
    would stack there (the lower one then unreachable), and one still
    shutting down would remove the next one's socket. The claim is a lock
    on a file named after the mount point in the run directory (only its
    owner can make files there), which the kernel drops when the process
    ends, even by kill -9. Returns its descriptor (close it to let go)."""
    d = control.run_dir()
    os.makedirs(d, mode=0o755, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise BadMemberError(f"{d}: the run directory is not a directory of yours that only "
                             "you can write to (set RAID1FS_RUN_DIR or XDG_RUNTIME_DIR)")
    path = os.path.join(d, control.mount_key(real, resolved=True) + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BadMemberError(f"{given}: another raid1fs mount process has this mount point "
                             "(starting, or still shutting down); try again once it has "
                             "ended") from None
    return fd


def prepare(req: MountRequest) -> tuple[str, Plan, int]:
    """Every check before anything is written (guarantee 9)."""
    if req.io_timeout <= 0:
        raise UsageError("--io-timeout must be greater than zero")
    # Before anything touches them here: a hung path fails the mount, not hangs it;
    # with --degraded it is left out, like one that is not there.
    stuck = []
    if req.degraded:
        stuck = probe.hung(req.members, req.io_timeout)
        if stuck and len(stuck) == len(req.members):
            raise probe.no_answer(stuck[0], req.io_timeout)
        for p in stuck:
            print(f"raid1fs: {p}: no answer within {req.io_timeout:g} s; mounting without it "
                  "(--degraded)", file=sys.stderr)
        req = dataclasses.replace(req, members=[p for p in req.members
                                                if os.path.abspath(p) not in stuck])
    else:
        probe.answer(req.members, req.io_timeout)
    mp = check_mountpoint(req)
    claim = claim_mountpoint(mp, req.mountpoint)
    try:
        return mp, _assemble(req, stuck), claim
    except BaseException:
        os.close(claim)
        raise


def _assemble(req: MountRequest, said: list[str]) -> Plan:
    """The members' plan; `said`: members left out already, and said so."""
    members = req.members
    if not req.degraded:
        first_gone = next((p for p in req.members if _not_there(p)), None)
        if first_gone is not None:
            raise BadMemberError(f"{os.path.abspath(first_gone)}: no such file or device (to "
                                 "mount without it, give the same command with --degraded)")
    if req.degraded:
        # What the refusal without --degraded suggests: the same command with
        # it. A named member that is not there is left out, and said so.
        gone = [p for p in req.members if _not_there(p)]
        members = [p for p in req.members if p not in gone]
        if not members:
            raise BadMemberError(f"{gone[0]}: no such file or device")
        for p in gone:
            print(f"raid1fs: {os.path.abspath(p)}: not there; mounting without it "
                  "(--degraded)", file=sys.stderr)
    found = read_members(members, writable=not req.readonly)
    try:
        kinds = {f.sb.kind for f in found}
        if kinds != {"disk"}:
            raise BadMemberError(f"{found[0].path}: volume kind {found[0].sb.kind!r} "
                                 "is not supported by this version")
        plan = assemble(found, degraded=req.degraded, prefer=req.prefer)
    except BaseException:
        close_all(found)
        raise
    named = {os.path.abspath(p) for p in req.members + said}  # those not there: said above
    for slot, hint in plan.needed:
        if hint not in named:
            print(f"raid1fs: {hint or f'slot {slot}'}: not given; mounting without it "
                  "(--degraded)", file=sys.stderr)
    return plan


def fuse_options(req: MountRequest, name: str) -> set[str]:
    # libfuse splits -o at commas and takes a backslash as an escape.
    fsname = control.fsname(name).replace("\\", "\\\\").replace(",", "\\,")
    opts = {"fsname=" + fsname, "subtype=raid1fs", "default_permissions"}
    for o in req.options:
        if o not in OUR_OPTIONS:
            opts.add(o)
    if req.readonly:
        opts.add("ro")
    return opts


def fuse_init(ops: DiskOperations, mountpoint: str, options: set[str]) -> None:
    """pyfuse3.init, with what libfuse says about a refusal (it writes to
    stderr, which a daemon has on /dev/null) in the one-line error: an
    unknown -o option is bad usage (exit 2), anything else (no access to
    /dev/fuse, the kernel refusing the mount) a failure that says why."""
    said = tempfile.TemporaryFile()
    saved = os.dup(2)
    os.dup2(said.fileno(), 2)
    try:
        pyfuse3.init(ops, mountpoint, options)
        failed = None
    except RuntimeError as e:
        failed = e
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    said.seek(0)
    lines = [ln.strip() for ln in said.read(4096).decode(errors="replace").splitlines()
             if ln.strip()]
    said.close()
    for ln in lines:
        log.info("libfuse: %s", ln)
    if failed is None:
        return
    why = lines[-1].removeprefix("fuse: ") if lines else str(failed)
    if "unknown option" in why:
        raise UsageError(f"{mountpoint}: {why}")
    raise Raid1fsError(f"{mountpoint}: FUSE mount failed: {why}")


def set_readahead(mountpoint: str, under: int) -> None:
    """Raise the mount's readahead; `under` is the device of the directory
    it was mounted on: a stat that lands there means the mount is gone
    already (unmounted while it started), and nothing is changed there."""
    dev = os.stat(mountpoint).st_dev
    if dev == under:
        raise Raid1fsError(f"{mountpoint}: unmounted again (fusermount3 -u, umount) before the "
                           "mount was usable")
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:
        log.info("could not raise readahead (%s): %s", path, e)


async def serve(req: MountRequest, mountpoint: str, plan: Plan, ready: ReadyPipe) -> None:
    events = EventSink(plan.authority.volume_uuid, mountpoint, req.on_event, req.cwd)
    volume = Volume(plan, io_timeout=req.io_timeout, sync=req.sync, readonly=req.readonly,
                    events=events, max_rebuild_rate=req.max_rebuild_rate)
    ops = DiskOperations(volume, os.getuid(), os.getgid())

    async def h_status(_: dict) -> dict:
        st = volume.status()
        st["volume"]["mountpoint"] = mountpoint
        st["daemon"] = {"pid": os.getpid(), "uid": os.getuid()}
        return st

    async def h_fail(r: dict) -> str:
        return (await volume.fail(r["member"])).path

    async def h_remove(r: dict) -> dict:
        return await volume.remove(r["member"])

    async def h_add(r: dict) -> dict:
        return await volume.add(r["member"], spare=bool(r.get("spare")))

    async def h_replace(r: dict) -> dict:
        return await volume.replace(r["old"], r["new"])

    async def h_rebuild(r: dict) -> list:
        if volume.readonly:
            raise Raid1fsError(f"{mountpoint}: the volume is mounted read-only")
        return await volume.rebuild_all(r.get("max_rate"))

    handlers: dict[str, control.Handler] = {
        "status": h_status, "fail": h_fail, "remove": h_remove, "add": h_add,
        "replace": h_replace, "rebuild": h_rebuild}
    # Paths derived from the mount point are worked out now, while it is a
    # plain directory: once mounted, resolving it means a request to this
    # very process, which never comes back once the loop stops serving (a
    # signal before the kernel's first request was answered, or at the end).
    sock_path = control.socket_path(mountpoint)
    try:  # the report of an earlier mount here that nobody read
        os.unlink(control.exit_report_path(sock_path))
    except OSError:
        pass
    server = control.ControlServer(sock_path, handlers,
                                   owner_uid=os.getuid(), mountpoint=mountpoint)
    # Signals are caught from here on, before the FUSE mount exists: one
    # that comes while the volume starts (metadata writes, up to the I/O
    # timeout on a slow member) is acted on once it has started, with a
    # clean unmount, instead of killing the process and leaving a dead mount.
    stopped: list[str] = []
    usable: list[bool] = []
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            events.start(nursery)
            # The FUSE mount first: a mount option it refuses must leave the
            # members as they were (start() writes their metadata).
            under = os.stat(mountpoint).st_dev
            fuse_init(ops, mountpoint, fuse_options(req, plan.authority.name))
            try:
                await volume.start(nursery)
            except BaseException:
                pyfuse3.close(unmount=True)
                raise
            signal_scope = trio.CancelScope()
            try:
                await nursery.start(server.serve)
                nursery.start_soon(_announce_ready, mountpoint, under, ready, stopped, usable)
                nursery.start_soon(_on_signals, signals, stopped, usable, mountpoint,
                                   signal_scope)
                log.info("mounted volume %s (%s) at %s: %s", plan.authority.volume_uuid,
                         plan.authority.name, mountpoint, volume.state)
                await pyfuse3.main(max_tasks=64)
            finally:
                # No signal acts on this mount from now on: it is ending already
                # (and its session is closed below: pyfuse3.terminate would crash).
                signal_scope.cancel()
                with trio.CancelScope(shield=True):
                    log.info("unmounted: flushing and marking members clean")
                    in_use = set(volume.writable())
                    unclean = ""
                    try:
                        await volume.shutdown()
                    except Raid1fsError as e:
                        log.error("shutdown: %s", e)
                        unclean = f"the final flush failed ({e})"
                    if volume.regions.suspect and not unclean:
                        unclean = ("writes given up on after the I/O timeout may have landed "
                                   "on some members only")
                    _report_exit(sock_path,
                                 [{"path": x.path, "reason": x.fail_reason}
                                  for x in volume.members if x in in_use and x.state == "failed"],
                                 unclean)
                    pyfuse3.close(unmount=True)
                    volume.let_go()
                    log.info("members clean; exiting")
                    if stopped:  # still starting: the waiting `raid1fs mount` says why it failed
                        ready.send(f"error 1: {mountpoint}: stopped by {stopped[0]} before the "
                                   "mount was usable; unmounted again")
                    await events.drain(grace=EVENT_GRACE)
                nursery.cancel_scope.cancel()


def _report_exit(sock_path: str, failed: list[dict[str, str]], unclean: str) -> None:
    """What `raid1fs umount` tells the operator once this process is gone."""
    path = control.exit_report_path(sock_path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"failed": failed, "unclean": unclean}, f)
    except OSError as e:
        log.warning("%s: cannot write: %s", path, e.strerror)


class ReadyPipe:
    """The pipe to the waiting parent; written once, then forgotten, so no
    later message can land in whatever file reuses its descriptor number."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, text: str) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.write(fd, text.encode() + b"\n")
        except OSError:
            pass
        finally:
            os.close(fd)


async def _announce_ready(mountpoint: str, under: int, ready: ReadyPipe,
                          stopped: list[str], usable: list[bool]) -> None:
    # The stat goes through the kernel to our own loop: once it answers,
    # the mount is usable (unless a signal is taking it down again: then
    # the stat may fail as the connection is closed).
    try:
        await trio.to_thread.run_sync(set_readahead, mountpoint, under)
    except OSError:
        if stopped:
            return
        raise
    except Raid1fsError as e:  # the loop ends by itself: the kernel closed the connection
        ready.send(f"error 1: {e}")
        return
    if not stopped:
        usable.append(True)
        ready.send("ok")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _on_signals(signals: AsyncIterator[int], stopped: list[str], usable: list[bool],
                      mountpoint: str, scope: trio.CancelScope) -> None:
    """SIGTERM, SIGINT, SIGHUP: unmount, as `raid1fs umount` does, and so
    not while the disk is in use (a loop device attached to it): the file
    system on it would lose its device, and with it what is not yet
    written. Then the mount goes on serving, and says why. While the
    mount is still starting, nothing can use it yet: it is ended at once.
    `scope` is cancelled when the mount ends by other means."""
    with scope:
        async for sig in signals:
            name = signal.Signals(sig).name
            if usable:
                try:
                    r = await trio.run_process(["fusermount3", "-u", mountpoint], check=False,
                                               capture_stdout=True, capture_stderr=True)
                    said = (r.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
                except OSError as e:
                    r, said = None, f"cannot run fusermount3: {e}"
                if r is None or r.returncode:
                    log.error("%s: not unmounting: %s (%s); detach what uses it, or use "
                              "`raid1fs umount`, which says what", name, mountpoint, said)
                    continue
                # The kernel ends the connection, and with it pyfuse3.main (and
                # then this task); until then, later signals are still heard.
                log.warning("%s: unmounted", name)
                continue
            if scope.cancel_called:
                return  # the mount ended meanwhile: its session is closed
            log.warning("%s: unmounting", name)
            stopped.append(name)  # still starting: `raid1fs mount` says why it failed
            pyfuse3.terminate()
            return


def setup_logging(path: str | None) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if path:
        logging.basicConfig(filename=path, level=logging.INFO, format=fmt, force=True)
    else:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=fmt, force=True)


def log_path(mountpoint: str) -> str:
    return os.path.join(control.run_dir(), control.mount_key(mountpoint) + ".log")


LOG_KEEP_DAYS = 30
# A socket a killed mount left behind: nobody listens on it. Only one that
# refuses a connection is removed (a mount in another mount namespace is
# not in our mount table but still listens), and only once it is an hour
# old (never the socket of a mount that is just starting).
STALE_SOCKET_S = 3600


def prune_run_dir(directory: str, now: float | None = None) -> None:
    """Remove the logs and exit reports of mount points not mounted now and
    untouched for LOG_KEEP_DAYS (one log per mount point ever used would
    otherwise pile up until reboot), and the sockets a killed mount left
    behind (nobody listens), once STALE_SOCKET_S old. Best effort."""
    now = time.time() if now is None else now
    live = {control.mount_key(mp, resolved=True) for mp, fstype, _ in control.mounts()
            if fstype == "fuse.raid1fs"}
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        key, dot, ext = name.partition(".")
        keep_s = STALE_SOCKET_S if ext == "sock" else LOG_KEEP_DAYS * 86400
        if ext not in ("log", "sock.exit", "sock") or key in live:
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.lstat(path).st_mtime > keep_s and (ext != "sock" or _deaf(path)):
                os.unlink(path)
        except OSError:
            pass


def _deaf(sock_path: str) -> bool:
    """Does nobody listen on this unix socket?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(sock_path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def run(req: MountRequest) -> int:
    """The `mount` command. Returns the exit status."""
    mountpoint, plan, claim = prepare(req)
    if req.foreground:
        setup_logging(None)
        return _daemon_main(req, mountpoint, plan, None, claim)
    os.makedirs(control.run_dir(), mode=0o755, exist_ok=True)
    prune_run_dir(control.run_dir())
    logfile = log_path(mountpoint)  # resolved now, not once it is mounted
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        close_all(plan.members)
        os.close(claim)  # the daemon holds it
        msg = b""
        while chunk := os.read(r, 4096):
            msg += chunk
        os.waitpid(pid, 0)
        text = msg.decode(errors="replace").strip()
        if text == "ok":
            return 0
        code, _, why = text.removeprefix("error ").partition(": ")
        if code == "2":
            raise UsageError(why)
        raise Raid1fsError(why or f"{req.mountpoint}: the mount process died before the mount "
                           f"was usable (see {logfile})")
    # First child: new session, then fork again so the daemon is no session leader.
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    setup_logging(logfile)
    _daemon_main(req, mountpoint, plan, w, claim)
    os._exit(0)


async def _serve(req: MountRequest, mountpoint: str, plan: Plan, ready: ReadyPipe) -> None:
    """serve(), with an error of ours out of trio's exception group."""
    try:
        await serve(req, mountpoint, plan, ready)
    except BaseExceptionGroup as group:
        match, rest = group.split(Raid1fsError)
        if rest is not None:
            raise  # something else went wrong too: the whole group, logged in full
        ours: BaseException | None = match
        while isinstance(ours, BaseExceptionGroup) and len(ours.exceptions) == 1:
            ours = ours.exceptions[0]
        if isinstance(ours, Raid1fsError):
            raise ours from group
        raise


def _daemon_main(req: MountRequest, mountpoint: str, plan: Plan, ready_fd: int | None,
                 claim: int) -> int:
    status = 0
    ready = ReadyPipe(ready_fd)
    logfile = log_path(mountpoint)  # resolved now, not once it is mounted
    try:
        trio.run(_serve, req, mountpoint, plan, ready)
    except Raid1fsError as e:
        log.error("%s", e)
        if req.foreground:
            print(f"raid1fs: {e}", file=sys.stderr)
        ready.send(f"error {e.exit_code}: {e}")
        status = e.exit_code
    except BaseException as e:  # report, never hang the parent
        log.exception("mount process failed")
        leaf: BaseException = e
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        ready.send(f"error 1: {req.mountpoint}: mount process failed: "
                   f"{type(leaf).__name__}: {leaf} (see {logfile})")
        status = 1
    # Its control socket is gone: the mount point is free for the next
    # mount, also while a thread stuck on a hung member keeps this process
    # (and every file it has open) from ending. No signal may end the
    # process before that (trio no longer catches them).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    os.close(claim)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
