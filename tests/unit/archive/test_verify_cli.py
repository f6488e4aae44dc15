"""`mailgate archive verify|head` in-process: the anchors they print (the chain head and the
operation log's end), `--anchor` of both kinds, and the exit code when the operation log's
newest entries were deleted."""

from __future__ import annotations

import re

import pytest

from gateway.cli import main
from gateway.config import load
from gateway.db import connect
from gateway.db.models import AuditLog

ANCHOR = re.compile(r"^anchor: (oplog:)?(\d+):([0-9a-f]{64})$", re.M)


def _anchors(out: str) -> tuple[str, str]:
    found = ANCHOR.findall(out)
    assert [bool(o) for o, _, _ in found] == [False, True], out
    return tuple(f"{o}{n}:{h}" for o, n, h in found)


def test_verify_anchors_the_operation_log_and_reports_its_cut_tail(cli_config, capsys):
    from gateway import oplog

    argv = ["-c", str(cli_config), "archive", "verify", "--quiet"]
    url = load(cli_config).database.url
    connect(url)
    trail = [oplog.record("local:auditor", "archive.view", f"archive:{i}") for i in range(3)]
    capsys.readouterr()
    assert main(argv) == 0
    chain_anchor, oplog_anchor = _anchors(capsys.readouterr().out)
    connect(url)
    checkpoint_row = AuditLog.select().order_by(AuditLog.id.desc()).first()
    assert checkpoint_row.action == "archive.checkpoint"
    assert oplog_anchor == f"oplog:{checkpoint_row.id}:{checkpoint_row.hash}"  # the printed one covers it
    lines = (load(cli_config).archive_dir / "chain-anchors.log").read_text().split("\n")
    assert lines[1].startswith(f"oplog:{trail[-1].id}:{trail[-1].hash} ")  # the file's: the entry before it

    assert main(["-c", str(cli_config), "archive", "head"]) == 0
    assert _anchors(capsys.readouterr().out) == (chain_anchor, oplog_anchor)  # nothing written since
    assert main([*argv, "--no-blobs", "--anchor", chain_anchor, "--anchor", oplog_anchor]) == 0
    capsys.readouterr()

    connect(url)
    AuditLog.delete().where(AuditLog.id >= trail[1].id).execute()  # the newest trail and checkpoints
    assert oplog.verify() == []
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^operation-log anchor {trail[-1].id}:\S+ \(chain-anchors.log line 2\) no longer "
                     r"matches: .*tail was cut", out, re.M), out
    assert main([*argv, "--anchor", oplog_anchor]) == 1
    assert "(given with --anchor)" in capsys.readouterr().out


def test_a_malformed_oplog_anchor_is_a_usage_error(cli_config, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-c", str(cli_config), "archive", "verify", "--anchor", "oplog:12"])
    assert exc.value.code == 2 and "not an anchor" in capsys.readouterr().err
