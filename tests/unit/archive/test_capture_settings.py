"""Inbound capture without a way to read upstream is never silently off: ``capture_imap``
on (the default, and what `mailgate init` writes) without a master user or credential
opt-in warns once at start and in ``config_warnings`` (mailgate check) — a warning, never a
config error; ``capture_imap = false`` (outbound only, on purpose) says nothing."""

from __future__ import annotations

import logging

import pytest

from gateway.archive.service import announce_capture
from gateway.archive.settings import capture_imap_on
from gateway.checks import config_warnings
from gateway.config import from_dict

BASE = {"node": {"name": "t", "data_dir": "var"}, "database": {"url": "sqlite:///var/m.db"},
        "company": {"name": "ACME", "domains": ["acme.test"]},
        "relay": {"mode": "relay_account", "username": "relay@acme.test", "password": "pw"}}


def _cfg(archive: dict):  # noqa: ANN202
    return from_dict({**BASE, "archive": archive})


@pytest.mark.parametrize("archive", [{}, {"capture_imap": True}])
def test_on_without_upstream_login_warns_once(caplog, archive):
    cfg = _cfg(archive)  # loads: not an error
    assert not capture_imap_on(cfg.archive)
    with caplog.at_level(logging.WARNING, logger="mailgate.archive"):
        announce_capture(cfg.archive)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    for key in ("master_user", "master_password", "capture_credentials_opt_in", "capture_imap = false",
                "sync_enabled"):
        assert key in text, key
    assert config_warnings(cfg) == [text]


@pytest.mark.parametrize("archive", [
    {"master_user": "archiver", "master_password": "pw"},
    {"capture_credentials_opt_in": True},
    {"master_user": "archiver", "master_password": "pw", "capture_imap": True},
])
def test_a_way_upstream_means_capture_on_and_no_warning(caplog, archive):
    cfg = _cfg(archive)
    assert capture_imap_on(cfg.archive)
    with caplog.at_level(logging.WARNING, logger="mailgate.archive"):
        announce_capture(cfg.archive)
    assert not caplog.records and config_warnings(cfg) == []


def test_switched_off_on_purpose_is_quiet(caplog):
    cfg = _cfg({"capture_imap": False, "master_user": "archiver", "master_password": "pw"})
    assert not capture_imap_on(cfg.archive)
    cfg = _cfg({"capture_imap": False})
    with caplog.at_level(logging.WARNING, logger="mailgate.archive"):
        announce_capture(cfg.archive)
    assert not caplog.records and config_warnings(cfg) == []


def test_the_example_config_loads_and_warns():
    """conf/mailgate.toml (what `mailgate init` copies) says capture_imap = true without a
    master user: it must still load — and warn."""
    from pathlib import Path

    from gateway.config import load

    cfg = load(Path(__file__).resolve().parents[3] / "conf" / "mailgate.toml")
    assert len(config_warnings(cfg)) == 1
