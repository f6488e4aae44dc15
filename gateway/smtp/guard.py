"""Login penalties: a growing delay per client IP and per user name.

Each failure in the window doubles the delay before the next attempt is checked (base,
2·base, 4·base … up to a cap), counted so that real users behind one address are not
slowed by each other (Dovecot's auth penalty does the like):

- a user's failures count once per password (``loginfail.marks``): a phone retrying an old
  saved password adds one failure, not one per retry; a guesser's every new password counts;
- an IP's failures count once per user name failing from it, beyond the first: one user's
  failures (a phone with an old password behind an office NAT) never slow the colleagues on
  that address — that user's own count slows that user; a second user failing from it
  gives everybody there the base delay, each further one doubles it.  Spraying (one
  password over many user names) is slowed by the IP, guessing (many passwords for one
  user) by the user name, from any address;
- attempts still in flight count for the user name, except those with this attempt's own
  password: fifty parallel guesses do not get fifty free tries, but a mail client opening
  five sessions at once with one password does not wait 1, 2, 4, 8 s.  In flight attempts
  do not count for the IP (twenty people of an office logging in at 9 a.m. are not a
  spray; a parallel sprayer meets the cap after its first failures anyway).

A success clears the user's record (not the IP's: one right password must not launder a
spraying IP).  Memory is bounded: at most ``max_keys`` entries, oldest dropped first.
The password is never kept: only its mark (a keyed 32-bit digest), in memory while the
attempt runs and on each failure.

With ``shared`` (gateway/loginfail.py) the failures counted are those of every process and
node and of SMTP, IMAP and the panel alike (their marks included); attempts in flight are
counted per process.  A caller runs ``prepare`` before ``delay`` (a database read only for a
key with failures known) and ``settle`` (or ``finish`` and its write) instead of ``end``: the
failure written, or the user's cleared.  The shared record unavailable, the failures this
guard saw itself still count.  A caller that passes no password (``secret`` None) has every
failure and every attempt in flight of the user count (its IP still counts user names).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.loginfail import SharedFailures, distinct, ip_key, marks, user_key


@dataclass
class _Record:
    failures: list[tuple[float, str | None]] = field(default_factory=list)  # (when, mark)
    in_flight: Counter = field(default_factory=Counter)  # password mark (None: unknown) -> attempts

    def others_in_flight(self, mark: str | None) -> int:
        """Attempts in flight with another password than ``mark`` (all of them for None)."""
        return sum(n for m, n in self.in_flight.items() if m is None or m != mark)

    def landed(self, mark: str | None) -> None:
        if self.in_flight[mark] > 1:
            self.in_flight[mark] -= 1
        else:
            self.in_flight.pop(mark, None)


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
        rec.failures = [f for f in rec.failures if f[0] > cutoff]
        return rec

    def _failures(self, key: str) -> int:
        """The failures of ``key``, counted by mark (a user's: per password; an IP's: per user name)."""
        counted = distinct(m for _, m in self._record(key).failures)
        shared = self.shared
        if shared is not None:
            seen = distinct(shared.marks(key, self.window))
            # The shared record is the truth (a success elsewhere cleared it); unreachable,
            # what this guard saw itself still counts.
            counted = seen if shared.available else max(counted, seen)
        return counted

    def score(self, ip: str, user: str, secret: bytes | None = None) -> int:
        """The failures this attempt pays for: the user name's (and its attempts in flight
        with other passwords), or the IP's failing user names beyond the first."""
        _, pw = marks(user, secret)
        ukey = user_key(user)
        by_user = self._failures(ukey) + self._record(ukey).others_in_flight(pw)
        by_ip = max(0, self._failures(ip_key(ip)) - 1)
        return max(by_user, by_ip)

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

    def delay(self, ip: str, user: str, secret: bytes | None = None) -> float:
        """Seconds to wait before checking this attempt (``secret``: its password)."""
        n = self.score(ip, user, secret)
        if n == 0:
            return 0.0
        return min(self.base_delay * (2 ** (n - 1)), self.max_delay)

    def begin(self, ip: str, user: str, secret: bytes | None = None) -> None:
        self._record(user_key(user)).in_flight[marks(user, secret)[1]] += 1

    def end(self, ip: str, user: str, success: bool, secret: bytes | None = None) -> None:
        now = self.clock()
        who, pw = marks(user, secret)
        rec = self._record(user_key(user))
        rec.landed(pw)
        if success:
            self._records.pop(user_key(user), None)
            return
        rec.failures.append((now, pw))
        self._record(ip_key(ip)).failures.append((now, who))

    def finish(self, ip: str, user: str, success: bool,
               secret: bytes | None = None) -> Callable[[], bool] | None:
        """``end``, and a failure noted in the shared record (known in this process at once);
        returns the blocking write still to run (``shared.run``) — the failure's rows, or a
        success clearing the user's failures where any are known — or None."""
        shared = self.shared
        key = user_key(user)
        had = shared is not None and success and (shared.knows([key]) or self._has_failures(key))
        self.end(ip, user, success, secret)
        if shared is None:
            return None
        if not success:
            who, pw = marks(user, secret)
            rows = shared.note([(ip_key(ip), who), (key, pw)])
            return lambda: shared.store(rows)
        if had:
            return lambda: shared.clear(key)
        return None

    async def settle(self, ip: str, user: str, success: bool, secret: bytes | None = None) -> None:
        """``finish``, and its write done (bounded by ``loginfail.DB_TIMEOUT``)."""
        job = self.finish(ip, user, success, secret)
        if job is not None and self.shared is not None:
            await self.shared.run(job)

    def abandon(self, ip: str, user: str, secret: bytes | None = None) -> None:
        """An attempt that was never decided (the upstream unavailable, the client gone): no
        longer in flight, and no failure either."""
        self._record(user_key(user)).landed(marks(user, secret)[1])
