"""Helpers that run real servers (PostgreSQL, ...) for the test suite."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def shared_tempdir(prefix: str) -> Iterator[Path]:
    """A fresh directory in the system temp dir that other users may traverse (0711).

    For servers whose processes run as dovecot or postgres.  pytest's tmp_path dirs
    do not work: they are 0700, and every pytest run that starts (even a concurrent
    one) re-tightens pytest's temp root.  Removed afterwards unless MAILGATE_KEEP_TMP is set.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    try:
        yield path
    finally:
        if not os.environ.get("MAILGATE_KEEP_TMP"):
            shutil.rmtree(path, ignore_errors=True)


def wait_until(condition: Callable[[], object], timeout: float = 20.0, what: str = "condition",
               interval: float = 0.02) -> object:
    """Poll ``condition`` (state in another process: a DB row, a mailbox) until it is truthy and
    return it; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


class LogSeen(logging.Handler):
    """A log handler that sets ``event`` when a record's message contains ``text`` (attach it
    to a logger, then wait on the event instead of sleeping)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()
