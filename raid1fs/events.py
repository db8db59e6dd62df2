"""Events: every state change is logged and, with --on-event, runs a command.

The command runs through the shell with RAID1FS_EVENT, RAID1FS_VOLUME,
RAID1FS_MEMBER (where a member is concerned) and RAID1FS_MOUNTPOINT in its
environment, in the directory `mount` ran in. Commands run in the background
(a slow handler never stalls I/O), one at a time, in the order of the events;
one still running after COMMAND_TIMEOUT is stopped, and at unmount what is
queued gets a few seconds to be delivered. A command runs in a session of its
own, and stopping it stops everything it started (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import logging
import math
import os
import signal

import trio

log = logging.getLogger("raid1fs.events")

EVENTS = (
    "member-failed", "member-online", "rebuild-started", "rebuild-finished",
    "scrub-finished", "degraded", "checksum-repaired",
)


COMMAND_TIMEOUT = 60  # seconds an --on-event command may run; later events wait for it
STOP_GRACE = 2  # seconds from SIGTERM to SIGKILL for a command being stopped


async def _stop_all_of(proc: trio.Process) -> None:
    """Stop a command and whatever it started (its session's process group),
    not only the shell: a `sleep` in a hook would outlive the mount. SIGTERM
    first; SIGKILL to whatever of the group is left STOP_GRACE later."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(STOP_GRACE):
        await proc.wait()
        while True:  # the shell is gone; what it started may still be ending
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            await trio.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class EventSink:
    def __init__(self, volume_uuid: str, mountpoint: str = "", command: str | None = None,
                 cwd: str = "/") -> None:
        self.volume_uuid = volume_uuid
        self.mountpoint = mountpoint
        self.command = command
        self.cwd = cwd  # where `mount` ran: a relative command is found from there
        self.history: list[tuple[str, str]] = []
        self._send, self._receive = trio.open_memory_channel[dict[str, str]](math.inf)
        self._running = False
        self._done = trio.Event()  # the runner has delivered everything queued

    def start(self, nursery: trio.Nursery) -> None:
        """Run the command for each event from now on, one after another in
        the order of the events (a handler sees member-failed before the
        degraded it caused)."""
        if self.command:
            self._running = True
            nursery.start_soon(self._runner)

    def emit(self, event: str, member: str = "", detail: str = "") -> None:
        assert event in EVENTS, event
        self.history.append((event, member))
        log.warning("event %s%s%s", event, f" member={member}" if member else "",
                    f": {detail}" if detail else "")
        if self._running:
            env = dict(os.environ, RAID1FS_EVENT=event, RAID1FS_VOLUME=self.volume_uuid,
                       RAID1FS_MEMBER=member, RAID1FS_MOUNTPOINT=self.mountpoint)
            self._send.send_nowait(env)

    async def _runner(self) -> None:
        async for env in self._receive:
            await self._run(env)
        self._done.set()

    async def drain(self, grace: float) -> None:
        """At unmount: deliver what is queued (the events of the shutdown
        itself too), waiting at most `grace` seconds; say what was lost."""
        if not self._running:
            return
        self._running = False
        self._send.close()
        with trio.move_on_after(grace):
            await self._done.wait()
        left = self._receive.statistics().current_buffer_used
        if not self._done.is_set():
            log.warning("on-event: unmounting with %d event(s) not delivered", left + 1)

    async def _run(self, env: dict[str, str]) -> None:
        command: str = self.command or ""
        cwd = self.cwd if os.path.isdir(self.cwd) else "/"
        result = None
        try:
            with trio.move_on_after(COMMAND_TIMEOUT):
                result = await trio.run_process(
                    command, shell=True, env=env,  # type: ignore[arg-type]
                    check=False, cwd=cwd, stdin=b"", capture_stdout=False,
                    start_new_session=True, deliver_cancel=_stop_all_of)
            if result is None:
                log.warning("on-event command still running after %d s for %s: stopped, so "
                            "that later events get through", COMMAND_TIMEOUT,
                            env["RAID1FS_EVENT"])
            elif result.returncode:
                log.warning("on-event command exited %d for %s", result.returncode,
                            env["RAID1FS_EVENT"])
        except OSError as e:
            log.error("on-event command could not run: %s", e)
