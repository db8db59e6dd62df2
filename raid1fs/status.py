"""`raid1fs status`: the report, for a mount or for offline members.

The JSON form is the contract's; the human form is a table like
`zpool status`, one row per member with its state and error counters.
"""

from __future__ import annotations

import fcntl
from typing import Any

from raid1fs import member as m
from raid1fs.assemble import Found, assemble, close_all, read_members
from raid1fs.bitmap import Bitmap
from raid1fs.errors import Raid1fsError
from raid1fs.sizes import format_size
from raid1fs.superblock import REBUILDING, read_bitmaps
from raid1fs.volume import CLEAN, DEGRADED, Volume

EXIT_IN_SYNC, EXIT_NOT_IN_SYNC, EXIT_UNKNOWN = 0, 1, 3


def offline_status(paths: list[str]) -> dict[str, Any]:
    """Status from the metadata of members of an unmounted volume."""
    found = read_members(paths, writable=False, lock=False)
    try:
        in_use = []
        for f in found:
            try:
                fcntl.flock(f.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                locked = m.backing_file_locked(f.fd)  # a loop device: its file
            except OSError:
                locked = True
            if locked:
                in_use.append(f.path)
        plan = assemble(found, degraded=True, strict=False)
        volume = Volume(plan)
        st = volume.status()
        st["volume"]["clean_shutdown"] = plan.authority.clean
        if plan.split_brain:
            st["volume"]["split_brain"] = list(plan.split_brain)
            # Two copies each went on alone: not in sync, whatever the
            # roster counts, and mount refuses until --prefer says which wins.
            if st["volume"]["state"] == CLEAN:
                st["volume"]["state"] = DEGRADED
        if plan.removed:
            st["volume"]["removed"] = [f.path for f in plan.removed]
        st["volume"]["in_use"] = in_use
        _bitmaps(st, volume, plan.members)
        problems = {f.path: f.problems for f in found if f.problems}
        for mem in st["members"]:
            mem["metadata_problems"] = problems.get(mem["path"], [])
        return st
    finally:
        close_all(found)


def _bitmaps(st: dict[str, Any], volume: Volume, found: list[Found]) -> None:
    """What the members' bitmaps say; after an unclean shutdown, the resync
    the next mount will do (the members may differ there until then)."""
    rl = volume.regions
    intent, missed = Bitmap(rl.nregions, rl.nbytes), Bitmap(rl.nregions, rl.nbytes)
    for f in found:
        try:
            i_raw, m_raw = read_bitmaps(f.fd, f.sb)
        except OSError:
            continue
        intent |= Bitmap(rl.nregions, rl.nbytes, i_raw)
        missed |= Bitmap(rl.nregions, rl.nbytes, m_raw)
    v = st["volume"]
    v["regions"].update(intent_bytes=rl.bytes_of(intent), missed_bytes=rl.bytes_of(missed))
    online = [f for f in found if f.state == "online"]
    unclean = any(not f.sb.clean for f in online)
    if unclean and intent and len(online) > 1 and not v["in_use"]:
        v["resync_pending_bytes"] = rl.bytes_of(intent)
        if v["state"] == CLEAN:
            v["state"] = REBUILDING  # not in sync until the next mount resyncs


def live_status(st: dict[str, Any]) -> dict[str, Any] | None:
    """The status of the running mount of this offline view's volume, if
    its members are held by one that answers (whose member metadata lags
    behind what it knows)."""
    from raid1fs import control  # (the offline path needs no sockets otherwise)

    v = st["volume"]
    if not v.get("in_use"):
        return None
    silent = False
    for mp, fstype, source in control.mounts():
        if fstype != "fuse.raid1fs" or source != control.fsname(v["name"]):
            continue  # not a mount of this volume (its name is in the source)
        try:
            live = control.request(mp, "status", timeout=5)
        except Raid1fsError:
            silent = True  # one of ours that did not answer
            continue
        # The same volume, and these very members (two halves of a split
        # brain share the volume UUID): by member UUID.
        held = {x["uuid"] for x in st["members"] if x["path"] in v["in_use"]}
        if live["volume"]["uuid"] == v["uuid"] and held <= {
                x["uuid"] for x in live.get("members", []) if x["state"] != "missing"}:
            return dict(live)
    # No mount of this volume answered for these members: if none was
    # silent, the holder is not a mount (an offline command, or a mount
    # process still exiting).
    v["mounted"] = silent
    return None


def exit_status(st: dict[str, Any]) -> int:
    if st["volume"].get("in_use") and st["volume"].get("mounted"):
        return EXIT_UNKNOWN  # a mount we could not reach holds them
    return EXIT_IN_SYNC if st["volume"]["state"] == CLEAN else EXIT_NOT_IN_SYNC


def format_human(st: dict[str, Any]) -> str:
    v = st["volume"]
    lines = [
        f"  volume: {v['name'] or '-'}  ({v['uuid']})",
        f"    kind: {v['kind']}, {format_size(v['size'])}, "
        f"{v['members_expected']}-way mirror, "
        + ("checksums on" if v["checksums"] else
           "checksums not yet kept (room reserved)" if v.get("checksum_area") else
           "no checksums"),
        f"   state: {v['state'].upper()}",
    ]
    if v.get("mounted") and not v.get("in_use"):
        lines.append(f" mounted: {v.get('mountpoint', 'yes')}"
                     + (" (read-only)" if v.get("readonly") else ""))
    elif v.get("in_use") and v.get("mounted"):
        lines.append(f" mounted: yes, by a running mount holding {', '.join(v['in_use'])}, "
                     "which did not answer: what follows is its members' metadata, "
                     "which may lag behind")
    elif v.get("in_use"):
        lines.append(f" mounted: no, but {', '.join(v['in_use'])} held by another raid1fs "
                     "process (an offline command, or a mount still exiting)")
    else:
        shut = "clean" if v.get("clean_shutdown") else ("NOT clean (killed, or some writes not "
                                                       "known to be on every member): the "
                                                       "next mount resyncs what may differ")
        lines.append(f" mounted: no; last shutdown {shut}")
    lines.append(f"  events: {v['events']}")
    if v.get("split_brain"):
        a, b = v["split_brain"]
        lines.append(f"   split: {a} and {b} were changed apart from each other; mount "
                     "with --prefer MEMBER to choose the one that wins")
    for path in v.get("removed", []):
        lines.append(f" removed: {path} is no longer a member (its data is an old copy)")
    behind = [mem["path"] for mem in st["members"]
              if mem["state"] in ("failed", "stale", "missing") and not mem.get("spare")]
    online = sum(mem["state"] == "online" for mem in st["members"])
    if behind and online >= v["members_expected"] and not v.get("split_brain"):
        lines.append(f"  action: the mirror has its {v['members_expected']} members in sync; "
                     f"`raid1fs remove` {', '.join(behind)} if it is gone for good, or "
                     "`raid1fs add` it back (a wider mirror)")
    held = sum(mem["state"] != "spare" and not mem.get("spare") for mem in st["members"])
    if held < v["members_expected"]:
        lines.append(f"   empty: {v['members_expected'] - held} of the "
                     f"{v['members_expected']} slots without a member; `raid1fs add` one")
    if v.get("resync_pending_bytes"):
        lines.append(f"  resync: {format_size(v['resync_pending_bytes'])} where writes were in "
                     "flight may differ between members; the next mount resyncs it")
    lines.append("")
    width = max([len(mem["path"] or "?") for mem in st["members"]] + [6])
    lines.append(f"  {'SLOT':<4}  {'MEMBER':<{width}}  {'STATE':<10} {'READ':>5} {'WRITE':>5} "
                 f"{'CKSUM':>5}  {'READS':>9} {'WRITES':>9}")
    notes = []
    for mem in st["members"]:
        e = mem["errors"]
        lines.append(
            f"  {mem['slot']:<4}  {mem['path'] or '?':<{width}}  {mem['state']:<10} "
            f"{e['read']:>5} {e['write']:>5} {e['checksum']:>5}  {mem['reads']:>9} "
            f"{mem['writes']:>9}")
        rb = mem.get("rebuild")
        if rb and rb.get("total_bytes") is None:
            # Offline, a resync: how much is left is in the bitmaps, not here.
            lines.append(f"        resync stopped (checkpoint at "
                         f"{format_size(rb.get('checkpoint_bytes') or 0)}); it resumes at the "
                         "next mount or `raid1fs rebuild`")
        elif rb:
            pct = 100.0 * rb["done_bytes"] / max(1, rb["total_bytes"])
            if rb.get("running", True):
                lines.append(f"        rebuilding {pct:.0f}%  "
                             f"{format_size(rb['rate_bytes_per_s'])}/s"
                             f"  ETA {_eta(rb.get('eta_s'))}"
                             + (f"  (replacing {rb['replaces']})" if rb.get("replaces") else ""))
            else:  # offline, or stopped on an error (below)
                lines.append(f"        rebuild stopped at {pct:.0f}%"
                             + (f": {rb['error']}" if rb.get("error") else
                                "; it resumes at the next mount or `raid1fs rebuild`"))
        if mem.get("fail_reason"):
            notes.append(f"  {mem['path']}: {mem['fail_reason']}")
        for p in mem.get("metadata_problems") or []:
            notes.append(f"  {mem['path']}: metadata {p} (the other copy is in use)")
    if notes:
        lines.append("")
        lines.append("errors:")
        lines.extend(notes)
    return "\n".join(lines)


def _eta(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
