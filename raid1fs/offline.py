"""`raid1fs rebuild MEMBER...`: resilver the members of an unmounted volume.

The same engine as a mount (raid1fs.volume), without FUSE: assemble, start
(which resumes interrupted rebuilds and resyncs after a crash), take up stale
members, copy with progress, then mark every member clean. Interrupted
(Ctrl-C, kill), it leaves a checkpoint the next rebuild or mount resumes from.
"""

from __future__ import annotations

import logging
import sys

import trio

from raid1fs import probe, progress
from raid1fs.assemble import Plan, assemble, close_all, read_members
from raid1fs.errors import BadMemberError
from raid1fs.events import EventSink
from raid1fs.volume import Volume


def run(paths: list[str], max_rate: int | None) -> int:
    found = read_members(paths, writable=True)
    try:
        kinds = {f.sb.kind for f in found}
        if kinds != {"disk"}:
            raise BadMemberError(f"{found[0].path}: volume kind {found[0].sb.kind!r} "
                                 "is not supported by this version")
        plan = assemble(found, degraded=True)
        # Like mount: a member left out would be marked stale for good (its
        # place taken by nobody); an operator who forgot it must not pay for
        # that. A member gone for good: mount --degraded, then remove it.
        needed = [hint or f"slot {slot}" for slot, hint in plan.needed]
        if needed:
            raise BadMemberError(
                f"member missing: {', '.join(needed)} (give every member of the volume; "
                "one that is gone for good: mount --degraded, then remove it)")
    except BaseException:
        close_all(found)
        raise
    # What the engine logs as it goes (a mount's log) is printed here as the
    # outcome, failures included: stderr only for errors.
    logging.basicConfig(stream=sys.stderr, level=logging.ERROR, format="raid1fs: %(message)s",
                        force=True)
    try:
        return trio.run(_rebuild, plan, max_rate)
    except BaseExceptionGroup as eg:  # trio wraps what a nursery raised
        sub = eg.subgroup(KeyboardInterrupt)
        if sub is not None:
            raise sub.exceptions[0] from None
        raise


async def _rebuild(plan: Plan, max_rate: int | None) -> int:
    volume = Volume(plan, io_timeout=probe.default_timeout(),
                    events=EventSink(plan.authority.volume_uuid), max_rebuild_rate=max_rate)
    printer = progress.Printer()
    async with trio.open_nursery() as nursery:
        try:
            await volume.start(nursery)
            progress.print_started([r for r in await volume.rebuild_all() if "note" in r])
            if not progress.rebuilding(volume.status()):
                print("nothing to rebuild: " + ("every member is in sync"
                      if volume.state == "clean" else f"the volume is {volume.state}"))
            while progress.rebuilding(st := volume.status()):
                printer.update(st)
                await trio.sleep(0.5)
            printer.finish()
        except KeyboardInterrupt:
            printer.finish()
            with trio.CancelScope(shield=True):
                await volume.shutdown()  # records the checkpoint
            raise KeyboardInterrupt(
                "interrupted; the rebuild resumes from its checkpoint next time") from None
        finally:
            printer.finish()
            with trio.CancelScope(shield=True):
                if volume.mounted:
                    await volume.shutdown()
            nursery.cancel_scope.cancel()
    code, lines = progress.outcome(volume.status())
    for line in lines:
        print(line)
    return code
