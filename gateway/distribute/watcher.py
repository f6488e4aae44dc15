"""Watching one shared mailbox: IDLE (or polling), fetch new UIDs, distribute, checkpoint.

One blocking thread per shared mailbox.  A session: log in, SELECT the folder, compare
UIDVALIDITY with the checkpoint, finish APPEND copies a crash left pending, then loop:
drain every UID above the checkpoint (in batches), wait (IDLE, or NOOP every
``poll_interval`` where IDLE is missing; under IDLE a safety re-scan every
``poll_interval`` too), repeat.  Any error — disconnect, BYE, throttling, a refused
login — ends the session; the next one starts after a backoff that doubles up to
``reconnect_max`` (with jitter), and resets after a session that got going.

Per message (see gateway.distribute.engine): record (one transaction, idempotent) →
APPEND copies → mark the shared copy (keyword, or move to Junk) → checkpoint.
A restart or reconnect repeats at most the marking of messages already recorded.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.db.models import utcnow
from gateway.distribute.engine import Distributor, Outcome
from gateway.distribute.schema import PENDING, REJECTED, UNDISTRIBUTED, DistCheckpoint, DistDelivery, Distribution
from gateway.distribute.settings import DistributionConfig

log = logging.getLogger("mailgate.distribute")

FETCH_BYTES = 32 * 1024 * 1024  # body bytes fetched per FETCH command


class SessionEnded(Exception):
    """The server closed the session (BYE) or the connection broke."""


class MailboxWatcher:
    def __init__(self, distributor: Distributor, connect: Callable[[str], Any], mailbox: str,
                 stop: threading.Event, on_round: Callable[[], None] | None = None):
        self.distributor = distributor
        self.dcfg: DistributionConfig = distributor.dcfg
        self.connect = connect
        self.mailbox = mailbox
        self.folder = self.dcfg.folder
        self.stop = stop
        self.on_round = on_round  # called before each drain (e.g. reload rules)
        self.last_error = ""
        self.sessions = 0
        self.idle = False
        self.client: Any = None  # the current session's connection (for status and tests)

    # -- the outer loop ---------------------------------------------------------
    def run(self) -> None:
        delay = self.dcfg.reconnect_initial
        while not self.stop.is_set():
            client = None
            started = time.monotonic()
            try:
                client = self.client = self.connect(self.mailbox)
                self.sessions += 1
                self.session(client)
            except Exception as exc:  # any failure: reconnect after a backoff
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.stop.is_set():
                    break
                if time.monotonic() - started > 60:
                    delay = self.dcfg.reconnect_initial  # the session got going: start over
                wait = delay * random.uniform(0.8, 1.2)
                log.warning("distribution %s: %s; reconnecting in %.1f s", self.mailbox, self.last_error, wait)
                self.stop.wait(wait)
                delay = min(delay * 2, self.dcfg.reconnect_max)
            finally:
                if client is not None:
                    _close(client)
        log.info("distribution %s: stopped", self.mailbox)

    # -- one session ---------------------------------------------------------------
    def session(self, client: Any) -> None:
        info = client.select_folder(self.folder)
        uidvalidity = int(info[b"UIDVALIDITY"])
        uidnext = int(info.get(b"UIDNEXT", 1) or 1)
        checkpoint = self._checkpoint(uidvalidity, uidnext)
        self.idle = b"IDLE" in client.capabilities()
        self._finish_pending(client, uidvalidity)
        log.info("distribution %s: watching %s (%s), UIDVALIDITY %s, from UID %s", self.mailbox, self.folder,
                 "IDLE" if self.idle else f"polling every {self.dcfg.poll_interval:g} s", uidvalidity,
                 checkpoint.last_uid + 1)
        while not self.stop.is_set():
            if self.on_round is not None:
                self.on_round()
            self.drain(client, checkpoint)
            if self.stop.is_set():
                break
            if self.idle:
                self._wait_idle(client)
            else:
                self.stop.wait(self.dcfg.poll_interval)
                client.noop()

    def _checkpoint(self, uidvalidity: int, uidnext: int) -> DistCheckpoint:
        row = DistCheckpoint.get_or_none((DistCheckpoint.mailbox == self.mailbox)
                                         & (DistCheckpoint.folder == self.folder))
        start = 0 if self.dcfg.initial == "all" else max(uidnext - 1, 0)
        if row is None:
            return DistCheckpoint.create(mailbox=self.mailbox, folder=self.folder, uidvalidity=uidvalidity,
                                         last_uid=start)
        if row.uidvalidity != uidvalidity:
            # The folder was recreated: old UIDs mean nothing.  Messages carrying the keyword are
            # skipped (already handled); everything else in the folder is looked at again.
            log.warning("distribution %s: UIDVALIDITY changed %s -> %s; rescanning %s (marked mail is skipped)",
                        self.mailbox, row.uidvalidity, uidvalidity, self.folder)
            row.uidvalidity, row.last_uid, row.updated_at = uidvalidity, 0, utcnow()
            row.save()
        return row

    def _finish_pending(self, client: Any, uidvalidity: int) -> None:
        """APPEND copies recorded before a crash but not known to be appended."""
        records = (Distribution.select().join(DistDelivery)
                   .where((Distribution.mailbox == self.mailbox) & (Distribution.folder == self.folder)
                          & (Distribution.uidvalidity == uidvalidity) & (DistDelivery.state == PENDING))
                   .distinct())
        for rec in records:
            data = client.fetch([rec.uid], ["BODY.PEEK[]"]).get(rec.uid, {}).get(b"BODY[]")
            if data is None:
                log.error("distribution %s: UID %s vanished before its APPEND copy was made", self.mailbox, rec.uid)
                continue
            outcome = Outcome(rec, new=False, pending=self.distributor._pending(rec))
            self.distributor.finish(outcome, data)

    def _wait_idle(self, client: Any) -> None:
        client.idle()
        # EXISTS that came with the last FETCH/STORE, or before IDLE's continuation, sits in
        # imaplib's stash (idle_check never sees it): a message arrived after the drain's SEARCH.
        if _pop_arrivals(client):
            client.idle_done()
            return
        now = time.monotonic()
        rescan_at = now + self.dcfg.poll_interval
        renew_at = now + self.dcfg.idle_renew
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= rescan_at or now >= renew_at:
                    return
                # Lines already read off the socket (Dovecot sends "+ idling" and an EXISTS in
                # one segment) sit in imaplib's buffer, where idle_check's poll() cannot see them.
                responses = _buffered_responses(client) or client.idle_check(timeout=min(1.0, rescan_at - now))
                for resp in responses:
                    if resp and resp[0] == b"BYE":
                        raise SessionEnded("server said BYE")
                if any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses):
                    return
        finally:
            client.idle_done()

    # -- the work ----------------------------------------------------------------------
    def drain(self, client: Any, checkpoint: DistCheckpoint) -> int:
        """Handle every message above the checkpoint; return how many were looked at."""
        done = 0
        while not self.stop.is_set():
            _pop_arrivals(client)  # this SEARCH sees whatever they announced
            uids = sorted(u for u in client.search(["UID", f"{checkpoint.last_uid + 1}:*"])
                          if u > checkpoint.last_uid)
            if not uids:
                return done
            self._batch(client, checkpoint, uids[: self.dcfg.batch_size])
            done += min(len(uids), self.dcfg.batch_size)
        return done

    def _batch(self, client: Any, checkpoint: DistCheckpoint, uids: list[int]) -> None:
        meta = client.fetch(uids, ["FLAGS", "RFC822.SIZE"])
        flag: list[int] = []
        flag_undistributed: list[int] = []
        junk: list[int] = []
        for chunk in _chunks([u for u in uids if u in meta], meta, FETCH_BYTES, self.dcfg.max_message_size):
            small = [u for u in chunk if meta[u].get(b"RFC822.SIZE", 0) <= self.dcfg.max_message_size]
            bodies = client.fetch(small, ["BODY.PEEK[]"]) if small else {}
            big = [u for u in chunk if u not in small]
            heads = client.fetch(big, ["BODY.PEEK[HEADER]"]) if big else {}
            for uid in chunk:
                if uid in bodies:
                    raw = bodies[uid].get(b"BODY[]") or b""
                    size = None
                else:
                    raw = heads.get(uid, {}).get(b"BODY[HEADER]") or b""
                    size = meta[uid].get(b"RFC822.SIZE", 0)
                outcome = self.distributor.record(self.mailbox, self.folder, checkpoint.uidvalidity, uid, raw,
                                                  meta[uid].get(b"FLAGS", ()), size=size)
                if outcome.record is None:
                    log.info("distribution %s: UID %s already carries %s; skipped", self.mailbox, uid,
                             self.dcfg.keyword)
                    continue
                if outcome.pending:
                    self.distributor.finish(outcome, raw)
                rec = outcome.record
                if outcome.new:
                    log.info("distribution %s: UID %s %s (%s) %s", self.mailbox, uid, rec.state, rec.step, rec.reason)
                if rec.state == REJECTED:
                    junk.append(uid)
                elif rec.state == UNDISTRIBUTED:
                    flag_undistributed.append(uid)
                else:
                    flag.append(uid)
        if flag:
            client.add_flags(flag, [self.dcfg.keyword], silent=True)
        if flag_undistributed:
            client.add_flags(flag_undistributed, [self.dcfg.keyword, self.dcfg.undistributed_keyword], silent=True)
        if junk:
            client.add_flags(junk, [self.dcfg.keyword], silent=True)
            _move(client, junk, self.dcfg.junk_folder)
        checkpoint.last_uid = max(uids)
        checkpoint.updated_at = utcnow()
        DistCheckpoint.update(last_uid=checkpoint.last_uid, updated_at=checkpoint.updated_at).where(
            DistCheckpoint.id == checkpoint.id).execute()


def _chunks(uids: list[int], meta: dict, budget: int, max_size: int) -> list[list[int]]:
    """Split uids so one FETCH brings at most ``budget`` body bytes (oversized ones cost nothing)."""
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for uid in uids:
        size = meta[uid].get(b"RFC822.SIZE", 0)
        cost = size if size <= max_size else 0
        if current and used + cost > budget:
            out.append(current)
            current, used = [], 0
        current.append(uid)
        used += cost
    if current:
        out.append(current)
    return out


def _pop_arrivals(client: Any) -> bool:
    """Take EXISTS/RECENT out of imaplib's untagged-response stash; True if there were any."""
    stash = getattr(getattr(client, "_imap", None), "untagged_responses", None)
    if not isinstance(stash, dict):
        return False
    found = False
    for name in ("EXISTS", "RECENT"):
        if stash.pop(name, None):
            found = True
    return found


def _buffered_responses(client: Any) -> list[tuple]:
    """Complete untagged lines already sitting in imaplib's read buffer (or the TLS layer's).

    ``idle_check`` first poll()s the socket, so a line that arrived together with an earlier one
    and was buffered by the reader is only seen after the next packet.  Here the socket is made
    non-blocking and only whole lines are taken, so this never waits and never splits a line.
    """
    imap = getattr(client, "_imap", None)
    reader = getattr(imap, "file", None)
    if reader is None or not hasattr(reader, "peek"):
        return []
    sock = client.socket()
    out: list[tuple] = []
    sock.setblocking(False)
    try:
        while True:
            try:
                pending = reader.peek(1)  # the buffer as it is, or one non-blocking read into it
            except OSError:  # nothing to read (BlockingIOError, SSLWantReadError)
                break
            if b"\n" not in pending:
                break
            words = imap._get_line().split(b" ", 3)  # b"*", b"4", b"EXISTS" / b"*", b"BYE", ...
            if len(words) >= 2 and words[0] == b"*":
                if words[1].isdigit() and len(words) >= 3:
                    out.append((int(words[1]), words[2].rstrip()))
                else:
                    out.append((words[1].rstrip(),))
    finally:
        sock.setblocking(True)
        client._set_read_timeout()
    return out


def _move(client: Any, uids: list[int], folder: str) -> None:
    if b"MOVE" in client.capabilities():
        client.move(uids, folder)
        return
    client.copy(uids, folder)
    client.delete_messages(uids, silent=True)
    if b"UIDPLUS" in client.capabilities():
        client.uid_expunge(uids)
    else:
        client.expunge()


def _close(client: Any) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass
