"""`mailgate archive import` in-process over a folder of .eml files and an mbox: the progress
it shows (plain counts on a pipe, a bar on a terminal), the final summary, the exit code
and the operation-log entry.  (From an IMAP account: tests/integration/test_archive_capture.py.)"""

from __future__ import annotations

import json
import mailbox
import re
import sys

from gateway.cli import main
from gateway.config import load
from gateway.db import connect
from gateway.db.models import AuditLog

from .conftest import message
from .test_importer import Tty, screen

FINAL = re.compile(r"^import: (\d+)/(\d+) messages \(\d+/s\), done$", re.M)


def _folder(tmp_path):
    folder = tmp_path / "mail"
    (folder / "sub").mkdir(parents=True)
    for n in range(3):
        (folder / f"m{n}.eml").write_bytes(message(n))
    (folder / "sub" / "copy.eml").write_bytes(message(0))  # the same content in another file
    (folder / "sub" / "empty.eml").write_bytes(b"")
    return folder


def test_import_eml_folder_shows_progress_and_summary(cli_config, tmp_path, capsys):
    folder = _folder(tmp_path)
    argv = ["-c", str(cli_config), "archive", "import", str(folder)]
    capsys.readouterr()
    assert main(argv) == 1  # a file was skipped
    out, err = capsys.readouterr()
    assert FINAL.findall(err) == [("5", "5")]  # every file counted, the bad one too
    assert re.search(r"^skipped: .*empty\.eml: not an e-mail message$", err, re.M), err
    assert out == "imported 4 message(s): 3 new record(s), 4 new sighting(s), 1 skipped\n"
    assert main(argv) == 1  # again: nothing new
    out, err = capsys.readouterr()
    assert FINAL.findall(err) == [("5", "5")]
    assert out == "imported 4 message(s): 0 new record(s), 0 new sighting(s), 1 skipped\n"
    connect(load(cli_config).database.url)
    entries = list(AuditLog.select().where(AuditLog.action == "archive.import").order_by(AuditLog.id))
    assert [json.loads(e.details) for e in entries] == [
        {"seen": 4, "new_records": 3, "skipped": 1}, {"seen": 4, "new_records": 0, "skipped": 1}]
    assert entries[0].target == str(folder) and entries[0].actor.startswith("cli:")


def _mbox(tmp_path, n: int):
    path = tmp_path / "old.mbox"
    box = mailbox.mbox(path)
    for i in range(n):
        box.add(message(i, body="中文正文"))
    box.flush()
    box.close()
    return path


def test_import_mbox_shows_progress_and_summary(cli_config, tmp_path, capsys):
    path = _mbox(tmp_path, 4)
    capsys.readouterr()
    assert main(["-c", str(cli_config), "archive", "import", "--mbox", str(path), "--sent"]) == 0
    out, err = capsys.readouterr()
    assert FINAL.findall(err) == [("4", "4")] and "skipped" not in err
    assert out == "imported 4 message(s): 4 new record(s), 4 new sighting(s), 0 skipped\n"


def test_import_on_a_terminal_draws_a_bar_and_ends_its_line(cli_config, tmp_path, capsys, monkeypatch):
    path = _mbox(tmp_path, 3)
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["-c", str(cli_config), "archive", "import", "--mbox", str(path)]) == 0
    err = tty.getvalue()
    assert err.startswith("\rimport [") and err.endswith("\n") and err.count("\n") == 1
    assert re.fullmatch(r"import \[#{30}\] 3/3 \(\d+/s\)", screen(err)[0]), err
    assert capsys.readouterr().out == "imported 3 message(s): 3 new record(s), 3 new sighting(s), 0 skipped\n"


def test_import_error_ends_the_line_and_says_why(cli_config, tmp_path, capsys, monkeypatch):
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    argv = ["-c", str(cli_config), "archive", "import", "--mbox", str(_mbox(tmp_path, 1)),
            "--employee", "nobody@acme.test"]
    assert main(argv) == 2
    assert tty.getvalue() == "mailgate archive import: no employee 'nobody@acme.test'\n"
