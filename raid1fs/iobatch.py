"""Running blocking member I/O in threads, many members at once, cheaply.

Each member has a few worker threads of its own, fed by a queue. A caller
on the trio loop submits one call per member as a *batch* and sleeps once;
the last worker to finish wakes it, so a two-way mirrored write costs one
wake-up of the event loop, not one task, limiter and wake-up per member.

The wait has a deadline: calls that have not finished by then are reported
as timed out and abandoned. A member whose calls hang ties up only its own
threads; the engine fails it, and nothing else waits on those threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import trio

_PENDING = object()


class Batch:
    """Calls submitted together; the caller wakes when all have finished."""

    __slots__ = ("pending", "results", "errors", "task", "token", "abandoned", "lock")

    def __init__(self, n: int) -> None:
        self.pending = n
        self.results: list[Any] = [_PENDING] * n
        self.errors: list[BaseException | None] = [None] * n
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.abandoned = False
        self.lock = threading.Lock()

    def finish(self, i: int, result: Any, error: BaseException | None) -> None:
        """Called in a worker thread when call i is done."""
        self.errors[i] = error
        self.results[i] = result
        with self.lock:
            self.pending -= 1
            last = self.pending == 0
        if last:
            try:
                self.token.run_sync_soon(self._wake)
            except trio.RunFinishedError:
                pass

    def _wake(self) -> None:
        if not self.abandoned:
            self.abandoned = True  # wake once
            trio.lowlevel.reschedule(self.task)

    def done(self, i: int) -> bool:
        return self.results[i] is not _PENDING


class Workers:
    """The threads that do one member's I/O."""

    def __init__(self, name: str, threads: int = 4) -> None:
        self.name = name
        self.size = threads
        self.queue: queue.SimpleQueue[tuple[Batch, int, Callable[..., Any], tuple]] = (
            queue.SimpleQueue())
        self.threads: list[threading.Thread] = []
        self.busy = 0  # calls submitted and not yet returned (hung ones too)
        self._busy_lock = threading.Lock()

    def submit(self, batch: Batch, i: int, fn: Callable[..., Any], args: tuple) -> None:
        if len(self.threads) < self.size:
            t = threading.Thread(target=self._loop, name=f"io:{self.name}", daemon=True)
            t.start()
            self.threads.append(t)
        with self._busy_lock:
            self.busy += 1
        self.queue.put((batch, i, fn, args))

    def _loop(self) -> None:
        while True:
            batch, i, fn, args = self.queue.get()
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the caller
                error: BaseException | None = e
                result = None
            else:
                error = None
            with self._busy_lock:
                self.busy -= 1
            batch.finish(i, result, error)


async def run_batch(calls: list[tuple[Workers, Callable[..., Any], tuple]], timeout: float
                    ) -> tuple[list[Any], list[BaseException | None], list[bool]]:
    """Run every call at once; return (results, errors, finished) per call.

    A call not finished within `timeout` seconds has finished[i] False and is
    abandoned. Cancellation from outside propagates as usual.
    """
    batch = Batch(len(calls))
    for i, (workers, fn, args) in enumerate(calls):
        workers.submit(batch, i, fn, args)

    def abort(_: Any) -> trio.lowlevel.Abort:
        batch.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_task_rescheduled(abort)
    finished = [batch.done(i) for i in range(len(calls))]
    return batch.results, batch.errors, finished
