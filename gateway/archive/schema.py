"""Archive tables (migrations 100-149).

``ArchiveRecord`` (gateway/db/models.py, extended by migration 100) holds ONE row per
distinct message content (SHA-256 of the raw bytes); its descriptive fields (direction,
verdict, subject …) are those of the first sighting.  ``ArchiveSighting`` lists every
place and moment the message was seen:

    place                              how
    smtp:submitted                     an employee's submission (accepted / refused / held)
    relay:sent                         the bytes the upstream accepted from the relay
    imap:<account>/<mailbox>           a whole message served through the IMAP proxy
    sync:<account>/<mailbox>           the background inbound sync (master user / opt-in)
    import:eml | import:mbox | import:imap:<account>/<mailbox>   `mailgate archive import`

Records, sightings and ``ArchiveEvent`` rows (purge tombstones, holds, releases, key
rotations, checkpoints) share ONE hash chain: a global ``seq`` (1, 2, 3 … without gaps)
and ``hash = H(prev_hash, seq, kind, digest)`` where ``digest`` covers the row's fields
(see gateway/archive/chain.py).  ``ArchiveChainHead`` is the single row writers lock.
"""

from __future__ import annotations

from peewee import (
    BigIntegerField,
    BlobField,
    CharField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    TextField,
)

from gateway.db.migrations import migration
from gateway.db.models import ArchiveRecord, BaseModel, Employee, utcnow

__all__ = [
    "ArchiveRecord", "ArchiveSighting", "ArchiveEvent", "ArchiveChainHead", "ArchiveHold",
    "ArchiveSyncState", "ArchiveCredential", "ARCHIVE_MODELS",
]


class ArchiveSighting(BaseModel):
    """One time/place a message was seen.  Chained; never updated except blanked by a purge."""

    # Looked up by record through the (record, place, ref) index below; seen_at, direction and
    # queue_id are never searched on their own (migration 155 dropped their indexes).
    record = ForeignKeyField(ArchiveRecord, backref="sightings", on_delete="RESTRICT", index=False)
    seen_at = DateTimeField(default=utcnow)
    place = CharField(max_length=1000, index=True)  # see the module docstring
    direction = CharField(max_length=10)  # outbound | inbound
    verdict = CharField(max_length=20, default="")  # accepted | refused | held | sent | seen | imported
    reason = TextField(default="")
    trace = TextField(default="[]")  # JSON list of rule decision steps (outbound)
    queue_id = CharField(max_length=32, default="")
    # Filter by employee id; the chained copy is employee_email (an employee row may go away).
    employee = ForeignKeyField(Employee, null=True, backref="archive_sightings", on_delete="SET NULL", index=True)
    employee_email = CharField(max_length=320, default="", index=True)
    mail_from = CharField(max_length=320, default="")
    recipients = TextField(default="[]")  # JSON list
    # Idempotency key within a place ("<uidvalidity>:<uid>", a file path, …); "" = always new.
    ref = CharField(max_length=500, default="")
    seq = BigIntegerField(unique=True)
    digest = CharField(max_length=64)
    prev_hash = CharField(max_length=64)
    hash = CharField(max_length=64)

    class Meta:
        indexes = ((("record", "place", "ref"), False),)


class ArchiveEvent(BaseModel):
    """Chained events that are not messages: purge (tombstone), hold, release, rotate-key,
    checkpoint, gc (unreferenced blob files removed, gc.py)."""

    at = DateTimeField(default=utcnow, index=True)
    kind = CharField(max_length=20, index=True)
    actor = CharField(max_length=320, default="")
    target = CharField(max_length=500, default="")
    details = TextField(default="{}")  # JSON (purge: {"records": [seq, …]})
    seq = BigIntegerField(unique=True)
    digest = CharField(max_length=64)
    prev_hash = CharField(max_length=64)
    hash = CharField(max_length=64)


class ArchiveChainHead(BaseModel):
    """The chain's last seq and hash (one row, id 1).  Every writer UPDATEs it first: that row
    lock serializes chain writers on PostgreSQL and takes the write lock on SQLite."""

    seq = BigIntegerField(default=0)
    hash = CharField(max_length=64, default="0" * 64)


class ArchiveHold(BaseModel):
    """Legal hold (法律保全): suspends retention purges.  scope: record (target = record id)
    or employee (target = employee e-mail; every record with a sighting of that employee)."""

    scope = CharField(max_length=20, index=True)
    target = CharField(max_length=320, index=True)
    reason = TextField(default="")
    created_by = CharField(max_length=320, default="")
    created_at = DateTimeField(default=utcnow)
    released_at = DateTimeField(null=True, index=True)
    released_by = CharField(max_length=320, default="")


class ArchiveSyncState(BaseModel):
    """Inbound sync checkpoint per (account, mailbox): resume after ``last_uid``."""

    account = CharField(max_length=320)
    mailbox = CharField(max_length=1000)
    uidvalidity = BigIntegerField(default=0)
    last_uid = BigIntegerField(default=0)
    updated_at = DateTimeField(default=utcnow)
    last_error = TextField(default="")

    class Meta:
        indexes = ((("account", "mailbox"), True),)


class ArchiveCredential(BaseModel):
    """Opt-in: an employee's IMAP login captured at proxy login, sealed (AES-GCM, archive key)."""

    account = CharField(max_length=320, unique=True)
    key_id = IntegerField()
    sealed = BlobField()
    captured_at = DateTimeField(default=utcnow)


ARCHIVE_MODELS = [ArchiveSighting, ArchiveEvent, ArchiveChainHead, ArchiveHold, ArchiveSyncState, ArchiveCredential]

_NEW_RECORD_COLUMNS = ("key_id", "stored_size", "seq", "digest", "prev_hash", "hash", "purged_at")


@migration(100)
def archive_chain_and_sightings(db) -> None:
    """One record per content hash, sightings, the chain, holds, sync state, sealed credentials.

    Rows archived before this version (one row per event, plaintext blobs) are folded:
    the first row per SHA-256 stays the record, every row becomes a sighting, all chained."""
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    columns = {c.name for c in db.get_columns("archiverecord")}
    ops = [migrator.add_column("archiverecord", name, getattr(ArchiveRecord, name))
           for name in _NEW_RECORD_COLUMNS if name not in columns]
    if ops:
        migrate(*ops)
    db.create_tables(ARCHIVE_MODELS, safe=True)
    if not ArchiveChainHead.select().where(ArchiveChainHead.id == 1).exists():
        ArchiveChainHead.create(id=1, seq=0, hash="0" * 64)
    _fold_legacy_rows()
    indexes = {i.name for i in db.get_indexes("archiverecord")}
    if "archiverecord_sha256_unique" not in indexes:
        db.execute_sql("CREATE UNIQUE INDEX archiverecord_sha256_unique ON archiverecord (sha256)")
    if "archiverecord_seq" not in indexes:
        db.execute_sql("CREATE UNIQUE INDEX archiverecord_seq ON archiverecord (seq)")


def _fold_legacy_rows() -> None:
    from gateway.archive import chain

    legacy = list(ArchiveRecord.select().where(ArchiveRecord.seq.is_null()).order_by(ArchiveRecord.id))
    if not legacy:
        return
    first: dict[str, ArchiveRecord] = {}
    for row in legacy:
        keep = first.get(row.sha256)
        if keep is None:
            first[row.sha256] = keep = row
            row.key_id = 0
            row.stored_size = row.size
            chain.append_record(row)
        chain.append_sighting(ArchiveSighting(
            record=keep, seen_at=row.created_at, place="smtp:submitted", direction=row.direction,
            verdict=row.verdict, reason=row.reason, trace=row.trace, queue_id=row.queue_id,
            employee=row.employee_id, employee_email=_email(row.employee_id), mail_from=row.mail_from,
            recipients=row.recipients))
        if keep is not row:
            ArchiveRecord.delete().where(ArchiveRecord.id == row.id).execute()


def _email(employee_id: int | None) -> str:
    if employee_id is None:
        return ""
    e = Employee.get_or_none(Employee.id == employee_id)
    return e.email if e else ""


@migration(154)
def archive_submitted_original(db) -> None:
    """Outbound mail the gateway changed keeps the client's bytes as submitted (sealed header
    section or whole message, see gateway/archive/original.py) beside the relayed blob."""
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    columns = {c.name for c in db.get_columns("archiverecord")}
    if "original_sha256" not in columns:
        # Not migrator.add_column: for a NOT NULL column it rebuilds the table on SQLite (copy,
        # drop, rename), which the sightings' foreign key refuses ("FOREIGN KEY constraint
        # failed") and which would copy every record of a large archive.  ADD COLUMN with a
        # constant default is a change of the schema only, on SQLite and PostgreSQL alike.
        db.execute_sql("ALTER TABLE archiverecord ADD COLUMN original_sha256 VARCHAR(64) NOT NULL DEFAULT ''")
    if "original" not in columns:
        migrate(migrator.add_column("archiverecord", "original", ArchiveRecord.original))  # nullable: ADD COLUMN


@migration(155)
def archive_fewer_indexes(db) -> None:
    """Indexes nothing searches by, each one more B-tree to update for every record and
    sighting the SMTP path and the relay write: the non-unique twin of the unique index on
    the record's SHA-256, and the sightings' record (the (record, place, ref) index starts with
    it), seen_at, direction and queue_id."""
    for name in ("archiverecord_sha256", "archivesighting_record_id", "archivesighting_seen_at",
                 "archivesighting_direction", "archivesighting_queue_id"):
        db.execute_sql(f"DROP INDEX IF EXISTS {name}")
