"""Helpers that run real servers (PostgreSQL, ...) for the test suite."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
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
