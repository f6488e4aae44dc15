"""Database connection: SQLite in WAL mode by default, PostgreSQL by URL."""

from __future__ import annotations

import select
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from peewee import Database, PostgresqlDatabase, SqliteDatabase

from gateway.db.models import database

# synchronous=FULL: a queue row committed before the 250 survives power loss.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "busy_timeout": 10000,
    "cache_size": -16000,
}
SQLITE_MIN = (3, 35)


def open_database(url: str) -> Database:
    """Create (but do not bind) a peewee database for a sqlite:/// or postgresql:// URL."""
    if url.startswith("sqlite:///"):
        if sqlite3.sqlite_version_info < SQLITE_MIN:  # RETURNING (3.35), FTS5 trigram (3.34)
            raise RuntimeError(f"SQLite {sqlite3.sqlite_version} is too old: Mailgate needs "
                               f"{'.'.join(map(str, SQLITE_MIN))} or newer (Debian 12 has 3.40)")
        path = url[len("sqlite:///"):]
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    if url.startswith("postgresql://"):
        u = urlparse(url)
        return ReconnectingPostgres(
            u.path.lstrip("/"),
            user=unquote(u.username or "") or None,
            password=unquote(u.password or "") or None,
            host=u.hostname,
            port=u.port or 5432,
        )
    raise ValueError(f"unsupported database URL: {url!r}")


class ReconnectingPostgres(PostgresqlDatabase):
    """PostgreSQL whose threads survive a server restart.  Each thread keeps its connection
    (peewee's per-thread state); when the server restarts, every one of them is dead, and
    psycopg2 fails each statement on it for good ("connection already closed").  So where a
    unit of work starts — a transaction's BEGIN, or a statement outside any transaction —
    a connection that is dead is replaced first: psycopg2 marked it closed (a statement on
    it failed), or its idle socket is readable (the server's goodbye and EOF: an idle
    connection is sent nothing else, as nobody here LISTENs).  A poll(2) of the socket, no
    round trip.  Never inside a transaction: a statement, COMMIT or ROLLBACK on a connection
    lost mid-transaction fails, and with it the unit of work (the next one reconnects).
    While the server is down, the reconnect fails, and so does the unit of work."""

    def begin(self, *args: Any, **kwargs: Any) -> None:
        if not self.in_transaction():
            self._replace_if_dead()
        super().begin(*args, **kwargs)

    def execute_sql(self, sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not self.in_transaction():  # (COMMIT and ROLLBACK do not come this way)
            self._replace_if_dead()
        return super().execute_sql(sql, params, *args, **kwargs)

    def _replace_if_dead(self) -> None:
        state = self._state
        if state.closed:
            return
        conn = state.conn
        if not conn.closed:
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN | select.POLLPRI)
            if not poller.poll(0):
                return
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - it is dead either way
            pass
        state.reset()  # the next statement connects afresh (autoconnect)


def connect(url: str, migrate: bool = True) -> Database:
    """Bind the models to the database at ``url`` and bring its schema up to date."""
    db = open_database(url)
    database.initialize(db)
    db.connect(reuse_if_open=True)
    if migrate:
        from gateway.db.migrations import upgrade

        upgrade(db)
    return db


def is_postgres() -> bool:
    return isinstance(database.obj, PostgresqlDatabase)


def drop_connection() -> None:
    """Close this thread's connection (unless a transaction is open in it) after a failed
    piece of background work, so that the thread's next statement connects afresh: a
    connection the server dropped — PostgreSQL restarted — otherwise fails every statement
    for good ("connection already closed"), and a loop that retries on the same thread never
    resumes.  (On PostgreSQL ``ReconnectingPostgres`` does this by itself where the next unit
    of work starts; this is the explicit form, for SQLite as well.)  Never raises."""
    try:
        if not database.is_closed() and not database.in_transaction():
            database.close()
    except Exception:  # noqa: BLE001 - a broken connection may fail even to close; the next use reconnects
        pass
