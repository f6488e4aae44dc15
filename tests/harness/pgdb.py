"""A fresh PostgreSQL database per test, on the session's private cluster (``postgres``).

One ``db`` fixture for the tests that run on PostgreSQL, declared in their module as
``db = pg_db("t_gcommit_")``: a module's own fixture of that name overrides the SQLite
``db`` of tests/unit/conftest.py, so test functions shared with the SQLite files
(``test_x = sqlite_cases.test_x``) run here on PostgreSQL.  Inside a test:
``with fresh_database(postgres, "t_name"): ...``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from peewee import Database

from gateway.db import connect, is_postgres
from tests.harness.postgres import PostgresServer


def database_name(prefix: str, request: pytest.FixtureRequest) -> str:
    """``prefix`` + the end of the test's name (its parameters included), as a database name."""
    tail = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())
    return prefix + tail[-(63 - len(prefix)):]


@contextmanager
def fresh_database(server: PostgresServer, name: str, lc_ctype: str | None = None) -> Iterator[Database]:
    """Database ``name``, new and empty (one a previous run left is dropped first), the models
    bound to it and migrated; closed and dropped after — with the connections a thread of the
    test may still hold (``--force``), so that the cluster does not collect every test's
    files for the session's end to delete."""
    server.drop_database(name)
    database = connect(server.create_database(name, lc_ctype=lc_ctype))
    assert is_postgres()
    try:
        yield database
    finally:
        database.close()
        server.drop_database(name, force=True)


def pg_db(prefix: str, lc_ctypes: tuple[str, ...] = (), name: str = "db") -> Callable[..., Iterator[Database]]:
    """A fixture ``name``: a fresh database per test (see fresh_database), named ``prefix`` +
    the test's name. With ``lc_ctypes`` each test runs once per LC_CTYPE, in a database of its
    own."""

    def db(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[Database]:
        lc_ctype = getattr(request, "param", None)
        with fresh_database(postgres, database_name(prefix, request), lc_ctype) as database:
            yield database

    if lc_ctypes:
        return pytest.fixture(params=list(lc_ctypes), name=name)(db)
    return pytest.fixture(name=name)(db)
