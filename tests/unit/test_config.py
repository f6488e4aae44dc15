from pathlib import Path

import pytest

from gateway import config

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "mailgate.toml"


def test_example_config_loads_and_resolves_paths():
    cfg = config.load(EXAMPLE)
    assert cfg.smtp.submission_port == 587 and cfg.imap.tls_port == 993
    assert cfg.tls.cert.is_absolute() and cfg.tls.cert.parent.parent == EXAMPLE.parent
    assert cfg.database.url == "sqlite:///" + str(EXAMPLE.parent / "var" / "mailgate.db")
    assert "qq.com" in cfg.public_mail_domains


def test_every_example_key_is_documented():
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#") or "=" in lines[i - 1], f"undocumented: {line}"


def test_problems_are_reported_one_per_line():
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({
            "smtp": {"bogus": 1, "max_recipients": "many", "trusted_networks": ["not-a-net"]},
            "upstream": {"imap_security": "ssl"},
            "relay": {"mode": "relay_account"},
            "nosuch": {},
        })
    problems = err.value.problems
    assert "[smtp] bogus: unknown setting" in problems
    assert any(p.startswith("[smtp] max_recipients: expected int") for p in problems)
    assert any("not-a-net" in p for p in problems)
    assert any(p.startswith("[upstream] imap_security") for p in problems)
    assert any(p.startswith("[relay] username/password") for p in problems)
    assert "[nosuch]: unknown section" in problems


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\nport = 1")
    with pytest.raises(config.ConfigError):
        config.load(bad)
