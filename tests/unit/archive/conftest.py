from __future__ import annotations

import pytest

from gateway.archive import Archive


@pytest.fixture
def archive(db, tmp_path) -> Archive:
    return Archive(tmp_path / "archive", tmp_path / "certs" / "archive.keys")


def message(n: int = 0, body: str = "hello") -> bytes:
    return (f"From: alice@acme.test\r\nTo: buyer{n}@example.com\r\nSubject: Offer {n}\r\n"
            f"Message-ID: <m{n}@acme.test>\r\n\r\n{body} {n}\r\n").encode()


@pytest.fixture
def cli_config(tmp_path):
    """A minimal initialized configuration (SQLite under tmp_path) for `mailgate archive …`
    run in-process; yields its path.  The CLI binds the models to its own connection:
    call ``connect(load(path).database.url)`` again before reading the database."""
    from gateway.cli import main
    from gateway.config import load
    from gateway.db import connect
    from tests.harness.gateway import write_config

    path = tmp_path / "mailgate.toml"
    write_config(path, {"node": {"name": "t", "data_dir": "var"}, "database": {"url": "sqlite:///var/m.db"},
                        "company": {"name": "ACME", "domains": ["acme.test"]},
                        "relay": {"mode": "relay_account", "username": "relay@acme.test", "password": "pw"}})
    assert main(["-c", str(path), "init"]) == 0
    yield path
    connect(load(path).database.url).close()
