"""Session-wide real servers: an SMTP sink, a private Dovecot relaying to it, PostgreSQL;
and the archive's worker pool for a test (``pool``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.demo.sink import SinkServer
from gateway.demo.upstream import DovecotUpstream
from tests.harness import postgres as pg
from tests.harness import shared_tempdir

USERS = {
    "alice@acme.test": "alice-pw",
    "bob@acme.test": "bob-pw",
    "carol@acme.test": "carol-pw",
    "sales@acme.test": "sales-pw",
    "relay@acme.test": "relay-pw",
}
MASTER_USER = ("archiver", "archiver-pw")


@pytest.fixture(scope="session")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkServer]:
    """The "Internet": an SMTP sink storing every message; call clear() before use."""
    with SinkServer(tmp_path_factory.mktemp("sink")) as server:
        yield server


@pytest.fixture(scope="session")
def dovecot(sink: SinkServer) -> Iterator[DovecotUpstream]:
    """A private Dovecot with USERS and MASTER_USER; submission relays to `sink`."""
    with (
        shared_tempdir("mailgate-dovecot-") as base,  # mail processes run as user dovecot
        DovecotUpstream(base, USERS, master_user=MASTER_USER, relay_port=sink.port) as upstream,
    ):
        yield upstream


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.PostgresServer]:
    """A private PostgreSQL cluster; `.url` is its "mailgate" database."""
    if not pg.available():
        pytest.skip("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) or runuser not available")
    with shared_tempdir("mailgate-postgres-") as base, pg.PostgresServer(base) as server:
        yield server


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The archive's real worker pool of one process (spawned), stopped after the test."""
    from gateway.archive import workers

    monkeypatch.setenv("MAILGATE_ARCHIVE_WORKERS", "1")
    workers.shutdown()
    yield
    workers.shutdown()
