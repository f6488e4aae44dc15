from __future__ import annotations

import pytest

from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.db import connect
from gateway.directory import Directory


@pytest.fixture
def db(tmp_path):
    database = connect("sqlite:///" + str(tmp_path / "unit.db"))
    yield database
    database.close()


@pytest.fixture
def directory(db):
    d = Directory(["acme.test"], PUBLIC_MAIL_DOMAINS)
    d.load()
    return d
