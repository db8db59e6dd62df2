"""Running blocking member I/O in threads, many members at once, cheaply.

Each member has a few worker threads of its own, fed by a queue. A caller
on the trio loop submits one call per member as a *batch* and sleeps once,
on an eventfd of its own; the last worker to finish writes to it, so a
two-way mirrored write costs one wake-up of the event loop, not one task,
limiter and wake-up per member. (An eventfd the loop polls directly wakes
the waiting task in one pass of trio's scheduler; trio's run_sync_soon
took two and cost about 80 us more per write on a 2-core VM.)

The wait has a deadline: calls that have not finished by then are reported
as timed out and abandoned. A member whose calls hang ties up only its own
threads; the engine fails it, and nothing else waits on those threads.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Collection
from typing import Any

import trio

_PENDING = object()


class Batch:
    """Calls submitted together; the caller wakes when all have finished."""

    __slots__ = ("pending", "results", "errors", "fd", "signalled", "lock", "waiter")

    def __init__(self, n: int, fd: int) -> None:
        self.pending = n
        self.results: list[Any] = [_PENDING] * n
        self.errors: list[BaseException | None] = [None] * n
        self.fd = fd  # eventfd written when the last call is done
        self.signalled = False
        self.lock = threading.Lock()
        self.waiter: threading.Lock | None = None

    def finish(self, i: int, result: Any, error: BaseException | None) -> None:
        """Called in a worker thread when call i is done."""
        self.errors[i] = error
        self.results[i] = result
        with self.lock:
            self.pending -= 1
            last = self.pending == 0
            waiter = self.waiter
        if last:
            if waiter is not None:
                waiter.release()
                return
            os.eventfd_write(self.fd, 1)
            self.signalled = True

    def done(self, i: int) -> bool:
        return self.results[i] is not _PENDING


# Eventfds for batches to wait on, used by the trio thread only. One whose
# batch was abandoned (timed out, cancelled) is reused only once its last
# call has signalled it and the signal is drained: a late write must never
# wake a later batch.
_free: list[int] = []
# Abandoned batches, each with the workers of its calls.
_abandoned: list[tuple[Batch, list[Workers]]] = []


def given_up_running(among: Collection[Workers]) -> bool:
    """Whether a call given up on (timed out, cancelled) is still running
    on one of these members' workers: it may yet land there."""
    return any(not b.done(i) and w in among
               for b, ws in _abandoned if not b.signalled for i, w in enumerate(ws))


def _take_fd() -> int:
    if _abandoned:  # rare: only after a timeout or a cancellation
        for entry in [e for e in _abandoned if e[0].signalled]:
            _abandoned.remove(entry)
            b = entry[0]
            os.eventfd_read(b.fd)
            _free.append(b.fd)
    if _free:
        return _free.pop()
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


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
        with self._busy_lock:
            self.busy += 1
            grow = self.busy > len(self.threads) and len(self.threads) < self.size
        if grow:
            # A thread more only when calls would queue: idle threads all
            # waiting on one queue cost wake-ups and GIL hand-offs per call
            # (one thread per member is 15% faster at 4 KiB writes).
            t = threading.Thread(target=self._loop, name=f"io:{self.name}", daemon=True)
            t.start()
            self.threads.append(t)
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


async def run_batch(calls: list[tuple[Workers, Callable[..., Any], tuple]], timeout: float,
                    quick: float = 0) -> tuple[list[Any], list[BaseException | None], list[bool]]:
    """Run every call at once; return (results, errors, finished) per call.

    A call not finished within `timeout` seconds has finished[i] False and is
    abandoned. Cancellation from outside propagates as usual.

    `quick` > 0 is for calls expected to finish in microseconds (small
    buffered writes): when no call is in flight on any of these members, the
    loop thread first waits up to `quick` seconds on a lock the last worker
    releases, then as usual. Parking the task in trio and waking it through
    the eventfd cost about a fifth of a 4 KiB write's time; the bound keeps a
    slow or hung member from holding up the loop for longer than `quick`,
    and a member with a call in flight (a hung one has) takes the usual path.
    """
    batch = Batch(len(calls), _take_fd())
    if quick and all(w.busy == 0 for w, _, _ in calls):
        waiter = batch.waiter = threading.Lock()
        waiter.acquire()
        done = False
        raised = True
        try:
            for i, (workers, fn, args) in enumerate(calls):
                workers.submit(batch, i, fn, args)
            done = waiter.acquire(timeout=quick)
            raised = False
        finally:
            with batch.lock:
                # Whoever finishes after this writes the eventfd instead.
                done = done or batch.pending == 0
                batch.waiter = None
            if done:
                _free.append(batch.fd)
            elif raised:
                _abandoned.append((batch, [w for w, _, _ in calls]))
        if done:
            return batch.results, batch.errors, [True] * len(calls)
    else:
        for i, (workers, fn, args) in enumerate(calls):
            workers.submit(batch, i, fn, args)
    woken = False
    try:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(batch.fd)
            woken = True
    finally:
        # Woken, the eventfd was written; `signalled` is set just after the
        # write, so a waiter woken first must not go by it (the batch would
        # be taken for abandoned). A batch that ends without its signal is
        # abandoned, its eventfd reused once signalled and drained.
        if woken or batch.signalled:
            os.eventfd_read(batch.fd)
            _free.append(batch.fd)
        else:
            _abandoned.append((batch, [w for w, _, _ in calls]))
    finished = [batch.done(i) for i in range(len(calls))]
    return batch.results, batch.errors, finished
