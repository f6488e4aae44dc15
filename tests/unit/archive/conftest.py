from __future__ import annotations

import pytest

from gateway.archive import Archive


@pytest.fixture
def archive(db, tmp_path) -> Archive:
    return Archive(tmp_path / "archive", tmp_path / "certs" / "archive.keys")


def message(n: int = 0, body: str = "hello") -> bytes:
    return (f"From: alice@acme.test\r\nTo: buyer{n}@example.com\r\nSubject: Offer {n}\r\n"
            f"Message-ID: <m{n}@acme.test>\r\n\r\n{body} {n}\r\n").encode()
