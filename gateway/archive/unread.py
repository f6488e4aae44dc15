"""Records the background indexer could not index (migration 164).

A record whose blob the indexer cannot read (``index._start_extraction``), or whose document
it cannot write (``index._insert_documents``: the write's savepoint rolled back, reason
"index write failed: <type>: <error>"), has no document, so no search finds it; its row here
keeps it from being forgotten once the watermark (``archivesearchstate`` "records") has
moved past it (in the same transaction).  The indexer tries it again later
(``index.RETRY_DELAYS``), indexes it once its blob reads and its document is written (or
finds a document another writer wrote) and then deletes the row; so does a purge
(``index.remove_records``).  ``index.backlog()`` counts these rows, so the auditor's search
page says mail is missing from its results.
"""

from __future__ import annotations

from peewee import BigIntegerField, BooleanField, CharField, Database, DateTimeField, IntegerField

from gateway.db.migrations import migration
from gateway.db.models import BaseModel

REASON_MAX = 300


class UnreadRecord(BaseModel):
    """A record the indexer skipped: why (the read's error, ``permanent`` for a blob missing or
    altered: ``BlobError`` / ``FileNotFoundError``; or "index write failed: …", never
    permanent), how many attempts failed, when to try again."""

    record_id = BigIntegerField(primary_key=True)
    reason = CharField(max_length=REASON_MAX, default="")
    permanent = BooleanField(default=False)
    attempts = IntegerField(default=1)
    retry_at = DateTimeField(index=True)

    class Meta:
        table_name = "archivesearchunread"


@migration(164)
def search_unread_records(db: Database) -> None:
    """Records skipped by the background indexer because their blob could not be read (and,
    with no change to the table, since: because their document could not be written)."""
    db.create_tables([UnreadRecord], safe=True)
