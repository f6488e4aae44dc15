"""The real PostgreSQL fixture stopped and started again under running code.

The database layer (gateway.db.ReconnectingPostgres): a thread's idle connection the server
dropped is replaced before its next statement, one lost inside a transaction fails that
transaction (nothing of it stored, no silent reconnect) and the next one works."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from peewee import InterfaceError, OperationalError

from gateway.db import connect
from gateway.db.models import OutboundMessage, database
from gateway.spool import Spool
from tests.integration.test_relay import MESSAGE

pytestmark = pytest.mark.integration


@pytest.fixture
def db(postgres, request):
    name = "t_restart_" + request.node.name[-30:].lower()
    postgres.drop_database(name)
    yield connect(postgres.create_database(name))
    database.close()


def queued() -> list[str]:
    return sorted(m.queue_id for m in OutboundMessage.select())


def test_a_connection_the_server_dropped_is_replaced_but_never_inside_a_transaction(db, postgres, tmp_path):
    spool = Spool(tmp_path / "spool")
    thread = ThreadPoolExecutor(1)  # a long-lived thread: one connection, kept between units of work
    try:
        thread.submit(spool.enqueue, "alice@acme.test", ["a@customer.example"], MESSAGE, queue_id="QR1").result()
        postgres.stop()
        try:  # down: the unit of work fails (the reconnect is refused), the next one tries again
            with pytest.raises(OperationalError):
                thread.submit(queued).result()
        finally:
            postgres.start()
        assert thread.submit(queued).result() == ["QR1"]  # no failure first: replaced before use

        def lost_mid_transaction() -> None:
            with database.atomic():
                OutboundMessage.update(attempts=7).execute()
                postgres.stop()
                postgres.start()
                OutboundMessage.update(attempts=8).execute()  # must not run on a new connection

        with pytest.raises((OperationalError, InterfaceError)):
            thread.submit(lost_mid_transaction).result()
        assert thread.submit(lambda: OutboundMessage.get().attempts).result() == 0  # nothing of it committed

        def lost_before_commit() -> None:  # the COMMIT must fail, not succeed on a new connection
            with database.atomic():
                OutboundMessage.update(attempts=9).execute()
                postgres.stop()
                postgres.start()

        with pytest.raises((OperationalError, InterfaceError)):
            thread.submit(lost_before_commit).result()
        assert thread.submit(lambda: OutboundMessage.get().attempts).result() == 0
        # An idle connection after a restart, from a thread that did nothing meanwhile: this one.
        assert queued() == ["QR1"]
    finally:
        thread.submit(lambda: database.is_closed() or database.close()).result()
        thread.shutdown()
