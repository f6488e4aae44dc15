"""Archive migrations on an archive that already holds mail (not only on an empty database)."""

from __future__ import annotations

from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.archive.verify import verify_blobs, verify_chain
from gateway.db.migrations import upgrade
from gateway.db.models import SchemaVersion
from tests.unit.archive.conftest import message


def test_migration_154_upgrades_an_archive_with_records_and_sightings(db, archive):
    rec = archive.record(message(1), direction="outbound", verdict="accepted")
    archive.record(message(1), direction="outbound", verdict="sent", place="relay:sent")
    # the archive as version 153 left it: no "as submitted" columns
    db.execute_sql("ALTER TABLE archiverecord DROP COLUMN original")
    db.execute_sql("ALTER TABLE archiverecord DROP COLUMN original_sha256")
    SchemaVersion.delete().where(SchemaVersion.version == 154).execute()

    assert upgrade(db) == [154]  # a table rebuild here failed on the sightings' foreign key

    columns = {c.name: c for c in db.get_columns("archiverecord")}
    assert not columns["original_sha256"].null and columns["original"].null
    row = ArchiveRecord.get_by_id(rec.id)
    assert row.original_sha256 == "" and row.original is None and row.hash == rec.hash
    assert ArchiveSighting.select().where(ArchiveSighting.record == rec.id).count() == 2
    assert verify_chain() == [] and verify_blobs(archive.store) == []


def test_migration_160_gives_the_trigram_table_a_larger_pending_terms_buffer(db, archive):
    from gateway.archive.search_schema import FTS_HASHSIZE

    archive.record(message(1), direction="outbound", verdict="accepted")  # a document in the table
    db.execute_sql("DELETE FROM archivefts_config WHERE k = 'hashsize'")
    SchemaVersion.delete().where(SchemaVersion.version == 160).execute()
    assert upgrade(db) == [160]
    assert dict(db.execute_sql("SELECT k, v FROM archivefts_config").fetchall())["hashsize"] == FTS_HASHSIZE
    archive.record(message(2, "hashsizecheck"), direction="outbound", verdict="accepted")
    from gateway.archive.search import record_ids

    assert len(record_ids("hashsizecheck")) == 1
