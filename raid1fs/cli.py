"""The command line: `raid1fs SUBCOMMAND ...`.

Every failure is one line on stderr naming the path at fault, with the
contract's exit status: 0 success, 2 bad usage, 1 (or another non-zero
value) failure; `status` exits 0 in sync, 1 degraded or rebuilding, 3 when it
cannot tell. A Python traceback for a user mistake is a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from raid1fs import __version__, control, probe
from raid1fs.errors import ControlError, Raid1fsError, UsageError
from raid1fs.sizes import parse_size

PROG = "raid1fs"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _size(text: str, rate: bool = False) -> int:
    try:
        return parse_size(text, "rate" if rate else "size", rate=rate)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rate(text: str) -> int:
    """A rate in bytes per second; 0 or "unlimited" lifts the limit."""
    if text.strip().lower() in ("0", "unlimited", "none"):
        return 0
    return _size(text, rate=True)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:  # NaN too
        raise argparse.ArgumentTypeError("must be greater than zero")
    if v > probe.MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"at most {probe.MAX_TIMEOUT:.0f} (a day)")
    return v


def _options(text: str) -> list[str]:
    return [o for o in text.split(",") if o]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Software RAID-1 over FUSE: mirrored disks and trees.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=Parser)
    sub.required = True

    c = sub.add_parser("create", help="initialise a new volume")
    c.add_argument("--kind", choices=["tree", "disk"], default="tree")
    c.add_argument("--name", default="")
    c.add_argument("--size", type=_size,
                   help="volume size for disk volumes (K, M, G, T: powers of 1024)")
    c.add_argument("--no-checksums", action="store_true")
    c.add_argument("--adopt", action="store_true", help="first member's contents become the volume")
    c.add_argument("--force", action="store_true", help="overwrite members that hold data")
    c.add_argument("members", nargs="+", metavar="MEMBER")

    m = sub.add_parser("mount", help="assemble and mount a volume",
                       usage=f"{PROG} mount [-h] [-f] [--degraded] [--prefer MEMBER]\n"
                       "                     [--io-timeout SECONDS] [--max-rebuild-rate RATE]\n"
                       "                     [--on-event CMD] [-o OPT[,OPT...]]\n"
                       "                     MEMBER [MEMBER...] MOUNTPOINT")
    m.add_argument("-f", "--foreground", action="store_true")
    m.add_argument("--degraded", action="store_true", help="mount even if a member is missing")
    m.add_argument("--prefer", metavar="MEMBER", help="the member that wins a split brain")
    m.add_argument("--io-timeout", type=_seconds, default=30.0, metavar="SECONDS")
    m.add_argument("--max-rebuild-rate", type=_rate, metavar="RATE",
                   help="bytes per second (K, M, G, T suffixes) a rebuild may copy; default "
                        "unlimited")
    m.add_argument("--on-event", metavar="CMD")
    m.add_argument("-o", dest="options", type=_options, action="append", default=[],
                   metavar="OPT[,OPT...]")
    m.add_argument("paths", nargs="+", metavar="MEMBER... MOUNTPOINT")

    u = sub.add_parser("umount", help="flush, mark members clean and unmount")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")

    s = sub.add_parser("status", help="show a mounted volume, or the members of an unmounted one")
    s.add_argument("--json", action="store_true")
    s.add_argument("paths", nargs="+", metavar="MOUNTPOINT|MEMBER")

    for name, text in (("fail", "mark a member failed"),
                       ("remove", "drop a failed or missing member")):
        f = sub.add_parser(name, help=text)
        f.add_argument("mountpoint", metavar="MOUNTPOINT")
        f.add_argument("member", metavar="MEMBER")

    a = sub.add_parser("add", help="add a member (rebuilt online) or a spare")
    a.add_argument("--spare", action="store_true")
    a.add_argument("mountpoint", metavar="MOUNTPOINT")
    a.add_argument("member", metavar="NEWMEMBER")

    r = sub.add_parser("replace", help="hot-replace OLD with NEW")
    r.add_argument("mountpoint", metavar="MOUNTPOINT")
    r.add_argument("old", metavar="OLD")
    r.add_argument("new", metavar="NEW")

    rb = sub.add_parser("rebuild", help="resilver every member that needs it")
    rb.add_argument("--wait", action="store_true")
    rb.add_argument("--max-rate", type=_rate, metavar="RATE",
                    help="bytes per second (K, M, G, T suffixes); 0 or unlimited lifts the limit")
    rb.add_argument("paths", nargs="+", metavar="MOUNTPOINT|MEMBER")

    sc = sub.add_parser("scrub", help="verify every copy, and repair with --repair")
    sc.add_argument("--repair", action="store_true")
    sc.add_argument("--wait", action="store_true")
    sc.add_argument("paths", nargs="+", metavar="MOUNTPOINT|MEMBER")
    return p


# ----- subcommands ------------------------------------------------------------

def cmd_create(a: argparse.Namespace) -> int:
    if len(a.members) < 2:
        raise UsageError("create: a mirror needs at least two members")
    if a.kind != "disk":
        raise Raid1fsError(f"{a.members[0]}: tree volumes are not supported by this version "
                           "(use --kind disk)")
    if a.adopt:
        raise UsageError("--adopt applies to tree volumes only")
    from raid1fs.create import create_disk

    probe.answer(a.members)
    sb = create_disk(a.members, a.name, a.size, not a.no_checksums, a.force)
    called = f"{sb.name} ({sb.volume_uuid})" if sb.name else sb.volume_uuid
    print(f"created disk volume {called}: {sb.size} bytes on {len(a.members)} members, "
          f"data at offset {sb.data_offset}")
    return 0


def cmd_mount(a: argparse.Namespace) -> int:
    if len(a.paths) < 2:
        raise UsageError("mount: give the members and then the mount point")
    from raid1fs.mount import MountRequest, run

    req = MountRequest(
        members=a.paths[:-1], mountpoint=a.paths[-1], foreground=a.foreground,
        degraded=a.degraded, prefer=a.prefer, io_timeout=a.io_timeout,
        max_rebuild_rate=a.max_rebuild_rate, on_event=a.on_event,
        options=[o for group in a.options for o in group],
    )
    return run(req)


def cmd_umount(a: argparse.Namespace) -> int:
    mp = os.path.abspath(a.mountpoint)
    try:
        st = control.request(mp, "status", timeout=30)
    except ControlError:
        from raid1fs.mount import clear_dead_mount

        real = os.path.realpath(mp)
        if control.mounted_fstype(real) != "fuse.raid1fs":
            raise
        clear_dead_mount(real)
        if control.mounted_fstype(real) is not None:
            raise
        print(f"{PROG}: note: its mount process was gone, so the members were not marked "
              "clean: the next mount resyncs what may differ", file=sys.stderr)
        return 0
    pid, owner = st["daemon"]["pid"], st["daemon"].get("uid", 0)
    if os.getuid() not in (0, owner):
        raise Raid1fsError(f"{a.mountpoint}: only root and the user who mounted it (uid "
                           f"{owner}) may unmount it")
    report = _exit_report(mp)
    r = subprocess.run(["fusermount3", "-u", os.path.realpath(mp)], capture_output=True,
                       text=True)
    if r.returncode and control.mounted_fstype(os.path.realpath(mp)) != "fuse.raid1fs":
        pass  # unmounted meanwhile (another umount): wait for the mount process as well
    elif r.returncode:
        msg = (r.stderr.strip().splitlines() or ["unmount failed"])[-1]
        msg = msg.removeprefix("fusermount3: ")
        loops = _loops_over(os.path.join(os.path.realpath(mp), "disk"))
        if loops:
            msg += (f" ({', '.join(loops)} attached to its disk: `losetup -d` "
                    f"{'it' if len(loops) == 1 else 'them'} first)")
        raise Raid1fsError(f"{a.mountpoint}: cannot unmount: {msg}")
    deadline = time.monotonic() + st["volume"].get("io_timeout", 30) * 2 + 30
    while os.path.exists(f"/proc/{pid}") and _alive(pid):
        if time.monotonic() > deadline:
            raise Raid1fsError(f"{a.mountpoint}: unmounted, but the mount process {pid} "
                               "did not finish marking members clean")
        time.sleep(0.05)
    _note_exit_report(report)
    _note_stuck_threads(pid)
    return 0


def _note_stuck_threads(pid: int, grace: float = 1.0) -> None:
    """The mount process has ended, but a thread of it may still be stuck
    in I/O to a hung member (the kernel ends it only when that I/O returns):
    say so, since the process stays listed until then."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                threads = next((int(line.split()[1]) for line in f
                                if line.startswith("Threads:")), 0)
        except (OSError, ValueError):
            return
        if threads <= 1:
            return
        time.sleep(0.05)
    print(f"{PROG}: note: mount process {pid} still has I/O stuck on a hung member; it goes "
          "once that I/O returns (the other members were let go)", file=sys.stderr)


def _loops_over(path: str) -> list[str]:
    """The loop devices attached to a file, by the file's path."""
    out: list[str] = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return out
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                if f.read().rstrip("\n") == path:
                    out.append(f"/dev/{name}")
        except OSError:
            continue
    return out


def _exit_report(mp: str) -> str | None:
    """The exit report of the mount at mp (raid1fs.mount._report_exit), if
    its control socket is where this client looks; a stale one is removed."""
    for sock in control.candidate_sockets(mp):
        if os.path.exists(sock):
            path = control.exit_report_path(sock)
            try:
                os.unlink(path)
            except OSError:
                pass
            return path
    return None


def _note_exit_report(path: str | None) -> None:
    """Say so if a member that was in use failed while the mount shut down
    (its final flush): the unmount itself worked, the volume is degraded."""
    if path is None:
        return
    try:
        with open(path) as f:
            report = json.load(f)
        os.unlink(path)
    except (OSError, ValueError):
        return
    for m in report.get("failed", []):
        print(f"{PROG}: note: {m['path']} failed while the mount shut down ({m['reason']}); "
              "the volume is degraded", file=sys.stderr)
    if report.get("unclean"):
        print(f"{PROG}: note: {report['unclean']}, so the members were not marked clean: "
              "the next mount resyncs what may differ", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def cmd_status(a: argparse.Namespace) -> int:
    from raid1fs import status as S

    try:
        probe.answer(a.paths)
        if len(a.paths) == 1 and _names_a_mount(a.paths[0]):
            st = control.request(a.paths[0], "status", timeout=30)
        else:
            st = S.offline_status(a.paths)
            st = S.live_status(st) or st  # members of a running mount: ask it
    except Raid1fsError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return S.EXIT_UNKNOWN
    if a.json:
        print(json.dumps(st, indent=2))
    else:
        print(S.format_human(st))
    return S.exit_status(st)


def _names_a_mount(path: str) -> bool:
    """A mount point: it has a control socket (checked first: another user
    cannot even stat a FUSE mount without allow_other), or is a directory."""
    return any(os.path.exists(s) for s in control.candidate_sockets(path)) or os.path.isdir(path)


def cmd_fail(a: argparse.Namespace) -> int:
    path = control.request(a.mountpoint, "fail", member=_member_arg(a.member))
    print(f"{path}: failed")
    return 0


def cmd_remove(a: argparse.Namespace) -> int:
    r = control.request(a.mountpoint, "remove", member=_member_arg(a.member))
    if isinstance(r, str):  # a mount of an older raid1fs
        r = {"path": r}
    print(f"{r['path']}: removed"
          + (f"; the volume is now a {r['members_expected']}-way mirror"
             if r.get("narrowed") else ""))
    if r.get("told") is False:
        _not_told(r["path"])
    return 0


def _not_told(path: str) -> None:
    """A member that left without its own metadata saying so."""
    print(f"note: {path} could not be told (it is not in this mount, or did not answer): "
          "its own metadata still calls it a member. Mounted with the others it is refused; "
          "mounted alone (--degraded) it would come up as an old copy of the volume. Reuse it "
          "with `raid1fs create --force` or `raid1fs add`")


def _member_arg(text: str) -> str:
    """Members are named by path (made absolute here) or by member UUID."""
    if len(text) == 36 and text.count("-") == 4 and not os.path.exists(text):
        return text
    return os.path.abspath(text)


def cmd_add(a: argparse.Namespace) -> int:
    # No time limit: the mount reads an existing image whole for data, which
    # takes as long as it takes (each read is under its I/O timeout).
    r = control.request(a.mountpoint, "add", member=os.path.abspath(a.member), spare=a.spare,
                        timeout=None)
    _print_join(r)
    return 0


def cmd_replace(a: argparse.Namespace) -> int:
    r = control.request(a.mountpoint, "replace", old=_member_arg(a.old),
                        new=os.path.abspath(a.new), timeout=None)  # as add
    _print_join(r)
    print(f"{a.old}: removed from the volume once {r['path']} is in sync "
          "(until then it serves as before, if it can)")
    if r.get("old_told") is False:
        _not_told(a.old)
    return 0


def _print_join(r: dict) -> None:
    from raid1fs.sizes import format_size

    if r["state"] == "spare" and r.get("takes_over"):
        print(f"{r['path']}: added as a spare (slot {r['slot']}); the volume is short of a "
              "member, so it takes over at once: follow its rebuild with `raid1fs status`")
    elif r["state"] == "spare":
        print(f"{r['path']}: added as a spare (slot {r['slot']})")
    else:
        print(f"{r['path']}: {r['state']}, {r['kind']} of {format_size(r['total_bytes'])} "
              f"(slot {r['slot']}); follow it with `raid1fs status` or `raid1fs rebuild --wait`")
    if r.get("widened"):
        print(f"the volume is now a {r['members_expected']}-way mirror (`add --spare` adds a "
              "spare instead; `fail` and `remove` of a member narrow it again)")


def cmd_rebuild(a: argparse.Namespace) -> int:
    probe.answer(a.paths)
    if len(a.paths) == 1 and _names_a_mount(a.paths[0]):
        return _rebuild_online(a)
    from raid1fs import offline  # the offline form always waits

    return offline.run(a.paths, a.max_rate)


def _rebuild_online(a: argparse.Namespace) -> int:
    from raid1fs import progress

    mp = a.paths[0]
    started = control.request(mp, "rebuild", max_rate=a.max_rate)
    from raid1fs.sizes import format_size

    if a.max_rate is not None:
        print("rebuild rate limit: " + (f"{format_size(a.max_rate)}/s" if a.max_rate
                                        else "none"))
    progress.print_started(started)
    started = [r for r in started if "note" not in r]
    st = control.request(mp, "status", timeout=30)
    idle = not progress.rebuilding(st) and not started
    # The members whose rebuilds this command waits for: no summary of a
    # rebuild that ended before it.
    waited = {r["path"] for r in started}

    def note_rebuilding(st: dict) -> None:
        waited.update(m["path"] for m in st["members"] if m.get("rebuild"))
    note_rebuilding(st)
    if idle:
        state = st["volume"]["state"]
        print("nothing to rebuild: " + ("every member is in sync" if state == "clean"
                                        else f"the volume is {state}"))
    if not a.wait:
        return 0
    printer = progress.Printer()
    try:
        while progress.rebuilding(st):
            printer.update(st)
            time.sleep(0.5)
            st = control.request(mp, "status", timeout=30)
            note_rebuilding(st)
    finally:
        printer.finish()
    code, lines = progress.outcome(st, waited)
    for line in lines:
        print(line)
    return code


def cmd_later(a: argparse.Namespace) -> int:
    raise Raid1fsError(f"{a.command}: not available in raid1fs {__version__} yet")


COMMANDS = {
    "create": cmd_create, "mount": cmd_mount, "umount": cmd_umount, "status": cmd_status,
    "fail": cmd_fail, "remove": cmd_remove, "add": cmd_add, "replace": cmd_replace,
    "rebuild": cmd_rebuild, "scrub": cmd_later,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Raid1fsError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"{PROG}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (status | head): no traceback, and none at
        # exit when Python flushes stdout again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
