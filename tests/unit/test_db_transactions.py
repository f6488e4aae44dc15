"""Customer writes take SQLite's write lock when they begin (BEGIN IMMEDIATE).

In WAL mode a deferred transaction that has read and then writes fails at once with
"database is locked" — SQLite's busy timeout does not apply — when another connection
committed in between.  The node, the relay process and the panel's threads write the same
file, so a manager's check-then-insert action in the panel (customers, public pool,
approvals) failed that way whenever the gateway was busy.  Those writes now go through
``write_transaction`` and wait their turn instead.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from gateway import customers
from gateway.db.models import Department, Employee
from gateway.groupcommit import write_transaction


def test_a_write_transaction_holds_the_write_lock_from_its_start(db):
    other = sqlite3.connect(db.database, isolation_level=None, timeout=0)
    try:
        with write_transaction():
            Department.select().count()  # only a read so far
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again after the commit
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_creating_a_customer_waits_for_another_writer_instead_of_failing(db):
    """The panel's pattern (look up, then insert) while another process holds the write lock
    and commits: with a deferred transaction the customer's insert failed at once with
    "database is locked" after the other commit (its read snapshot was stale)."""
    owner = Employee.create(email="alice@acme.test", name="Alice")
    other = sqlite3.connect(db.database, isolation_level=None, timeout=10)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO department (name) VALUES ('meanwhile')")
    errors: list[Exception] = []
    started = threading.Event()

    def create() -> None:
        started.set()
        try:
            customers.create_customer("Lead Co", contacts=[("ceo@lead.example", "CEO")], owners=[owner])
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    started.wait(10)
    thread.join(0.3)  # give it the time to read and reach the lock (it must still be waiting)
    assert thread.is_alive() and not errors
    other.execute("COMMIT")
    other.close()
    thread.join(10)
    assert not errors, errors
    assert Department.get_or_none(Department.name == "meanwhile") is not None
    assert customers.Customer.get(customers.Customer.name == "Lead Co").contacts.count() == 1
