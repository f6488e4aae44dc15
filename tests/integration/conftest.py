"""Fixtures for tests that run a whole Mailgate node against the real Dovecot."""

from __future__ import annotations

import pytest

from gateway.db import connect
from gateway.demo.sample_data import seed
from tests.harness.gateway import GatewayProcess


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, dovecot, sink):
    """A running node with the sample data; module-scoped (one start per test file)."""
    gw = GatewayProcess(tmp_path_factory.mktemp("gateway"), dovecot)
    connect(gw.db_url)
    gw.sample = seed()
    gw.start()
    yield gw
    gw.stop()
