"""Planner statistics for SQLite (PostgreSQL's autovacuum keeps its own).

SQLite plans without statistics until ANALYZE runs, and nothing runs it on its own: a table
that grew from ten rows to ten million is still planned as if it were empty.  The node
refreshes them shortly after it starts and then every few hours.  ``analysis_limit`` makes
ANALYZE sample about that many rows per index, so a refresh costs milliseconds per index on
any size of database; its write lock is held that long.  (``PRAGMA optimize`` is not enough
here: it looks only at tables the same connection has queried.)
"""

from __future__ import annotations

import logging
import time

from gateway.db import is_postgres
from gateway.db.models import database

log = logging.getLogger("mailgate.db")

ANALYSIS_LIMIT = 1000  # rows sampled per index
FIRST_DELAY = 120.0  # seconds after the node starts
INTERVAL = 6 * 3600.0


def refresh() -> float:
    """ANALYZE every table (SQLite; a no-op on PostgreSQL).  Returns the seconds it took."""
    if is_postgres():
        return 0.0
    started = time.monotonic()
    db = database.obj
    db.execute_sql(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
    db.execute_sql("ANALYZE")
    took = time.monotonic() - started
    log.info("database statistics refreshed in %.2f s", took)
    return took
