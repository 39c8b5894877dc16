"""Where a process's row-file writes run (the write-behind of :mod:`tierstore.tiers.rowfile`).

By default on one background thread per process: a write's journal, scatter and disarm overlap
the caller's next work (other tables, the next step).

A process whose one thread has idle moments of its own can defer the writes to them instead:
``tierstored`` calls :func:`defer` at start and :func:`run_deferred` after sending each reply,
so the writes a request caused (evicted dirty rows, updated rows not in DRAM) run while the
client works on that reply. They then never compete with the service's own thread for the GIL,
nor with the service and its clients for the host's cores. Measured through the service at 10%
DRAM (26 x 100k x 64, pooling 20, Zipf 1.05; two services, one per mode, steps alternating):
4-6% faster steps than with the thread in each of six runs.

A deferred write still runs before anything that depends on it: a :class:`Future` whose
``result()`` runs it first, so a read of its rows, the next write of its file, ``flush`` and
``close`` (which all wait for the file's pending write) run it on the waiting thread. Its error,
if any, is raised there, as a background write's is.
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

_executor: "ThreadPoolExecutor | _Deferred | None" = None
_jobs = [0]  # writes submitted and not finished
_jobs_lock = threading.Lock()


class _DeferredWrite(Future):
    """A write that runs once: on :func:`run_deferred`, or on the first thread that waits."""

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        super().__init__()
        self._job: tuple[Callable[..., Any], tuple] | None = (fn, args)
        self._run_lock = threading.Lock()

    def run(self) -> None:
        with self._run_lock:
            if self._job is None:
                return
            (fn, args), self._job = self._job, None
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - kept for whoever waits, like a thread's
                self.set_exception(e)
            else:
                self.set_result(result)

    def result(self, timeout: float | None = None) -> Any:
        self.run()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.run()
        return super().exception(timeout)


class _Deferred:
    """The executor of deferred writes: a queue, emptied in submission order."""

    def __init__(self) -> None:
        self._queue: collections.deque[_DeferredWrite] = collections.deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        f = _DeferredWrite(fn, args)
        self._queue.append(f)
        return f

    def run_all(self) -> int:
        n = 0
        while self._queue:
            self._queue.popleft().run()
            n += 1
        return n

    def shutdown(self, wait: bool = True) -> None:
        self.run_all()


def _current() -> "ThreadPoolExecutor | _Deferred":
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(1, thread_name_prefix="tierstore-rowfile")
    return _executor


def submit(fn: Callable[..., Any], *args: Any) -> Future:
    """Run the write ``fn(*args)`` behind the caller (thread or deferred, see the module doc)."""
    with _jobs_lock:
        _jobs[0] += 1
    fut = _current().submit(fn, *args)
    fut.add_done_callback(_job_done)
    return fut


def _job_done(_: Future) -> None:
    with _jobs_lock:
        _jobs[0] -= 1


def busy() -> bool:
    """Whether writes are queued or running (callers with work they could hand over, like
    RowFile.update's, do it themselves instead: measured at 10% DRAM, handing it to a write
    thread that was already the bottleneck (uniform ids, pwrite) made steps up to 1.9x
    slower)."""
    return _jobs[0] > 0


def defer(on: bool = True) -> None:
    """Defer this process's writes to :func:`run_deferred` (``on``), or go back to the
    background thread. Switching waits for (or runs) the writes already submitted."""
    global _executor
    if on == isinstance(_executor, _Deferred):
        return
    if _executor is not None:
        _executor.shutdown(wait=True)
    _executor = _Deferred() if on else None


def deferred() -> bool:
    """Whether this process's writes are deferred (:func:`defer`)."""
    return isinstance(_executor, _Deferred)


def run_deferred() -> int:
    """Run the deferred writes, oldest first; returns how many ran (0 when writes are not
    deferred). Never raises a write's error: the next call on its file does."""
    return _executor.run_all() if isinstance(_executor, _Deferred) else 0


def _forget() -> None:
    global _executor
    _executor = None
    _jobs[0] = 0


os.register_at_fork(after_in_child=_forget)
