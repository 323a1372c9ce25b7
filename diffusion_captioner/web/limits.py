"""Admission control for ``dcap serve``: a bounded queue and a time limit per caption request.

A request is *admitted* while fewer than ``workers + queue`` are admitted already; then it runs
on one of ``workers`` threads, waiting its turn in a FIFO queue of at most ``queue`` requests.
With ``A`` the admitted requests (running or waiting)::

    admit  iff  A < workers + queue        else answer 503 at once (nothing waits unbounded)
    answer 504 when the request has not finished  timeout_s  seconds after it was admitted

A request that times out while still waiting is dropped before it starts; one that is running
finishes in the background (a generation call cannot be interrupted) and keeps its slot until
then, so at most ``workers`` generations ever run and at most ``workers + queue`` requests are
ever admitted, timed-out ones included.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Defaults of ``dcap serve --workers/--queue/--timeout``.
DEFAULT_WORKERS = 2
DEFAULT_QUEUE = 16
DEFAULT_TIMEOUT_S = 30.0


class Overloaded(RuntimeError):
    """Every worker is busy and the queue is full (answered 503)."""


class TimedOut(RuntimeError):
    """The request did not finish within the time limit (answered 504)."""


class Admission:
    """At most ``workers`` requests run at once, at most ``queue`` wait; each has ``timeout_s``."""

    def __init__(self, workers: int = DEFAULT_WORKERS, queue: int = DEFAULT_QUEUE,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if int(workers) < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        if int(queue) < 0:
            raise ValueError(f"--queue must be >= 0, got {queue}")
        if not float(timeout_s) > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {timeout_s}")
        self.workers, self.queue, self.timeout_s = int(workers), int(queue), float(timeout_s)
        self._slots = threading.BoundedSemaphore(self.workers + self.queue)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="dcap-caption")
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def capacity(self) -> int:
        """Requests admitted at most: running plus waiting."""
        return self.workers + self.queue

    @property
    def admitted(self) -> int:
        """Requests admitted now (running, waiting, or timed out and still running)."""
        with self._lock:
            return self._admitted

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._admitted -= 1
        self._slots.release()

    def run(self, work: Callable[[], T]) -> T:
        """``work()`` on a worker thread, or :class:`Overloaded` / :class:`TimedOut`.

        ``work``'s own exceptions are raised here unchanged.
        """
        if not self._slots.acquire(blocking=False):
            raise Overloaded(f"server busy: {self.workers} request(s) running and {self.queue} "
                             "waiting (dcap serve --workers/--queue); retry shortly")
        with self._lock:
            self._admitted += 1
        admitted_at = time.monotonic()

        def timed_work() -> T:
            waited = time.monotonic() - admitted_at
            if waited >= self.timeout_s:  # its caller has answered 504 already
                raise TimedOut("dropped after waiting past the time limit")
            return work()

        try:
            future = self._pool.submit(timed_work)
        except BaseException:
            self._release(None)  # type: ignore[arg-type]
            raise
        future.add_done_callback(self._release)
        try:
            return future.result(timeout=self.timeout_s)
        except (FutureTimeout, CancelledError) as error:
            started = not future.cancel()  # a waiting request never starts
            logger.warning("caption request timed out after %.1f s (%s)", self.timeout_s,
                           "still running; its answer is dropped" if started else "never started")
            raise TimedOut(f"caption request took longer than the {self.timeout_s:g} s limit "
                           "(dcap serve --timeout); retry, or ask for fewer steps or decoders"
                           ) from error

    def close(self) -> None:
        """Stop accepting work; running requests finish, waiting ones are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
