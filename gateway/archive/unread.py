"""Records the background indexer could not index (migrations 164, 165).

A record whose blob the indexer cannot read (``index._start_extraction``), or whose document
it cannot write (``index._insert_documents``: the write's savepoint rolled back, reason
"index write failed: <type>: <error>"), has no document, so no search finds it; its row here
keeps it from being forgotten once the watermark (``archivesearchstate`` "records") has
moved past it (in the same transaction).  The indexer tries it again later
(``index.RETRY_DELAYS``), indexes it once its blob reads and its document is written (or
finds a document another writer wrote) and then deletes the row; so does a purge
(``index.remove_records``).  ``index.backlog()`` counts these rows, so the auditor's search
page says mail is missing from its results.

A document the database refuses for what it holds (``index.data_error``: a value it cannot
store — SQLSTATE class 22, 23 or 54, SQLite's constraint and too-big errors, a value the
driver cannot bind) fails the same way every time: after ``index.GIVE_UP_AFTER`` such
failures (the first write and the retries after 1, 5 and 30 minutes) the row's ``state``
becomes ``failed`` and the indexer stops trying (migration 165).  A passing failure (the
database busy, locked or unreachable, a serialization failure, a disk error) never counts
towards it.  The record itself is intact; ``mailgate archive verify`` warns about such
rows, the metrics count them (``mailgate_archive_index_failed_records``) and ``mailgate
archive reindex --failed`` tries them again (``index.retry_failed``).
"""

from __future__ import annotations

from peewee import BigIntegerField, BooleanField, CharField, Database, DateTimeField, IntegerField

from gateway.db.migrations import migration
from gateway.db.models import BaseModel

REASON_MAX = 300
RETRY = "retry"  # ``state``: tried again at ``retry_at``
FAILED = "failed"  # ``state``: given up (the same data error ``index.GIVE_UP_AFTER`` times); only by hand


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
