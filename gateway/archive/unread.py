"""Records the background indexer could not index (migrations 164, 165).

A record whose blob the indexer cannot read (``indexer._start_extraction``), or whose document
it cannot write (``documents.insert_documents``: the write's savepoint rolled back, reason
"index write failed: <type>: <error>"), has no document, so no search finds it; its row here
keeps it from being forgotten once the watermark (``archivesearchstate`` "records") has
moved past it (in the same transaction).  The indexer tries it again later
(``RETRY_DELAYS``), indexes it once its blob reads and its document is written (or
finds a document another writer wrote) and then deletes the row; so does a purge
(``doctables.remove_records``).  ``indexer.backlog()`` counts these rows, so the auditor's search
page says mail is missing from its results.

A document the database refuses for what it holds (``data_error``: a value it cannot
store — SQLSTATE class 22, 23 or 54, SQLite's constraint and too-big errors, a value the
driver cannot bind) fails the same way every time: after ``GIVE_UP_AFTER`` such
failures (the first write and the retries after 1, 5 and 30 minutes) the row's ``state``
becomes ``failed`` and the indexer stops trying (migration 165).  A passing failure (the
database busy, locked or unreachable, a serialization failure, a disk error) never counts
towards it.  The record itself is intact; ``mailgate archive verify`` warns about such
rows, the metrics count them (``mailgate_archive_index_failed_records``) and ``mailgate
archive reindex --failed`` tries them again (``reindex.retry_failed``).

Here: the table, the retry schedule (``RETRY_DELAYS``, ``GIVE_UP_AFTER``), how a failure is
told (``Failure``, ``data_error``), the listing (``note_unread``, ``due_for_retry``) and the
counts (``given_up``, ``unread_counts``).
"""

from __future__ import annotations

import datetime as dt
import logging
import weakref
from typing import NamedTuple

from peewee import BigIntegerField, BooleanField, CharField, Database, DateTimeField, IntegerField, fn

from gateway.db.migrations import migration
from gateway.db.models import BaseModel, utcnow

log = logging.getLogger("mailgate.archive.index")  # the search index's log, as before the split

REASON_MAX = 300
RETRY = "retry"  # ``state``: tried again at ``retry_at``
FAILED = "failed"  # ``state``: given up (the same data error ``GIVE_UP_AFTER`` times); only by hand

# A record whose blob could not be read or whose document could not be written
# (listed here) is tried again after these delays (seconds; the last one
# repeats): after 1 min, 5 min, 30 min, then hourly.  A blob missing or altered (BlobError,
# FileNotFoundError: permanent, ``mailgate archive verify`` names it) only hourly — one file
# open an hour is cheap, and a blob restored from a backup is then indexed.
RETRY_DELAYS = (60, 300, 1800, 3600)
RETRY_LOOK = 60  # seconds: the list is looked at no more often (but when its earliest time has come)
# A document the database refused for its data (``data_error``) this many times — the first
# write and the retries after 1, 5 and 30 minutes — is given up (``state`` "failed", see
# ``UnreadRecord``): the same bytes fail the same way, and an hourly retry for ever
# only fills the log.  ``mailgate archive reindex --failed`` tries it again (``reindex.retry_failed``).
GIVE_UP_AFTER = 4
_EPOCH = dt.datetime(1970, 1, 1)  # "long ago": the list not looked at yet


class UnreadRecord(BaseModel):
    """A record the indexer skipped: why (the read's error, ``permanent`` for a blob missing or
    altered: ``BlobError`` / ``FileNotFoundError``; or "index write failed: …", never
    permanent), how many attempts failed (``data_errors`` of them because the database
    refused the document's data), when to try again, and whether the indexer still does
    (``state``: ``RETRY`` or ``FAILED``)."""

    record_id = BigIntegerField(primary_key=True)
    reason = CharField(max_length=REASON_MAX, default="")
    permanent = BooleanField(default=False)
    attempts = IntegerField(default=1)
    retry_at = DateTimeField(index=True)
    data_errors = IntegerField(default=0)
    state = CharField(max_length=10, default=RETRY)

    class Meta:
        table_name = "archivesearchunread"


@migration(164)
def search_unread_records(db: Database) -> None:
    """Records skipped by the background indexer because their blob could not be read (and,
    with no change to the table, since: because their document could not be written)."""
    db.create_tables([UnreadRecord], safe=True)


@migration(165)
def search_unread_given_up(db: Database) -> None:
    """A document the database refuses for its data is given up after a few attempts instead of
    being written again hourly for ever: ``data_errors`` counts those failures, ``state``
    (``retry`` / ``failed``) says whether the indexer still tries.  Existing rows: ``retry``,
    no data errors counted (their next failures count)."""
    from playhouse.migrate import SchemaMigrator, migrate

    columns = {c.name for c in db.get_columns("archivesearchunread")}
    migrator = SchemaMigrator.from_database(db)
    ops = []
    if "data_errors" not in columns:
        ops.append(migrator.add_column("archivesearchunread", "data_errors", UnreadRecord.data_errors))
    if "state" not in columns:
        ops.append(migrator.add_column("archivesearchunread", "state", UnreadRecord.state))
    migrate(*ops)


class Failure(NamedTuple):
    """Why a record was not indexed in a pass: ``reason`` (listed), ``permanent`` (its blob is
    missing or altered: read again hourly), ``data`` (the database refused its document for
    what it holds: counts towards ``GIVE_UP_AFTER``)."""

    reason: str
    permanent: bool = False
    data: bool = False


class Listed(NamedTuple):
    """A listed record due for another try: its failed attempts and data errors so far."""

    attempts: int
    data_errors: int


# SQLSTATE classes of a statement refused for the values it carries: 22 data exception (an
# invalid byte sequence, a NUL in text, a value out of range), 23 integrity constraint
# violation (a CHECK such as archivesearchtext_pairs_given), 54 program limit exceeded (an index
# row or an array too large).  Every other class — 08 connection, 40 serialization failure or
# deadlock, 53 insufficient resources, 55 lock not available, 57 shutdown, 58 I/O — passes.
_PG_DATA_CLASSES = ("22", "23", "54")
_SQLITE_DATA_CODES = ("SQLITE_TOOBIG", "SQLITE_MISMATCH", "SQLITE_RANGE")


def data_error(exc: BaseException) -> bool:
    """Whether a document write failed because of the document itself — the same write would
    fail the same way again — rather than for a passing reason (the database busy, locked,
    restarting or unreachable, a serialization failure, a full or failing disk: those, and
    anything not recognised, count as passing, so the document is written again later).
    Data: a PostgreSQL error of SQLSTATE class 22, 23 or 54; SQLite's integrity and data
    errors (a constraint, "string or blob too big"); a value the driver or the index writer could
    not turn into SQL (``ValueError`` — a ``UnicodeEncodeError`` among them — ``TypeError``,
    ``OverflowError``)."""
    import sqlite3

    import peewee

    from gateway.db.errors import is_postgres_error

    driver = getattr(exc, "orig", None)
    if not isinstance(driver, BaseException):
        driver = exc
    if is_postgres_error(driver):
        code = getattr(driver, "pgcode", None) or ""
        return code[:2] in _PG_DATA_CLASSES
    if isinstance(driver, sqlite3.IntegrityError | sqlite3.DataError):
        return True
    if isinstance(driver, sqlite3.Error):
        return getattr(driver, "sqlite_errorname", None) in _SQLITE_DATA_CODES
    if isinstance(exc, peewee.IntegrityError | peewee.DataError):
        return True
    return isinstance(driver, ValueError | TypeError | OverflowError)


def write_failure(exc: BaseException) -> str:
    """The reason listed (``archivesearchunread``) for a document that could not be written:
    "index write failed: <type>: <the error's first line>" (PostgreSQL's further lines — the
    COPY's CONTEXT quotes the row, mail text — are left to the log)."""
    lines = str(exc).strip().splitlines()
    return f"index write failed: {type(exc).__name__}" + (f": {lines[0]}" if lines else "")


_RETRY_AT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # archive -> when to look at the list again


def due_for_retry(archive: object, limit: int) -> dict[int, Listed]:
    """Up to ``limit`` listed records (blob unreadable, or document not written; not given up)
    whose time to be tried again has come, with their failed attempts and data errors so far.
    The table is only looked at
    when its earliest ``retry_at`` (kept per archive after each change, looked up once after a
    start) has passed, or ``RETRY_LOOK`` seconds after the last look (rows listed by another
    process)."""

    now = utcnow()
    try:
        at = _RETRY_AT.get(archive, _EPOCH)
    except TypeError:  # not weakly referable: look every pass
        at = _EPOCH
    if at > now:
        return {}
    u = UnreadRecord
    due = {r.record_id: Listed(r.attempts, r.data_errors)
           for r in u.select(u.record_id, u.attempts, u.data_errors).where(u.retry_at <= now, u.state == RETRY)
           .order_by(u.retry_at).limit(limit)}
    if not due:
        _remember_retry_at(archive)
    return due


def _remember_retry_at(archive: object) -> None:

    first = UnreadRecord.select(UnreadRecord.retry_at).where(UnreadRecord.state == RETRY) \
        .order_by(UnreadRecord.retry_at).first()
    at = utcnow() + dt.timedelta(seconds=RETRY_LOOK)
    try:
        _RETRY_AT[archive] = min(at, first.retry_at) if first is not None else at
    except TypeError:
        pass


def note_unread(archive: object, tried: dict[int, Listed], failed: dict[int, Failure], *,
                by_hand: bool = False) -> None:
    """In the pass's last write transaction (with the watermark): list the records whose blob
    could not be read or whose document could not be written (``failed``), with the next time
    to try them (``RETRY_DELAYS``), and forget those tried again that were indexed (by this
    pass or another writer), or are purged or gone.  A record whose document the database
    refused for its data ``GIVE_UP_AFTER`` times is given up (``state`` "failed"); ``by_hand``
    (``reindex.retry_failed``, an administrator's retry) gives up at the first data error again —
    one attempt, its outcome said at once — while a passing failure puts the record back on
    the schedule."""

    if not tried and not failed:
        return
    u = UnreadRecord
    if done := [rid for rid in tried if rid not in failed]:
        u.delete().where(u.record_id.in_(done)).execute()
    now = utcnow()
    for rid, (reason, permanent, data) in failed.items():
        before = tried.get(rid, Listed(0, 0))
        attempts, data_errors = before.attempts + 1, before.data_errors + int(data)
        delay = RETRY_DELAYS[-1] if permanent else RETRY_DELAYS[min(attempts, len(RETRY_DELAYS)) - 1]
        values = {u.reason: reason[:REASON_MAX], u.permanent: permanent, u.attempts: attempts,
                  u.data_errors: data_errors, u.retry_at: now + dt.timedelta(seconds=delay), u.state: RETRY}
        if data and (by_hand or data_errors >= GIVE_UP_AFTER):
            values[u.state] = FAILED
            log.error("archive record %s: its index document was refused %d times for its data (%s); given up:"
                      " the record is kept and readable, searches miss it (`mailgate archive reindex --failed`"
                      " tries again)", rid, data_errors, reason[:REASON_MAX])
        u.insert({u.record_id: rid, **values}).on_conflict(conflict_target=[u.record_id], update=values).execute()
    _remember_retry_at(archive)


def given_up(limit: int | None = None) -> tuple[int, list[tuple[int, str]]]:
    """Records whose index document the indexer gave up on (``state`` "failed", see
    gateway/archive/unread.py): how many, and up to ``limit`` (all: None) of them as
    (record id, reason), oldest first.  For ``mailgate archive verify``'s warning."""

    u = UnreadRecord
    rows = u.select(u.record_id, u.reason).where(u.state == FAILED).order_by(u.record_id)
    count = rows.count()
    listed = rows if limit is None else rows.limit(limit)
    return count, [(r.record_id, r.reason) for r in listed]


def unread_counts() -> dict[str, int]:
    """Listed records by ``state`` ("retry": the indexer tries them again, "failed": given up)."""

    counts = dict.fromkeys((RETRY, FAILED), 0)
    for state, n in UnreadRecord.select(UnreadRecord.state, fn.COUNT(UnreadRecord.record_id)) \
            .group_by(UnreadRecord.state).tuples():
        counts[state] = n
    return counts
