"""A database exception, described for a log line without the data it may quote.

PostgreSQL's error texts can carry row values: the DETAIL of a unique violation
(``Key (email)=(alice@acme.test) already exists``), the input that did not parse
(``invalid input syntax for type integer: "…"``) — addresses, subjects, whatever the
statement was storing.  ``describe_db_error`` keeps what an operator needs — the exception
types, the SQLSTATE, the primary message's first line with everything quoted in it replaced
by "…", and the names of the table, column and constraint (identifiers, never values) — and
drops DETAIL, HINT and CONTEXT.  SQLite's messages carry no values ("database is locked",
"database or disk is full", "UNIQUE constraint failed: department.name"): their first line
stays as it is.  Anything else is named by its type only (its text may quote the mail), an
``OSError`` with its system text.
"""

from __future__ import annotations

import errno
import re
import sqlite3

import peewee

MAX_TEXT = 300  # characters of a message kept at most

# Greedy on purpose: a value may itself contain quotes, so everything from the first quote
# to the last goes ('a "b" c' leaves nothing of b); an unpaired quote takes the rest.
_DOUBLE = re.compile(r'"[\s\S]*"|"[\s\S]*$')
_SINGLE = re.compile(r"'[\s\S]*'|'[\s\S]*$")
_KEY_VALUE = re.compile(r"\([^)]*\)=\([\s\S]*\)")  # Key (col)=(value), should one appear
_BYTES = re.compile(r"0x[0-9a-fA-F]{2}(?:\s+0x[0-9a-fA-F]{2})*")  # "invalid byte sequence …: 0xe4 0xb8"
_IDENTIFIERS = ("schema", "table", "column", "datatype", "constraint")


def describe_db_error(exc: BaseException) -> str:
    """One line for the log: ``exc``'s type (and the driver's, when peewee wrapped it), the
    SQLSTATE and a message without values (see the module doc)."""
    driver = getattr(exc, "orig", None)
    if not isinstance(driver, BaseException):
        driver = exc
    names = type_name(exc) if driver is exc else f"{type_name(exc)} from {type_name(driver)}"
    if isinstance(driver, sqlite3.Error):
        code = getattr(driver, "sqlite_errorname", None)
        return f"{names}{f' {code}' if code else ''}: {_first_line(str(driver))}"
    if is_postgres_error(driver):
        return _describe_postgres(names, driver)
    if isinstance(exc, peewee.PeeweeException):  # raised by peewee itself, no driver's error inside
        return f"{names}: {scrub(str(exc))}"
    if isinstance(driver, OSError) and driver.strerror:
        code = errno.errorcode.get(driver.errno or 0)
        return f"{names} ({f'{code}: ' if code else ''}{driver.strerror})"  # never the file name
    return names


def scrub(message: str) -> str:
    """``message``'s first line with anything quoted in it replaced by "…" (on the whole
    message first: a quoted value may span lines)."""
    text = _KEY_VALUE.sub("(…)=(…)", message)
    text = _DOUBLE.sub('"…"', text)
    text = _SINGLE.sub("'…'", text)
    text = _BYTES.sub("0x…", text)
    return _first_line(text)


def _describe_postgres(names: str, driver: BaseException) -> str:
    code = getattr(driver, "pgcode", None)
    diag = getattr(driver, "diag", None)
    primary = getattr(diag, "message_primary", None) or str(driver)  # None for client-side errors
    where = [f"{name}={value}" for name in _IDENTIFIERS
             if (value := getattr(diag, f"{name}_name", None))]
    text = scrub(primary.removeprefix("ERROR:").strip())
    return f"{names}{f' SQLSTATE {code}' if code else ''}: {text}" + (f" [{' '.join(where)}]" if where else "")


def is_postgres_error(exc: BaseException) -> bool:
    """An exception of the PostgreSQL driver (psycopg2, psycopg), not yet wrapped by peewee."""
    return type(exc).__module__.split(".")[0] in ("psycopg2", "psycopg")


def _first_line(text: str) -> str:
    line = text.strip().split("\n", 1)[0].strip()
    return line if len(line) <= MAX_TEXT else line[:MAX_TEXT] + "…"


def type_name(exc: BaseException) -> str:
    """``module.Qualname`` of ``exc``'s type (the bare name for a built-in)."""
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
