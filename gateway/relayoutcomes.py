"""Relay outcomes whose commit failed, waiting to be recorded again (gateway/relay.py).

A relay worker records each attempt's outcome (the queue row's new state, a bounce, the
"relay:sent" sighting) after the upstream answered.  If that commit fails — PostgreSQL
restarting, a lock wait that ran out — the message went out but its row still says
``queued``; left so, its claim would expire and the message go out a second time.  So
the worker keeps such an outcome here and records it again after 0.5, 1, 2, 4, 4 … s
while its claim lasts (``RelayWorker._not_recorded``).

This class only keeps the schedule, thread-safe: a failure is reported in the group
committer's answering thread, the retries run in the worker's own.  What a retry does and
when to give up are the worker's: an outcome still unrecorded when its claim is about to run
out, or when the worker stops, goes to the node's journal (``gateway.relayjournal``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

RETRY_FIRST = 0.5  # seconds before the first retry; doubled after each failure …
RETRY_MAX = 4.0  # … up to this


class UnrecordedOutcomes(Generic[T]):
    """Outcomes waiting for their next try, each with the moment it is due."""

    def __init__(self, first: float = RETRY_FIRST, cap: float = RETRY_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first, self.cap = first, cap
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: list[tuple[float, T]] = []  # (due, outcome)
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)

    def keep(self, outcome: T, failures: int) -> float | None:
        """Try ``outcome`` again after its ``failures``-th failed commit: in first × 2^(failures-1)
        seconds, at most ``cap``.  Returns that delay; None once closed (nothing is kept)."""
        delay = min(self.cap, self.first * 2 ** min(max(failures, 1) - 1, 16))
        with self._lock:
            if self._closed:
                return None
            self._waiting.append((self._clock() + delay, outcome))
        return delay

    def due(self) -> list[T]:
        """Take out the outcomes whose next try is due, earliest first."""
        now = self._clock()
        with self._lock:
            ready = sorted((item for item in self._waiting if item[0] <= now), key=lambda item: item[0])
            self._waiting = [item for item in self._waiting if item[0] > now]
        return [outcome for _, outcome in ready]

    def wait_hint(self) -> float:
        """Seconds until the next try is due (0: one is); ``first`` when none waits — how
        long a thread that must also run the retries may block before looking again."""
        with self._lock:
            if not self._waiting:
                return self.first
            return max(0.0, min(due for due, _ in self._waiting) - self._clock())

    def close(self) -> list[T]:
        """No more tries (the worker is stopping): take out every waiting outcome; from now on
        ``keep`` keeps nothing."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, []
        return [outcome for _, outcome in waiting]
