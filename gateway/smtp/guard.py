"""Login penalties: a growing delay per client IP and per user name.

Each failure in the window doubles the delay before the next attempt is
checked (base, 2·base, 4·base … up to a cap).  Attempts still in flight count
as failures, so fifty parallel connections do not get fifty free guesses.
A success clears the user's record (not the IP's: one right password must not
launder a spraying IP).  Memory is bounded: at most ``max_keys`` entries,
oldest dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Record:
    failures: list[float] = field(default_factory=list)
    in_flight: int = 0


class LoginGuard:
    def __init__(
        self,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        window: float = 900.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def _record(self, key: str) -> _Record:
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = _Record()
            while len(self._records) > self.max_keys:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(key)
        cutoff = self.clock() - self.window
        rec.failures = [t for t in rec.failures if t > cutoff]
        return rec

    def _score(self, key: str) -> int:
        rec = self._record(key)
        return len(rec.failures) + rec.in_flight

    def delay(self, ip: str, user: str) -> float:
        """Seconds to wait before checking this attempt."""
        n = max(self._score("ip:" + ip), self._score("user:" + user.lower()))
        if n == 0:
            return 0.0
        return min(self.base_delay * (2 ** (n - 1)), self.max_delay)

    def begin(self, ip: str, user: str) -> None:
        self._record("ip:" + ip).in_flight += 1
        self._record("user:" + user.lower()).in_flight += 1

    def end(self, ip: str, user: str, success: bool) -> None:
        now = self.clock()
        for key in ("ip:" + ip, "user:" + user.lower()):
            rec = self._record(key)
            rec.in_flight = max(0, rec.in_flight - 1)
            if not success:
                rec.failures.append(now)
        if success:
            self._records.pop("user:" + user.lower(), None)

    def abandon(self, ip: str, user: str) -> None:
        """An attempt that was never decided (the upstream unavailable, the client gone): no
        longer in flight, and no failure either."""
        for key in ("ip:" + ip, "user:" + user.lower()):
            rec = self._record(key)
            rec.in_flight = max(0, rec.in_flight - 1)
