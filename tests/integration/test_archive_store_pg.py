"""The archive's storage side on the real PostgreSQL fixture: the same chain, verify,
retention, import, unreadable-blob and failed-write indexing cases as on SQLite (tests/unit/archive),
plus concurrent writers."""

from __future__ import annotations

import pytest

from tests.harness.pgdb import pg_db
from tests.unit.archive import (
    test_chain,
    test_importer,
    test_retention,
    test_unread_index,
    test_verify,
    test_write_lock,
)
from tests.unit.archive.conftest import archive  # noqa: F401 - the SQLite cases' fixture, on this db

pytestmark = pytest.mark.integration


db = pg_db("t_archstore_")


bob = test_retention.bob
clock = test_unread_index.clock

test_one_record_per_content_many_sightings = test_chain.test_one_record_per_content_many_sightings
test_ref_makes_sightings_idempotent = test_chain.test_ref_makes_sightings_idempotent
test_chain_links_every_row_in_seq_order = test_chain.test_chain_links_every_row_in_seq_order
test_intact_archive_verifies = test_verify.test_intact_archive_verifies
test_altered_record_is_reported = test_verify.test_altered_record_is_reported
test_deleted_record_or_sighting_is_reported = test_verify.test_deleted_record_or_sighting_is_reported
test_cut_tail_is_reported_and_checkpoint_catches_a_rewritten_head = (
    test_verify.test_cut_tail_is_reported_and_checkpoint_catches_a_rewritten_head)
test_anchors_file_catches_a_cut_tail_with_head_and_checkpoint_rewritten = (
    test_verify.test_anchors_file_catches_a_cut_tail_with_head_and_checkpoint_rewritten)
test_anchor_kept_off_host = test_verify.test_anchor_kept_off_host
test_cut_at_the_operation_logs_end_is_reported = test_verify.test_cut_at_the_operation_logs_end_is_reported
test_operation_log_anchor_kept_off_host = test_verify.test_operation_log_anchor_kept_off_host
test_altered_or_deleted_blob_is_reported = test_verify.test_altered_or_deleted_blob_is_reported
test_blanking_without_purge_event_is_reported = test_verify.test_blanking_without_purge_event_is_reported
test_purge_removes_old_unheld_records_and_keeps_the_chain_verifiable = (
    test_retention.test_purge_removes_old_unheld_records_and_keeps_the_chain_verifiable)
test_hold_all_suspends_every_purge = test_retention.test_hold_all_suspends_every_purge
test_eml_folder_import_is_idempotent_and_skips_bad_files = (
    test_importer.test_eml_folder_import_is_idempotent_and_skips_bad_files)

test_concurrent_writers_keep_one_unbroken_chain = test_write_lock.test_concurrent_writers_keep_one_unbroken_chain

test_a_passing_read_error_is_read_again_after_growing_delays_then_indexed_and_forgotten = (
    test_unread_index.test_a_passing_read_error_is_read_again_after_growing_delays_then_indexed_and_forgotten)
test_a_missing_blob_stays_listed_is_read_hourly_and_indexed_once_restored = (
    test_unread_index.test_a_missing_blob_stays_listed_is_read_hourly_and_indexed_once_restored)
test_a_purged_record_is_forgotten = test_unread_index.test_a_purged_record_is_forgotten
test_a_listed_record_purged_meanwhile_is_dropped_by_the_next_retry = (
    test_unread_index.test_a_listed_record_purged_meanwhile_is_dropped_by_the_next_retry)
test_a_record_listed_by_another_indexer_is_read_within_a_minute_of_its_time = (
    test_unread_index.test_a_record_listed_by_another_indexer_is_read_within_a_minute_of_its_time)
test_a_restarted_indexer_reads_the_listed_records_when_due = (
    test_unread_index.test_a_restarted_indexer_reads_the_listed_records_when_due)
test_a_failed_document_write_is_listed_counted_and_written_again_when_due = (
    test_unread_index.test_a_failed_document_write_is_listed_counted_and_written_again_when_due)
test_a_listed_record_indexed_meanwhile_by_another_writer_is_not_written_twice = (
    test_unread_index.test_a_listed_record_indexed_meanwhile_by_another_writer_is_not_written_twice)
test_a_failed_write_of_a_batch_ingest_is_left_to_the_background_indexer = (
    test_unread_index.test_a_failed_write_of_a_batch_ingest_is_left_to_the_background_indexer)


def test_the_indexer_writes_a_pass_in_one_transaction_while_records_arrive(archive, monkeypatch):  # noqa: F811
    """PostgreSQL has no database-wide write lock for the group commit to wait on: while records
    keep arriving, a pass still writes its documents in one transaction (SQLite: chunks of
    INDEX_CHUNK, tests/unit/archive/test_deferred_index.py) — and indexes every record once."""
    from gateway import groupcommit
    from gateway.archive import Archive
    from gateway.archive.indexer import INDEX_CHUNK, index_batch
    from gateway.archive.search import record_ids
    from tests.unit.archive.conftest import message

    node = Archive(archive.directory, archive.store.key_file, defer_index=True)
    limit = 2 * INDEX_CHUNK + 4
    transactions: list[int] = []
    real = groupcommit.write_transaction
    monkeypatch.setattr(groupcommit, "write_transaction", lambda: (transactions.append(1), real())[1])
    for i in range(2 * limit):
        node.record(message(i, f"sandpiper arrival{i}"), direction="outbound", verdict="accepted")
    assert index_batch(node, limit=limit) == (limit, True)
    assert len(transactions) == 1  # records arriving (the first pass), yet one transaction
    assert index_batch(node, limit=limit) == (limit, True)
    assert index_batch(node, limit=limit) == (0, False)
    assert len(record_ids("sandpiper")) == 2 * limit
