"""Failed logins shared by every process and node of a deployment (table ``loginfailure``).

SMTP AUTH, the IMAP proxy's LOGIN/AUTHENTICATE (gateway/smtp/guard.py ``LoginGuard``) and
the panel's sign-in (panel/auth.py ``LoginLimiter``, user names only) write each failure as
a row per key (``ip:…``, ``user:…``); so a guesser gains nothing by spreading attempts over
acceptor processes, nodes or protocols.  Each process keeps what it knows in memory
(``SharedFailures``, one per process: ``for_process``):

- the fast path: a login whose IP and user name this process knows no failure for costs no
  database round trip.  What other processes wrote reaches it through a feed polled in the
  background (``poll``, every ``FEED_INTERVAL`` seconds: one indexed query by row id);
- the slow path: for a key it knows failures for, the caller reads the key's rows first
  (``fresh``: one indexed query, only where a penalty applies anyway), so a count is exact
  and a success elsewhere (which deletes the user's rows) is seen;
- a failure is noted in memory at once (the node's SMTP and IMAP see each other's without the
  database) and then written (``store``); a success deletes the user's rows (``clear``).

Repeated passwords: a row may carry a mark (``marks``): a user's row a keyed digest of the
user name and the password tried, an IP's row one of the user name.  The guard counts a
user's failures with one password once and an IP's failing user names, not its failures
(gateway/smtp/guard.py says why).  A mark is 32 bits of an HMAC whose key is derived from the
approval links' key (``[approval] key_file``, which every node shares already: a link made on
one node is opened on any): without that key a row tells nothing about a password, and 32
bits confirm a guess only weakly even with it; rows live for the window only.  A node with
another key file counts the same password twice, the behaviour without marks.

Bounded: rows older than ``window`` are deleted and at most ``MAX_ROWS`` kept, newest first
(``sweep``, every ``SWEEP_INTERVAL`` seconds and after every ``SWEEP_EVERY_WRITES`` writes of
this process); in memory at most ``max_keys`` keys of at most ``PER_KEY`` failures each.

The database away (a statement fails or ``DB_TIMEOUT`` passes): ``available`` turns false and
the callers count with what the process knows by itself, the per-process counter, until a
statement succeeds again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("mailgate.loginfail")

FEED_INTERVAL = 1.0
FEED_PAGE = 1000
FEED_LOOKBACK = 64  # row ids re-read behind the cursor: PostgreSQL commits may land out of id order
SWEEP_INTERVAL = 60.0
SWEEP_EVERY_WRITES = 1000
MAX_ROWS = 100_000
PER_KEY = 100
KEY_MAX = 400
DB_TIMEOUT = 2.0


def user_key(user: str) -> str:
    return ("user:" + user.lower())[:KEY_MAX]


def panel_key(user: str) -> str:
    """The panel's own count of a user's failed sign-ins (its lockout), beside ``user_key``:
    a sign-in failure counts for the user's mail logins too, a mail login's failure does not
    lock the user out of the panel — else anybody who can reach the SMTP port (a phone with
    an old saved password, or a stranger failing on purpose) could keep a manager locked out."""
    return ("panel:" + user.lower())[:KEY_MAX]


def ip_key(ip: str) -> str:
    return ("ip:" + ip)[:KEY_MAX]


_MARK_KEY = os.urandom(32)  # this process's until ``set_mark_key`` (for_process: the deployment's)


def set_mark_key(secret: bytes) -> None:
    """Derive the marks' key from a secret every node shares."""
    global _MARK_KEY
    _MARK_KEY = hmac.new(secret, b"mailgate failed-login marks", hashlib.sha256).digest()


def marks(user: str, password: bytes | None) -> tuple[str, str | None]:
    """The marks of an attempt: the user name's, and the user name and password's (None
    without a password): 32 bits of a keyed digest each, hex (see the module's note)."""
    name = user.lower().encode("utf-8", "replace")
    who = hmac.new(_MARK_KEY, b"u\0" + name, hashlib.sha256).hexdigest()[:8]
    if password is None:
        return who, None
    return who, hmac.new(_MARK_KEY, b"p\0" + name + b"\0" + password, hashlib.sha256).hexdigest()[:8]


def distinct(found: Iterable[str | None]) -> int:
    """Failures counted by mark: one per mark, one per failure without one."""
    seen: set[str] = set()
    n = 0
    for mark in found:
        if mark is None:
            n += 1
        elif mark not in seen:
            seen.add(mark)
            n += 1
    return n


class SharedFailures:
    """One process's view of the shared failed-login record (see the module's note).
    Thread-safe; the blocking methods (``store``, ``clear``, ``fresh``, ``poll``, ``sweep``)
    are for worker threads and never raise."""

    def __init__(self, window: float = 900.0, max_keys: int = 100_000,
                 wall: Callable[[], float] = time.time):
        self.window = window
        self.max_keys = max_keys
        self.wall = wall
        self.available = True
        self.token = os.urandom(6).hex()
        self._n = 0
        self._lock = threading.Lock()
        self._known: OrderedDict[str, list[tuple[float, str, str | None]]] = OrderedDict()  # key -> [(at, tag, mark)]
        self._unstored: set[str] = set()  # tags noted here whose row is not (yet) written
        self._cursor: int | None = None
        self._writes = 0
        self._last_sweep = float("-inf")

    # -- in memory ------------------------------------------------------------------------
    def knows(self, keys: Iterable[str]) -> bool:
        with self._lock:
            return any(k in self._known for k in keys)

    def ages(self, key: str, window: float) -> list[float]:
        """How long ago each failure of ``key`` within ``window`` was, oldest first."""
        now = self.wall()
        with self._lock:
            entries = self._known.get(key)
            if not entries:
                return []
            return [now - at for at, _, _ in entries if now - at < window]

    def marks(self, key: str, window: float) -> list[str | None]:
        """The marks of the failures of ``key`` within ``window`` (None: a failure without one)."""
        now = self.wall()
        with self._lock:
            return [mark for at, _, mark in self._known.get(key, ()) if now - at < window]

    def note(self, keys: Iterable[str | tuple[str, str | None]]) -> list[tuple[str, float, str, str | None]]:
        """A failure here and now (keys, or (key, mark) pairs): known at once; the rows to ``store``."""
        at = self.wall()
        rows = []
        with self._lock:
            for item in keys:
                key, mark = (item, None) if isinstance(item, str) else item
                self._n += 1
                tag = f"{self.token}:{self._n}"
                self._add(key, at, tag, mark)
                self._unstored.add(tag)
                rows.append((key, at, tag, mark))
        return rows

    def _add(self, key: str, at: float, tag: str, mark: str | None = None) -> None:
        entries = self._known.get(key)
        if entries is None:
            entries = self._known[key] = []
            while len(self._known) > self.max_keys:
                self._known.popitem(last=False)
        else:
            self._known.move_to_end(key)
        if any(t == tag for _, t, _ in entries):
            return
        entries.append((at, tag, mark))
        entries.sort()
        cutoff = self.wall() - self.window
        entries[:] = [e for e in entries if e[0] > cutoff][-PER_KEY:]

    def forget(self, key: str) -> None:
        with self._lock:
            self._known.pop(key, None)

    # -- the database (worker threads) ------------------------------------------------------
    def _ok(self) -> None:
        if not self.available:
            log.warning("shared failed-login record reachable again")
        self.available = True

    def _failed(self, what: str) -> None:
        from gateway.db import drop_connection

        if self.available:
            log.warning("shared failed-login record unavailable (%s); counting in this process only", what,
                        exc_info=True)
        self.available = False
        drop_connection()

    def mark_unavailable(self, what: str) -> None:
        if self.available:
            log.warning("shared failed-login record unavailable (%s); counting in this process only", what)
        self.available = False

    def store(self, rows: list[tuple[str, float, str, str | None]]) -> bool:
        from gateway.db.models import LoginFailure, database

        if not rows:
            return True
        try:
            with database.atomic():
                LoginFailure.insert_many(rows, fields=[LoginFailure.key, LoginFailure.at, LoginFailure.tag,
                                                        LoginFailure.mark]).execute()
        except Exception:  # noqa: BLE001 - the database away: counted in this process meanwhile
            self._failed("storing a failure")
            return False
        self._ok()
        with self._lock:
            self._unstored.difference_update(row[2] for row in rows)
            self._writes += 1
            due = self._writes >= SWEEP_EVERY_WRITES
        if due:
            self.sweep()
        return True

    def clear(self, key: str) -> bool:
        """A success: the user's failures are gone, here and in the database."""
        from gateway.db.models import LoginFailure

        self.forget(key)
        try:
            LoginFailure.delete().where(LoginFailure.key == key).execute()
        except Exception:  # noqa: BLE001
            self._failed("clearing a user's failures")
            return False
        self._ok()
        return True

    def fresh(self, keys: list[str]) -> bool:
        """Read these keys' failures from the database (they replace what is known here,
        except this process's own not yet written)."""
        from gateway.db.models import LoginFailure

        cutoff = self.wall() - self.window
        try:
            rows = list(LoginFailure.select(LoginFailure.key, LoginFailure.at, LoginFailure.tag, LoginFailure.mark)
                        .where(LoginFailure.key.in_(keys), LoginFailure.at > cutoff).tuples())
        except Exception:  # noqa: BLE001
            self._failed("reading failures")
            return False
        self._ok()
        with self._lock:
            for key in keys:
                pending = [e for e in self._known.get(key, ()) if e[1] in self._unstored]
                self._known.pop(key, None)
                for at, tag, mark in pending:
                    self._add(key, at, tag, mark)
            for key, at, tag, mark in rows:
                self._add(key, at, tag, mark)
        return True

    def poll(self) -> int:
        """The feed: rows other processes wrote since the last poll; how many were new."""
        from gateway.db.models import LoginFailure

        learnt = 0
        try:
            if self._cursor is None:  # first poll: what the window still holds
                cutoff = self.wall() - self.window
                query = LoginFailure.select(LoginFailure.id, LoginFailure.key, LoginFailure.at, LoginFailure.tag,
                                            LoginFailure.mark) \
                    .where(LoginFailure.at > cutoff).order_by(LoginFailure.id.desc()).limit(FEED_PAGE * 10)
                rows = list(query.tuples())[::-1]
                self._cursor = max((r[0] for r in rows), default=0)
                if not rows:
                    self._cursor = LoginFailure.select(LoginFailure.id).order_by(
                        LoginFailure.id.desc()).limit(1).scalar() or 0
                learnt += self._learn(rows)
            for _ in range(10):
                rows = list(LoginFailure.select(LoginFailure.id, LoginFailure.key, LoginFailure.at, LoginFailure.tag,
                                            LoginFailure.mark)
                            .where(LoginFailure.id > self._cursor - FEED_LOOKBACK)
                            .order_by(LoginFailure.id).limit(FEED_PAGE).tuples())
                new = [r for r in rows if r[0] > self._cursor]
                learnt += self._learn(rows)
                if new:
                    self._cursor = new[-1][0]
                if len(rows) < FEED_PAGE:
                    break
        except Exception:  # noqa: BLE001
            self._failed("polling failures")
            return learnt
        self._ok()
        if learnt:
            log.debug("learnt %d failed logins from the shared record", learnt)
        if self.wall() - self._last_sweep >= SWEEP_INTERVAL:
            self.sweep()
        return learnt

    def _learn(self, rows: list[Any]) -> int:
        cutoff = self.wall() - self.window
        mine = self.token + ":"
        learnt = 0
        with self._lock:
            for _, key, at, tag, mark in rows:
                if tag.startswith(mine) or at <= cutoff:
                    continue
                entries = self._known.get(key)
                if entries is not None and any(t == tag for _, t, _ in entries):
                    continue
                self._add(key, at, tag, mark)
                learnt += 1
        return learnt

    def sweep(self) -> int:
        """Delete rows older than the window, then all but the newest ``MAX_ROWS``."""
        from gateway.db.models import LoginFailure

        self._last_sweep = self.wall()
        with self._lock:
            self._writes = 0
        try:
            gone = LoginFailure.delete().where(LoginFailure.at <= self.wall() - self.window).execute()
            edge = LoginFailure.select(LoginFailure.id).order_by(LoginFailure.id.desc()) \
                .offset(MAX_ROWS).limit(1).scalar()
            if edge is not None:
                gone += LoginFailure.delete().where(LoginFailure.id <= edge).execute()
        except Exception:  # noqa: BLE001
            self._failed("sweeping old failures")
            return 0
        self._ok()
        return gone

    # -- for asyncio callers ------------------------------------------------------------------
    async def run(self, fn: Callable[..., bool], *args: Any) -> bool:
        """``fn(*args)`` in a thread, bounded by ``DB_TIMEOUT`` (past it: unavailable; the
        thread finishes on its own)."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), DB_TIMEOUT)
        except TimeoutError:
            self.mark_unavailable(f"no answer in {DB_TIMEOUT:g} s")
            return False


_PROCESS: SharedFailures | None = None


def for_process(cfg: Any) -> SharedFailures:
    """This process's ``SharedFailures`` (made at the first call; its window the longest of
    the configured ones)."""
    global _PROCESS
    if _PROCESS is None:
        _load_mark_key(cfg)
        windows = [cfg.smtp.auth_fail_window, cfg.imap.auth_fail_window]
        panel = getattr(cfg, "panel", None)
        if panel is not None:
            windows.append(panel.login_window)
        _PROCESS = SharedFailures(window=float(max(windows)))
    return _PROCESS


async def feed(shared: SharedFailures, stopping: asyncio.Event, every: float = FEED_INTERVAL) -> None:
    """Poll the shared record every ``every`` seconds until ``stopping``."""
    from gateway.periodic import periodically

    await periodically(stopping, shared.poll, every, first=0, failure="polling failed logins failed")


def _load_mark_key(cfg: Any) -> None:
    """The marks' key from the approval links' key (made if there is none yet); unreadable,
    this process's own (repeated passwords then count once per process only)."""
    from pathlib import Path

    from gateway.approval import load_or_create_token_key

    try:
        path = Path(cfg.approval.key_file)
        if not path.is_absolute() and getattr(cfg, "path", None) is not None:
            path = Path(cfg.path).parent / path
        set_mark_key(load_or_create_token_key(path))
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("failed-login marks: approval key unavailable (%s); repeated passwords count "
                    "once per process only", type(exc).__name__)
