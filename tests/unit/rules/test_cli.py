"""`mailgate rules check` and `mailgate rules test` (dry run)."""

from __future__ import annotations

from pathlib import Path

from gateway.cli import main

REPO_RULES = str(Path(__file__).resolve().parents[3] / "rules")


def test_rules_check_ok(capsys):
    assert main(["-c", "/nonexistent.toml", "rules", "check", "--rules", REPO_RULES]) == 0
    assert "rules OK" in capsys.readouterr().out


def test_rules_check_reports_file_line(tmp_path, capsys):
    (tmp_path / "10.yaml").write_text("rules:\n  - name: a\n    conditions: {sendr: x}\n    actions: [{reject: x}]\n")
    assert main(["-c", "/nonexistent.toml", "rules", "check", "--rules", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / '10.yaml'}:3: unknown condition 'sendr'" in out


def test_rules_test_dry_run(tmp_path, capsys):
    (tmp_path / "10.yaml").write_text(
        "rules:\n  - name: no-exe\n    conditions: {attachment-name: '*.exe'}\n"
        "    actions: [{reject: no executables}]\n")
    exe = tmp_path / "tool.exe"
    exe.write_bytes(b"MZ" + b"\0" * 100)
    code = main(["-c", "/nonexistent.toml", "rules", "test", "--rules", str(tmp_path), "--from", "a@acme.test",
                 "--to", "b@example.com", "--subject", "hi", "--attach", str(exe)])
    out = capsys.readouterr().out
    assert code == 0
    assert "HIT  no-exe" in out and "REJECT 550 5.7.1" in out and "nothing was stored" in out


def test_rules_test_with_eml(tmp_path, capsys):
    (tmp_path / "10.yaml").write_text(
        "rules:\n  - name: tag\n    conditions: {subject-contains: offer}\n"
        "    actions: [{prepend_subject: '[X] '}]\n")
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@acme.test\nTo: b@example.com\nSubject: Our offer\n\nbody\n")
    assert main(["-c", "/nonexistent.toml", "rules", "test", "--rules", str(tmp_path), "--from", "a@acme.test",
                 "--to", "b@example.com", "--eml", str(eml)]) == 0
    assert "[tag] prepend '[X] ' to the subject" in capsys.readouterr().out


def test_rules_test_refuses_ambiguous_mime_structure_as_the_gateway_does(tmp_path, capsys):
    (tmp_path / "10.yaml").write_text(
        "rules:\n  - name: tag\n    conditions: {subject-contains: offer}\n"
        "    actions: [{prepend_subject: '[X] '}]\n")
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@acme.test\nSubject: Our offer\nContent-Type: multipart/mixed; boundary=b1\n\n"
                    b"--b1\nContent-Type: text/plain\nContent-Type: application/octet-stream\n\nx\n--b1--\n")
    assert main(["-c", "/nonexistent.toml", "rules", "test", "--rules", str(tmp_path), "--from", "a@acme.test",
                 "--to", "b@example.com", "--eml", str(eml)]) == 0
    out = capsys.readouterr().out
    assert "REJECT 550 5.6.0" in out and "two different Content-Type fields in MIME part 1" in out
    assert "prepend" not in out  # the rules were not asked
