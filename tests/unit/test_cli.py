import subprocess
import sys

import pytest

from gateway.cli import build_parser, main


def test_help_everywhere(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in [None, *commands]:
        with pytest.raises(SystemExit) as exc:
            main(["--help"] if name is None else [name, "--help"])
        assert exc.value.code == 0
        assert "usage: mailgate" in capsys.readouterr().out


def test_init_then_offline_check(tmp_path):
    cfg = tmp_path / "mailgate.toml"
    assert main(["-c", str(cfg), "init"]) == 0
    text = cfg.read_text()
    assert "[upstream]" in text
    for f in ("certs/gateway.crt", "certs/gateway.key", "certs/dkim/mailgate-rsa.key",
              "certs/dkim/mailgate-ed25519.key", "certs/dkim/mailgate.dns", "certs/queue.key", "var/mailgate.db"):
        assert (tmp_path / f).exists(), f
    assert (tmp_path / "certs/gateway.key").stat().st_mode & 0o077 == 0
    # init again changes nothing and succeeds.
    before = (tmp_path / "certs/gateway.crt").read_bytes()
    assert main(["-c", str(cfg), "init"]) == 0
    assert (tmp_path / "certs/gateway.crt").read_bytes() == before
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(cfg), "check", "--offline"],
                         capture_output=True, text=True)
    assert out.returncode in (0, 1)
    assert "FAIL tls" not in out.stdout and "FAIL database" not in out.stdout
    # the example config archives IMAP mail but names no way to read it upstream: said, not failed
    assert "WARN [archive] inbound mail is not archived" in out.stdout
    assert not any(line.startswith("FAIL") and "[archive]" in line for line in out.stdout.splitlines())


def test_check_reports_each_problem_on_its_own_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[smtp]\nmax_recipients = "lots"\n[upstream]\nimap_security = "ssl"\n')
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(cfg), "check"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    lines = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert len(lines) >= 3
    assert any("max_recipients" in line for line in lines)


def test_check_finds_missing_schema_and_certs(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[relay]\nusername = "r@acme.test"\npassword = "x"\n')
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(cfg), "check", "--offline"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "FAIL database: no schema yet" in out.stdout
    assert "FAIL tls:" in out.stdout


def test_installed_console_script_runs_from_any_directory(tmp_path):
    """`mailgate` as pip installed it (not `python -m` from the checkout) finds its packages."""
    from pathlib import Path

    script = Path(sys.executable).parent / "mailgate"
    if not script.exists():
        pytest.skip("mailgate console script not installed in this environment")
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "archive" in result.stdout and "panel" in result.stdout


def test_log_lines_carry_what_the_format_prints_and_no_stack_walk(monkeypatch):
    """A process's logging (node, acceptor, relay) formats time, logger, level and message;
    no caller is looked up for a line (a stack walk per message), no thread or process info."""
    import io
    import logging

    from gateway.cli import _setup_logging

    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))  # restored after the test
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    _setup_logging("INFO")
    walks = []
    real = logging.Logger.findCaller
    monkeypatch.setattr(logging.Logger, "findCaller", lambda self, *a: walks.append(1) or real(self, *a))
    logging.getLogger("mailgate.smtp").info("Q1: from=<%s> verdict=%s", "alice@acme.test", "accept")
    line = stream.getvalue()
    assert " mailgate.smtp INFO Q1: from=<alice@acme.test> verdict=accept" in line, line
    assert walks == []
    for handler in root.handlers:
        handler.close()
