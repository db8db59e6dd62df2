"""Assembly: which members given on the command line to trust, and how.

    for each path given (all checks before anything is written):
        it must exist, be readable, and not be named twice (same file, same
        device, or the same member UUID under two names)
        it must carry a valid superblock (either copy) of the same volume
    choose the authority: the member with the highest event counter
    split brain: two members that each record themselves active and the
        other gone (failed, missing or unknown) were changed apart; refuse
        and name them, unless --prefer names the one that wins (it then
        becomes the authority). Not split: a member the other records gone
        at an event counter above its own (it left and was not used since)
    judge every member by the authority's roster:
        listed active  -> online (an event counter behind by an interrupted
                          metadata update is caught up when the mount starts;
                          further behind, or behind a clean authority: an
                          older copy of the member, stale, rebuilt in full)
        listed failed or missing -> stale: it missed writes, serves no reads
        listed spare   -> spare
        listed rebuilding -> rebuilding: it resumes from its checkpoint
        not listed     -> refused: it was removed from the volume (checked
                          first, among all members given: see removed_members)
    every slot the roster lists active but nobody brought is missing;
        refuse unless --degraded (a rebuilding slot nobody brought is
        missing too, but was not in sync anyway: no --degraded needed)
    refuse if no online member remains

The same function serves `mount` (which then opens the volume) and the
offline `status` (which only reports what it found).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from raid1fs import member as m
from raid1fs.errors import (
    AssemblyError,
    BadMemberError,
    SplitBrainError,
    UsageError,
)
from raid1fs.sizes import format_size
from raid1fs.superblock import (
    ACTIVE,
    FAILED,
    MISSING,
    REBUILDING,
    SPARE,
    Superblock,
    read_superblock,
)


@dataclass
class Found:
    """A member path with its open fd and superblock."""

    path: str
    fd: int
    sb: Superblock
    problems: list[str] = field(default_factory=list)
    state: str = ""
    note: str = ""  # why it is judged so, when that is not plain from the roster
    idents: frozenset[tuple[object, ...]] = frozenset()  # fd_identities(fd)


@dataclass
class Plan:
    """The outcome of assembly: who is who, and what the roster says."""

    authority: Superblock
    members: list[Found]
    missing: list[tuple[int, str]]  # (slot, last known path) of absent active members
    split_brain: tuple[str, str] | None = None  # (offline status) two members changed apart
    # Members --prefer overruled: the winner's roster records them gone as of
    # the mount that settled it, so that the split is not found again.
    overruled: list[Found] = field(default_factory=list)
    removed: list[Found] = field(default_factory=list)  # (offline status) see removed_members

    @property
    def needed(self) -> list[tuple[int, str]]:
        """The missing slots that were in sync: a mount without them is degraded."""
        return [(i, p) for i, p in self.missing if self.authority.roster[i].state == ACTIVE]


def identity(path: str) -> tuple[object, ...]:
    """What makes two paths the same member: the inode, or the device (for
    a loop device, the inode of the file it serves)."""
    st = os.stat(path)
    return _identity(st, m.backing_file_of(path) if stat.S_ISBLK(st.st_mode) else None)


def fd_identities(fd: int) -> frozenset[tuple[object, ...]]:
    """Every identity() a path naming this open member can have: a loop
    device's own, and that of the file it serves (the one identity() gives
    while the file is there; the device's, once it was deleted or renamed)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return frozenset({_identity(st, None)})
    backing = m.loop_backing_file(fd)
    return frozenset({_identity(st, None)} | ({identity(backing)} if backing else set()))


def _identity(st: os.stat_result, backing: str | None) -> tuple[object, ...]:
    if backing is not None:
        return identity(backing)
    if stat.S_ISBLK(st.st_mode):
        return ("dev", st.st_rdev)
    return ("ino", st.st_dev, st.st_ino)


def check_distinct(paths: list[str]) -> None:
    """Refuse a member named twice (under any name)."""
    seen: dict[tuple[object, ...], str] = {}
    for p in paths:
        try:
            ident = identity(p)
        except FileNotFoundError:
            # Not there yet (create makes it): the resolved path is its identity,
            # so a new image named twice, or through a symlink, is caught too.
            ident = ("path", os.path.realpath(p))
        except OSError as e:
            raise BadMemberError(f"{p}: cannot access: {e.strerror}") from None
        if ident in seen:
            raise BadMemberError(f"{p}: named twice (same member as {seen[ident]})")
        seen[ident] = p


def read_members(paths: list[str], writable: bool = True, lock: bool = True) -> list[Found]:
    """Open each path and read its superblock; close everything on failure."""
    paths = [os.path.abspath(p) for p in paths]
    check_distinct(paths)
    found: list[Found] = []
    try:
        for p in paths:
            fd = m.open_member(p, writable=writable, lock=lock)
            try:
                sb, problems = read_superblock(fd, p)
                idents = fd_identities(fd)
            except OSError as e:
                m.close_member(fd)
                raise BadMemberError(f"{p}: cannot read: {e.strerror}") from None
            except BaseException:
                m.close_member(fd)
                raise
            found.append(Found(p, fd, sb, problems, idents=idents))
            have, need = m.device_size(fd), sb.data_offset + sb.size
            if have < need:  # cut short since (truncated, a smaller device)
                raise BadMemberError(
                    f"{p}: too small for its volume: {format_size(have)}, it needs "
                    f"{format_size(need)} ({need} bytes; was the image truncated?)")
        first = found[0]
        for f in found[1:]:
            if f.sb.volume_uuid != first.sb.volume_uuid:
                raise BadMemberError(
                    f"{f.path}: belongs to another volume ({f.sb.name or f.sb.volume_uuid}) "
                    f"than {first.path} ({first.sb.name or first.sb.volume_uuid})"
                )
        by_uuid: dict[str, str] = {}
        for f in found:
            if f.sb.member_uuid in by_uuid:
                raise BadMemberError(
                    f"{f.path}: same member as {by_uuid[f.sb.member_uuid]} (a copy of its image?)"
                )
            by_uuid[f.sb.member_uuid] = f.path
    except BaseException:
        close_all(found)
        raise
    return found


def close_all(found: list[Found]) -> None:
    for f in found:
        try:
            m.close_member(f.fd)
        except OSError:
            pass


def _active_in(sb: Superblock, member_uuid: str) -> bool:
    e = sb.roster_entry(member_uuid)
    return e is not None and e.state == ACTIVE


def _gone_in(sb: Superblock, member_uuid: str) -> bool:
    """Does this roster say the member went away (failed, missing, removed)?"""
    e = sb.roster_entry(member_uuid)
    return e is None or e.state in (FAILED, MISSING)


def _left_quietly(x: Superblock, y: Superblock) -> bool:
    """Did x leave y's volume and stay unused since? y records x gone at an
    event counter above x's own: x has written no metadata, so no data,
    since it left (a mount of x alone would have raised its counter)."""
    e = y.roster_entry(x.member_uuid)
    return (e is not None and e.state in (FAILED, MISSING) and e.gone_events > 0
            and x.events < e.gone_events)


def removed_members(found: list[Found]) -> list[Found]:
    """Members removed from the volume: named as removed by a member given
    here, or by their own metadata (remove and replace write that to a
    member as it leaves, when they can). Such a member holds an old copy of
    the data whatever its event counter says (it may have been mounted
    alone since): never the authority, never half of a split brain. (A
    member whose own roster merely lacks itself is not one: a new member
    has such metadata until the commit that names it lands.)"""
    return [x for x in found if any(y.sb.was_removed(x.sb.member_uuid) for y in found)]


def find_split_brain(found: list[Found]) -> list[tuple[Found, Found]]:
    """Pairs of members that each think themselves active and that the
    other went away: each went on without the other. A member that only
    does not know the other because it left before the other joined is
    behind, not split."""
    pairs = []
    for i, a in enumerate(found):
        for b in found[i + 1 :]:
            if (
                _active_in(a.sb, a.sb.member_uuid)
                and _active_in(b.sb, b.sb.member_uuid)
                and _gone_in(a.sb, b.sb.member_uuid)
                and _gone_in(b.sb, a.sb.member_uuid)
                and not _left_quietly(a.sb, b.sb)
                and not _left_quietly(b.sb, a.sb)
            ):
                pairs.append((a, b))
    return pairs


def _behind_the_volume(roster: Superblock, found: list[Found]) -> Superblock:
    """The roster, with every member it lists in sync whose own event
    counter says it is an older copy of itself (an image restored from a
    backup or a snapshot) recorded as failed, to be rebuilt in full: what
    it missed is not known.

    Every commit is written to all in-sync members at once, and one whose
    write fails is recorded failed (a commit that reaches none of them
    takes back its number), so a crash leaves an in-sync member at most one
    commit behind, and none behind once a clean unmount's commit is there.
    Further behind, or behind a clean authority, is an older copy. (A
    crash inside the very commit of an unmount can leave a member whose
    data is whole one behind a clean authority: it is rebuilt needlessly;
    safe.) Members being rebuilt are left alone: they get each commit after
    the in-sync ones, so a crash can leave them further behind, and their
    rebuild goes on from its own checkpoint. A copy taken since the last
    metadata change (while mounted, say) cannot be told from the member by
    its counter."""
    def older(f: Found) -> bool:
        return _active_in(roster, f.sb.member_uuid) and (
            f.sb.events < roster.events - 1 or (roster.clean and f.sb.events < roster.events))
    behind = [f for f in found if older(f)]
    if not behind:
        return roster
    roster = roster.copy()
    for f in behind:
        entry = roster.roster_entry(f.sb.member_uuid)
        assert entry is not None
        entry.state, entry.gone_events = FAILED, -1  # gone as of the next commit
        entry.rebuild_full = True
        f.note = (f"{roster.events - f.sb.events} metadata update(s) behind the volume "
                  f"(events {f.sb.events}, the volume's {roster.events}"
                  + (", last unmounted cleanly" if roster.clean else "")
                  + "): an older copy of this member; rebuilt in full")
    return roster


def assemble(
    found: list[Found], degraded: bool = False, prefer: str | None = None, strict: bool = True
) -> Plan:
    """Decide each member's state; see the module docstring for the rules.

    With strict=False (offline status) nothing is refused; the plan reports.
    """
    removed = removed_members(found)
    if removed and strict:
        x = removed[0]
        raise AssemblyError(f"{x.path}: no longer a member of volume "
                            f"{x.sb.name or x.sb.volume_uuid} (it was removed)")
    found = [f for f in found if f not in removed]
    if not found:
        x = removed[0]
        raise AssemblyError(f"{x.path}: no longer a member of volume "
                            f"{x.sb.name or x.sb.volume_uuid} (it was removed; its data is an "
                            "old copy of the volume's)")
    authority = max(found, key=lambda f: f.sb.events)
    split_brain = None
    overruled: list[Found] = []
    if prefer is not None:
        pref = os.path.abspath(prefer)
        chosen = [f for f in found if f.path == pref]
        if not chosen:
            raise UsageError(f"{prefer}: --prefer names a path that is not among the members")
        authority = chosen[0]
        pairs = find_split_brain(found)
        if not any(authority in pair for pair in pairs):
            # Without a split, the roster of a member that is behind would
            # call the others and itself in sync, with different data.
            raise AssemblyError(f"{prefer}: not one side of a split brain among the members "
                                "given; --prefer only settles one (leave it out)")
        for pair in pairs:
            overruled += [f for f in pair if f is not authority and f not in overruled]
    else:
        split = find_split_brain(found)
        if split:
            a, b = split[0]
            split_brain = (a.path, b.path)
            if strict:
                raise SplitBrainError(
                    f"split brain: {a.path} and {b.path} were changed apart from each other "
                    "(each mounted without the other); mount with --prefer MEMBER to choose "
                    "the one that wins")
    roster = _behind_the_volume(authority.sb, found)
    for f in found:
        entry = roster.roster_entry(f.sb.member_uuid)
        if entry is None:
            # Not removed (that was checked first): named by no roster, so
            # an `add` stopped before the commit that names it (or a removal
            # too long ago to be remembered).
            if strict:
                raise AssemblyError(
                    f"{f.path}: not a member of volume {roster.name or roster.volume_uuid}: "
                    "its metadata names the volume but the volume's does not name it (an "
                    "`add` of it that did not finish?); `raid1fs add` it to use it")
            f.state = m.FAILED
            f.note = ("not named by the volume's metadata (an `add` of it that did not "
                      "finish?); `raid1fs add` it to use it")
        elif entry.state == ACTIVE:
            f.state = m.ONLINE
        elif entry.state in (FAILED, MISSING):
            f.state = m.STALE
        elif entry.state == SPARE:
            f.state = m.SPARE
        elif entry.state == REBUILDING:
            f.state = m.REBUILDING
    present = {f.sb.member_uuid for f in found}
    missing = [(i, s.path) for i, s in enumerate(roster.roster)
               if s.state in (ACTIVE, REBUILDING) and s.uuid not in present]
    plan = Plan(roster, found, missing, split_brain, overruled, removed)
    if strict and plan.needed and not degraded:
        names = ", ".join(p or f"slot {i}" for i, p in plan.needed)
        raise AssemblyError(f"member missing: {names} (mount with --degraded to run without it)")
    if strict and not any(f.state == m.ONLINE for f in found):
        raise AssemblyError(
            f"{found[0].path}: no in-sync member among those given (all stale or spare)"
        )
    return plan

