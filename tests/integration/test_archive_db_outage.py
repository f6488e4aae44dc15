"""The archive's background work while the real PostgreSQL fixture is stopped and started
again: the pass fails (logged by its loop), and the next pass on the same thread resumes —
nothing lost, nothing indexed twice.  (Before, a thread kept the connection the server had
dropped and failed every later pass with "connection already closed".)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from peewee import InterfaceError, OperationalError

from gateway.archive import Archive, pending
from gateway.archive.indexer import index_batch
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc
from gateway.archive.service import _pass
from gateway.db import drop_connection
from gateway.db.models import database
from tests.harness.pgdb import pg_db
from tests.unit.archive.conftest import message

pytestmark = pytest.mark.integration


db = pg_db("t_archive_outage_")


def test_the_indexer_and_the_blob_syncer_resume_after_postgresql_restarts(db, postgres, tmp_path, monkeypatch):
    monkeypatch.setattr(pending, "syncfs", lambda directory: None)
    node = Archive(tmp_path / "archive", tmp_path / "archive.keys", defer_index=True)
    first = node.record(message(1, "avocet"), direction="outbound", verdict="accepted")
    thread = ThreadPoolExecutor(1)  # the loops' worker thread: one connection, kept between passes
    syncer = pending.BlobSyncer(node.store, "n1")
    try:
        assert thread.submit(_pass, index_batch, node).result()[0] == 1
        second = node.record(message(2, "avocet"), direction="outbound", verdict="accepted")
        blob = node.store.prepare(message(3))
        node.store.write(blob, durable=False)
        pending.row("n1", blob.name, blob.data).save(force_insert=True)

        postgres.stop()
        try:
            with pytest.raises((OperationalError, InterfaceError)):
                thread.submit(_pass, index_batch, node).result()
            thread.submit(syncer._round).result()  # logged, the row kept
        finally:
            postgres.start()
        drop_connection()  # (this test's own connection was dropped by the server too)

        assert thread.submit(_pass, index_batch, node).result()[0] == 1
        assert sorted(d.record_id for d in SearchDoc.select()) == [first.id, second.id]
        assert sorted(record_ids("avocet")) == [first.id, second.id]
        assert pending.ArchivePendingBlob.select().count() == 1
        thread.submit(syncer._round).result()
        assert pending.ArchivePendingBlob.select().count() == 0
    finally:
        thread.submit(lambda: database.is_closed() or database.close()).result()
        thread.shutdown()
