"""Fixtures for tests that run a whole Mailgate node against the real Dovecot."""

from __future__ import annotations

import pytest

from tests.harness.gateway import seeded


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, dovecot, sink):
    """A running node with the sample data; module-scoped (one start per test file)."""
    gw = seeded(tmp_path_factory.mktemp("gateway"), dovecot)
    gw.start()
    yield gw
    gw.stop()
