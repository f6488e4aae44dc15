"""SQLite planner statistics: refresh() fills sqlite_stat1, so the planner knows table sizes."""

from __future__ import annotations

from gateway.db import statistics
from gateway.db.models import Employee, database


def test_refresh_gathers_statistics_for_every_indexed_table(db) -> None:
    Employee.insert_many([{"email": f"e{i}@acme.test", "name": f"E{i}"} for i in range(50)]).execute()
    assert statistics.refresh() >= 0
    tables = {row[0] for row in database.obj.execute_sql("SELECT tbl FROM sqlite_stat1")}
    assert "employee" in tables, tables
    [(stat,)] = database.obj.execute_sql(
        "SELECT stat FROM sqlite_stat1 WHERE tbl = 'employee' AND idx LIKE '%email%'").fetchall()
    assert int(stat.split()[0]) == 50  # rows in the index, as the planner now sees them
