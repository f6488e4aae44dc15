"""A COMMIT that fails, injected into the test database's connection (peewee calls
``Database.commit`` at the end of a top-level transaction): ``refused`` — the database says
no and nothing is applied (the transaction is then rolled back) — or ``applied`` — the
COMMIT goes through but the client hears an error (the connection lost before the reply),
so the rows exist although the caller was told the commit failed."""

from __future__ import annotations

import sqlite3
import threading

import peewee

from gateway.db import is_postgres
from gateway.db.models import database


def refused_error() -> Exception:
    """What a database answers to a COMMIT it did not apply: SQLite busy, PostgreSQL a
    serialization failure (SQLSTATE 40001, the server's own answer on a live connection)."""
    if is_postgres():
        import psycopg2.errors

        class Refused(psycopg2.errors.SerializationFailure):
            pgcode = "40001"  # set by the server on a real one; a class attribute stands in

        Refused.__module__ = "psycopg2.errors"  # the driver's, as a real one is
        return peewee.OperationalError(Refused("could not serialize access"), "could not serialize access")
    return peewee.OperationalError(sqlite3.OperationalError("database is locked"), "database is locked")


def lost_error() -> Exception:
    """A COMMIT whose reply never came: the connection lost (no SQLSTATE), or SQLite's disk
    failing inside the commit."""
    if is_postgres():
        import psycopg2

        text = "server closed the connection unexpectedly"
        return peewee.OperationalError(psycopg2.OperationalError(text), text)
    return peewee.OperationalError(sqlite3.OperationalError("disk I/O error"), "disk I/O error")


class CommitFault:
    """Install with ``monkeypatch``; after ``skip`` of them, the next ``times`` COMMITs of
    threads named ``thread`` (any thread: None) fail — ``mode`` "refused" or "applied" (see
    the module doc)."""

    def __init__(self, monkeypatch, mode: str, times: int = 1, thread: str | None = None,  # noqa: ANN001
                 skip: int = 0) -> None:
        assert mode in ("refused", "applied")
        self.mode, self.left, self.thread, self.failed, self.skip = mode, times, thread, 0, skip
        self._lock = threading.Lock()
        db = database.obj
        self._real = db.commit
        monkeypatch.setattr(db, "commit", self._commit)

    def _commit(self) -> None:
        with self._lock:
            hit = self.left > 0 and (self.thread is None or threading.current_thread().name == self.thread)
            if hit and self.skip:
                self.skip -= 1
                hit = False
            elif hit:
                self.left -= 1
                self.failed += 1
        if not hit:
            return self._real()
        if self.mode == "refused":
            raise refused_error()
        self._real()
        raise lost_error()
