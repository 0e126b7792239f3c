"""Small thread plumbing for overlapping disk and CPU work, with errors that are never lost.

Reading, computing and writing run on different threads so that the page cache, the disk and
the maths all work at once; a bounded queue and a fixed pool of buffers between them keep
memory flat. Whatever a worker thread raises is handed back to the thread that feeds it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class Worker:
    """Runs submitted jobs in order on one thread; its first failure is re-raised to the caller."""

    def __init__(self, name: str, depth: int = 4) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], None], Callable[[], None] | None] | object] = queue.Queue(
            maxsize=depth
        )
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not _DONE:
            job, skipped = item  # type: ignore[misc]
            if self._error is None and not self._cancelled:
                try:
                    job()
                except BaseException as exc:  # handed to the feeding thread
                    self._error = exc
            elif skipped is not None:
                skipped()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None], skipped: Callable[[], None] | None = None) -> None:
        """Queue `job`; if it will not run (an earlier job failed), `skipped` runs instead, so
        that buffers a job would have given back are given back all the same."""
        self._raise()
        self._jobs.put((job, skipped))

    def close(self, *, discard: bool = False) -> None:
        """Wait for every job and re-raise a failure; with `discard` (the caller is already
        failing) skip the jobs still queued and keep quiet."""
        self._cancelled = discard
        self._jobs.put(_DONE)
        self._thread.join()
        if not discard:
            self._raise()


class Pool(Generic[T]):
    """A fixed set of reusable buffers: `take` blocks until one is given back (or `stop` is set)."""

    def __init__(self, items: Iterable[T]) -> None:
        self._free: queue.Queue[T] = queue.Queue()
        for item in items:
            self._free.put(item)

    def take(self, stop: threading.Event | None = None) -> T | None:
        while True:
            try:
                return self._free.get(timeout=None if stop is None else 0.1)
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None

    def give(self, item: T) -> None:
        self._free.put(item)
