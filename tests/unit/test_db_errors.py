"""Database errors described for the log without the values they quote (gateway/db/errors.py)."""

from __future__ import annotations

import errno
import sqlite3

import peewee
import pytest

from gateway.db.errors import describe_db_error, scrub
from tests.unit.conftest import PG_SECRET_ADDRESS, PG_SECRET_SUBJECT


def assert_no_value(text: str) -> None:
    for value in (PG_SECRET_ADDRESS, PG_SECRET_ADDRESS.upper(), PG_SECRET_SUBJECT, "zhang", "42000", "yes"):
        assert value.lower() not in text.lower(), text
    assert "DETAIL" not in text and "\n" not in text


def test_a_unique_violation_keeps_its_sqlstate_and_constraint_not_the_key(postgres_errors):
    exc = postgres_errors["unique"]
    assert isinstance(exc, peewee.IntegrityError) and exc.orig.pgcode == "23505"
    assert PG_SECRET_ADDRESS in str(exc)  # what the log used to get: DETAIL: Key (email)=(…the address…)
    text = describe_db_error(exc)
    assert_no_value(text)
    assert text.startswith("peewee.IntegrityError from psycopg2.errors.UniqueViolation SQLSTATE 23505: "
                           'duplicate key value violates unique constraint "…"')
    assert "table=contact" in text and "constraint=contact_email_key" in text  # names, not values


def test_an_invalid_integer_loses_the_input(postgres_errors):
    exc = postgres_errors["integer"]
    assert PG_SECRET_SUBJECT in str(exc)
    text = describe_db_error(exc)
    assert_no_value(text)
    assert text == ('peewee.DataError from psycopg2.errors.InvalidTextRepresentation SQLSTATE 22P02: '
                    'invalid input syntax for type integer: "…"')


def test_a_not_null_violation_loses_the_failing_row(postgres_errors):
    exc = postgres_errors["not_null"]
    assert PG_SECRET_ADDRESS.upper() in str(exc)  # DETAIL: Failing row contains (…)
    text = describe_db_error(exc)
    assert_no_value(text)
    assert "SQLSTATE 23502" in text and "column=subject" in text and "table=contact" in text


def test_a_value_with_quotes_and_a_line_break_leaves_nothing(postgres_errors):
    exc = postgres_errors["quotes"]
    assert "Zhang" in str(exc)
    text = describe_db_error(exc)
    assert_no_value(text)
    assert text.endswith('invalid input syntax for type integer: "…"')


def test_sqlite_errors_keep_their_text(tmp_path):
    """SQLite's messages carry no values: kept, first line, with SQLite's error name."""
    db = peewee.SqliteDatabase(str(tmp_path / "t.db"))
    db.execute_sql("CREATE TABLE contact (email text UNIQUE)")
    db.execute_sql("INSERT INTO contact VALUES (?)", (PG_SECRET_ADDRESS,))
    with pytest.raises(peewee.IntegrityError) as unique:
        db.execute_sql("INSERT INTO contact VALUES (?)", (PG_SECRET_ADDRESS,))
    text = describe_db_error(unique.value)
    assert text == ("peewee.IntegrityError from sqlite3.IntegrityError SQLITE_CONSTRAINT_UNIQUE: "
                    "UNIQUE constraint failed: contact.email")
    # A real full database (a page limit): the text the handler's 452 looks for stays readable.
    db.execute_sql("PRAGMA max_page_count = 2")
    with pytest.raises(peewee.OperationalError) as full:
        db.execute_sql("INSERT INTO contact VALUES (?)", ("x" * 100_000,))
    assert describe_db_error(full.value) == ("peewee.OperationalError from sqlite3.OperationalError SQLITE_FULL: "
                                             "database or disk is full")
    assert describe_db_error(sqlite3.OperationalError("database is locked")) == \
        "sqlite3.OperationalError: database is locked"
    db.close()


def test_other_exceptions_by_type_an_os_error_with_its_system_text():
    assert describe_db_error(ValueError(f"bad {PG_SECRET_SUBJECT}")) == "ValueError"
    disk = OSError(errno.ENOSPC, "No space left on device", "/var/spool/mailgate/Q1")
    assert describe_db_error(disk) == "OSError (ENOSPC: No space left on device)"
    missing = peewee.DoesNotExist(f"instance matching query does not exist:\nSQL: SELECT …\n"
                                  f"Params: ['{PG_SECRET_ADDRESS}']")
    assert describe_db_error(missing) == "peewee.DoesNotExist"  # its SQL parameters are values


def test_scrub_replaces_whatever_is_quoted():
    assert scrub('value "a "b" c" and \'d\'\nDETAIL: Key (x)=(y)') == 'value "…" and \'…\''
    assert scrub('unpaired "rest of it\nand more') == 'unpaired "…"'
    assert scrub("Key (email)=(a@b.example) already exists") == "Key (…)=(…) already exists"
    assert scrub('invalid byte sequence for encoding "UTF8": 0xe4 0xb8') == \
        'invalid byte sequence for encoding "…": 0x…'
