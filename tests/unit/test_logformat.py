"""The log's tracebacks describe PostgreSQL errors without the values they quote
(gateway/logformat.py); every other exception is formatted as the standard formatter does."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

from gateway.logformat import Formatter
from tests.unit.conftest import PG_SECRET_ADDRESS, PG_SECRET_SUBJECT

FMT = "%(levelname)s %(message)s"


def logged(exc: BaseException, formatter: logging.Formatter) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("test.logformat")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise exc
        except BaseException:
            log.exception("the relay's run failed")
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_a_postgresql_error_in_a_traceback_loses_its_values(postgres_errors):
    for name in ("unique", "integer"):
        exc = postgres_errors[name]
        assert PG_SECRET_ADDRESS in str(exc) or PG_SECRET_SUBJECT in str(exc)  # what log.exception printed
        plain = logged(exc, logging.Formatter(FMT))
        assert PG_SECRET_ADDRESS in plain or PG_SECRET_SUBJECT in plain
        text = logged(exc, Formatter(FMT))
        assert PG_SECRET_ADDRESS not in text and PG_SECRET_SUBJECT not in text, text
        assert "DETAIL" not in text
        assert text.startswith("ERROR the relay's run failed\nTraceback (most recent call last):\n")
        assert "SQLSTATE" in text and "test_logformat.py" in text  # what and where stay


def test_other_exceptions_are_formatted_as_by_the_standard_formatter():
    def chained() -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            raise ValueError("the rule file is bad") from exc

    try:
        chained()
    except ValueError as exc:
        err = exc
    assert same_as_standard(err)
    try:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            raise OSError(28, "No space left on device")  # noqa: B904 - the implicit context is the case
    except OSError as exc:
        err = exc
    assert same_as_standard(err)


def same_as_standard(err: BaseException) -> bool:
    ei = (type(err), err, err.__traceback__)
    ours, standard = Formatter(FMT).formatException(ei), logging.Formatter(FMT).formatException(ei)
    assert "Traceback" in ours and type(err).__name__ in ours
    return ours == standard


def test_the_gateways_logging_set_up_uses_it():
    code = ("import logging; from gateway.cli import _setup_logging; from gateway.logformat import Formatter; "
            "_setup_logging(); hs = logging.getLogger().handlers; "
            "assert hs and all(isinstance(h.formatter, Formatter) for h in hs), hs")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
