"""Login penalties: a growing delay per client IP and per user name.

Each failure in the window doubles the delay before the next attempt is
checked (base, 2·base, 4·base … up to a cap).  Attempts still in flight count
as failures, so fifty parallel connections do not get fifty free guesses.
A success clears the user's record (not the IP's: one right password must not
launder a spraying IP).  Memory is bounded: at most ``max_keys`` entries,
oldest dropped first.

With ``shared`` (gateway/loginfail.py) the failures counted are those of every process and
node and of SMTP, IMAP and the panel alike; attempts in flight are counted per process.  A
caller runs ``prepare`` before ``delay`` (a database read only for a key with failures
known) and ``settle`` (or ``finish`` and its write) instead of ``end``: the failure written,
or the user's cleared.  The shared record unavailable, the failures this guard saw itself
still count.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.loginfail import SharedFailures, ip_key, user_key


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
        shared: SharedFailures | None = None,
    ):
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self.shared = shared
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
        failures = len(rec.failures)
        shared = self.shared
        if shared is not None:
            seen = len(shared.ages(key, self.window))
            # The shared record is the truth (a success elsewhere cleared it); unreachable,
            # what this guard saw itself still counts.
            failures = seen if shared.available else max(failures, seen)
        return failures + rec.in_flight

    async def prepare(self, ip: str, user: str) -> None:
        """Before ``delay``: read the shared failures of this IP and user when some are
        known here (the slow path; nothing known, no database round trip)."""
        if self.shared is not None and self.wants_read(ip, user):
            await self.shared.run(self.shared.fresh, [ip_key(ip), user_key(user)])

    def wants_read(self, ip: str, user: str) -> bool:
        """Whether ``prepare`` would read the shared record (failures of the IP or the user
        known in this process)."""
        keys = (ip_key(ip), user_key(user))
        return self.shared is not None and (self.shared.knows(keys) or any(self._has_failures(k) for k in keys))

    def _has_failures(self, key: str) -> bool:
        rec = self._records.get(key)
        return rec is not None and bool(rec.failures)

    def delay(self, ip: str, user: str) -> float:
        """Seconds to wait before checking this attempt."""
        n = max(self._score(ip_key(ip)), self._score(user_key(user)))
        if n == 0:
            return 0.0
        return min(self.base_delay * (2 ** (n - 1)), self.max_delay)

    def begin(self, ip: str, user: str) -> None:
        self._record(ip_key(ip)).in_flight += 1
        self._record(user_key(user)).in_flight += 1

    def end(self, ip: str, user: str, success: bool) -> None:
        now = self.clock()
        for key in (ip_key(ip), user_key(user)):
            rec = self._record(key)
            rec.in_flight = max(0, rec.in_flight - 1)
            if not success:
                rec.failures.append(now)
        if success:
            self._records.pop(user_key(user), None)

    def finish(self, ip: str, user: str, success: bool) -> Callable[[], bool] | None:
        """``end``, and a failure noted in the shared record (known in this process at once);
        returns the blocking write still to run (``shared.run``) — the failure's rows, or a
        success clearing the user's failures where any are known — or None."""
        shared = self.shared
        key = user_key(user)
        had = shared is not None and success and (shared.knows([key]) or self._has_failures(key))
        self.end(ip, user, success)
        if shared is None:
            return None
        if not success:
            rows = shared.note([ip_key(ip), key])
            return lambda: shared.store(rows)
        if had:
            return lambda: shared.clear(key)
        return None

    async def settle(self, ip: str, user: str, success: bool) -> None:
        """``finish``, and its write done (bounded by ``loginfail.DB_TIMEOUT``)."""
        job = self.finish(ip, user, success)
        if job is not None and self.shared is not None:
            await self.shared.run(job)

    def abandon(self, ip: str, user: str) -> None:
        """An attempt that was never decided (the upstream unavailable, the client gone): no
        longer in flight, and no failure either."""
        for key in (ip_key(ip), user_key(user)):
            rec = self._record(key)
            rec.in_flight = max(0, rec.in_flight - 1)
