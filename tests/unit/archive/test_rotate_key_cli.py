"""`mailgate archive rotate-key`: a new current key, chained and logged; a running archive
(the node's) picks it up from the file without a restart; old blobs stay readable."""

from __future__ import annotations

import json

from gateway.archive import store as store_mod
from gateway.archive.schema import ArchiveEvent, ArchiveRecord
from gateway.archive.verify import verify
from gateway.db.models import AuditLog

from .conftest import message


def test_rotate_key_is_chained_logged_and_picked_up_by_a_running_archive(tmp_path, capsys, monkeypatch):
    from gateway.archive import Archive
    from gateway.cli import main
    from gateway.config import load
    from gateway.db import connect
    from tests.harness.gateway import write_config

    monkeypatch.setattr(store_mod, "_RELOAD_EVERY", 0.0)  # the node looks at the file every 10 s
    path = tmp_path / "mailgate.toml"
    write_config(path, {"node": {"name": "t", "data_dir": "var"}, "database": {"url": "sqlite:///var/m.db"},
                        "company": {"name": "ACME", "domains": ["acme.test"]},
                        "relay": {"mode": "relay_account", "username": "relay@acme.test", "password": "pw"}})
    assert main(["-c", str(path), "init"]) == 0
    cfg = load(path)
    db = connect(cfg.database.url)
    running = Archive.from_config(cfg)  # as a node holds it
    before = running.record(message(1), direction="outbound", verdict="accepted")
    capsys.readouterr()
    assert main(["-c", str(path), "archive", "rotate-key"]) == 0
    assert "archive key 2 is now current" in capsys.readouterr().out
    connect(cfg.database.url)
    after = running.record(message(2), direction="outbound", verdict="accepted")
    keys = {r.id: r.key_id for r in ArchiveRecord.select()}
    assert (keys[before.id], keys[after.id]) == (1, 2)
    assert running.read(ArchiveRecord.get_by_id(before.id)) == message(1)
    assert running.read(ArchiveRecord.get_by_id(after.id)) == message(2)
    [event] = ArchiveEvent.select().where(ArchiveEvent.kind == "rotate-key")
    assert event.actor.startswith("cli:") and json.loads(event.details) == {"key_id": 2}
    [entry] = AuditLog.select().where(AuditLog.action == "archive.rotate-key")
    assert entry.actor == event.actor and json.loads(entry.details) == {"key_id": 2}
    secret = cfg.archive.key_file.read_text().split()[-1]  # the new key's base64: never in a log or event
    assert secret not in entry.details and secret not in event.details and secret not in event.target
    assert verify(running.store) == []
    db.close()
