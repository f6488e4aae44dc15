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


# Values that PostgreSQL quotes in its error texts, and that must never reach a log line.
PG_SECRET_ADDRESS = "zhang.secret@customer.example"
PG_SECRET_SUBJECT = "Salary of Mr Zhang 42000"


@pytest.fixture(scope="session")
def postgres_errors(postgres) -> dict[str, Exception]:
    """Real database errors from the PostgreSQL fixture, as peewee raises them (wrapping
    psycopg2's), each quoting a value: "unique" (23505, the address in its DETAIL), "integer"
    (22P02, the subject in its primary message), "not_null" (23502, the row in its DETAIL),
    "quotes" (22P02, a value with quotes and a line break in it)."""
    from gateway.db import open_database

    postgres.create_database("db_errors")
    db = open_database(postgres.url_for("db_errors"))
    errors: dict[str, Exception] = {}

    def capture(name: str, sql: str, *params: str) -> None:
        try:
            db.execute_sql(sql, params)
        except Exception as exc:  # noqa: BLE001 - the error is what the fixture is for
            errors[name] = exc
        else:
            raise AssertionError(f"{sql} did not fail")

    try:
        db.execute_sql("CREATE TABLE contact (email text UNIQUE, subject text NOT NULL)")
        db.execute_sql("INSERT INTO contact VALUES (%s, %s)", (PG_SECRET_ADDRESS, PG_SECRET_SUBJECT))
        capture("unique", "INSERT INTO contact VALUES (%s, %s)", PG_SECRET_ADDRESS, "x")
        capture("integer", "SELECT %s::integer", PG_SECRET_SUBJECT)
        capture("not_null", "INSERT INTO contact VALUES (%s, NULL)", PG_SECRET_ADDRESS.upper())
        capture("quotes", "SELECT %s::integer", 'say "Zhang"\n42000 \'yes\'')
    finally:
        db.close()
        postgres.drop_database("db_errors")
    return errors
