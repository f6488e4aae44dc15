"""The log's formatter: tracebacks whose PostgreSQL errors are described without their values.

``log.exception`` prints the exception's text, and a PostgreSQL error's text can quote row
values — the DETAIL of a unique violation, the input that did not parse — i.e. addresses and
subjects of mail (gateway/db/errors.py).  The log lines that name a database error say it
with ``describe_db_error``; this formatter does the same for every traceback in the log, so
a ``log.exception`` anywhere (the relay's run loop, the indexer, an area service) cannot put
them there either: each PostgreSQL error in the exception's chain — a peewee error wrapping
one too — is shown as ``describe_db_error`` shows it.  Every other exception is shown as the
standard formatter shows it.
"""

from __future__ import annotations

import logging
import traceback
from types import TracebackType

from gateway.db.errors import describe_db_error, is_postgres_error

_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
_MAX_CHAIN = 20


def _quotes_values(exc: BaseException) -> bool:
    """A PostgreSQL driver error, or a (peewee) error wrapping one."""
    orig = getattr(exc, "orig", None)
    return is_postgres_error(exc) or (isinstance(orig, BaseException) and is_postgres_error(orig))


def format_exception(exc: BaseException) -> str:
    """``traceback.format_exception(exc)`` joined, PostgreSQL errors' texts described."""
    chain: list[tuple[BaseException, str]] = []  # outermost first, with how it links to the previous
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
        seen.add(id(current))
        if current.__cause__ is not None:
            link, following = _CAUSE, current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link, following = _CONTEXT, current.__context__
        else:
            link, following = "", None
        chain.append((current, link))
        current = following
    out: list[str] = []
    for n, (item, link) in enumerate(reversed(chain)):  # the innermost first, as Python prints them
        if n:
            out.append(link)
        tb: TracebackType | None = item.__traceback__
        if tb is not None:
            out.append("Traceback (most recent call last):\n")
            out.extend(traceback.format_tb(tb))
        if _quotes_values(item):
            out.append(describe_db_error(item) + "\n")
        else:
            out.extend(traceback.format_exception_only(type(item), item))
    return "".join(out).rstrip("\n")


class Formatter(logging.Formatter):
    """``logging.Formatter`` whose tracebacks go through ``format_exception``."""

    def formatException(self, ei) -> str:  # noqa: ANN001, N802 - logging's own name and argument
        exc = ei[1]
        if not isinstance(exc, BaseException):
            return super().formatException(ei)
        return format_exception(exc)


def use_formatter(fmt: str) -> None:
    """Every handler of the root logger formats with ``Formatter(fmt)``."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(Formatter(fmt))
