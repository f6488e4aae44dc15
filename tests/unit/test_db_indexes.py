"""Indexes the write path pays for must earn their keep: the redundant ones are gone (from
fresh databases and, by migrations 4 and 155, from older ones), and the look-ups that
relied on them still use an index."""

from __future__ import annotations

import datetime as dt

from gateway.db.migrations import MIGRATIONS

DROPPED = {
    "outboundmessage": ["outboundmessage_state"],
    "archiverecord": ["archiverecord_sha256"],
    "archivesighting": ["archivesighting_record_id", "archivesighting_seen_at", "archivesighting_direction",
                        "archivesighting_queue_id"],
}


def _indexes(db, table: str) -> set[str]:
    return {i.name for i in db.get_indexes(table)}


def _plan(db, sql: str, params: tuple) -> str:
    return " | ".join(row[-1] for row in db.execute_sql(f"EXPLAIN QUERY PLAN {sql}", params).fetchall())


def test_a_fresh_database_has_none_of_the_redundant_indexes(db):
    for table, names in DROPPED.items():
        assert not _indexes(db, table) & set(names), table
    assert "archiverecord_sha256_unique" in _indexes(db, "archiverecord")
    assert "archivesighting_record_id_place_ref" in _indexes(db, "archivesighting")
    assert "outboundmessage_state_next_attempt_at" in _indexes(db, "outboundmessage")


def test_the_migrations_drop_them_from_an_older_database(db):
    columns = {"outboundmessage_state": ("outboundmessage", "state"),
               "archiverecord_sha256": ("archiverecord", "sha256"),
               "archivesighting_record_id": ("archivesighting", "record_id"),
               "archivesighting_seen_at": ("archivesighting", "seen_at"),
               "archivesighting_direction": ("archivesighting", "direction"),
               "archivesighting_queue_id": ("archivesighting", "queue_id")}
    for name, (table, column) in columns.items():  # as an older release created them
        db.execute_sql(f"CREATE INDEX {name} ON {table} ({column})")
    MIGRATIONS[4](db)
    MIGRATIONS[155](db)
    for table, names in DROPPED.items():
        assert not _indexes(db, table) & set(names), table
    MIGRATIONS[4](db)  # idempotent: nothing left to drop is no error
    MIGRATIONS[155](db)


def test_the_lookups_still_use_an_index(db):
    now = dt.datetime(2026, 11, 30)
    plans = [
        _plan(db, "SELECT * FROM archiverecord WHERE sha256 IN (?, ?)", ("a" * 64, "b" * 64)),
        _plan(db, "SELECT * FROM archivesighting WHERE record_id = ? ORDER BY seen_at, id", (1,)),
        _plan(db, "SELECT 1 FROM archivesighting WHERE record_id = ? AND place = ? AND ref = ?", (1, "x", "y")),
        _plan(db, "SELECT id FROM outboundmessage WHERE state = ? AND next_attempt_at <= ?"
                  " AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY next_attempt_at, id LIMIT 10",
              ("queued", now, now)),
        _plan(db, "SELECT next_attempt_at FROM outboundmessage WHERE state = ?"
                  " AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY next_attempt_at LIMIT 1",
              ("queued", now)),
    ]
    for plan in plans:
        assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
