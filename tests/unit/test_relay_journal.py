"""The node's journal of relay outcomes that could not be recorded (gateway/relayjournal.py):
durable lines with a checksum, a torn or corrupt line ignored with a warning, bounded, and
entries removed by a rewrite."""

from __future__ import annotations

import datetime as dt
import logging

from gateway.db.models import OutboundMessage
from gateway.relayjournal import (
    OutcomeJournal,
    decode_changes,
    decode_line,
    encode_changes,
    encode_line,
    journal_path,
)


def entry(row: int, **extra) -> dict:
    return {"row": row, "owner": "n1/n1-relay0/abc123", "attempts": 0, "queue_id": f"Q{row}", **extra}


def test_entries_survive_a_new_process_and_removed_ones_are_gone(tmp_path):
    path = journal_path(tmp_path, "n1")
    assert path == tmp_path / "relay-journal" / "n1.journal"
    journal = OutcomeJournal(path)
    assert len(journal) == 0 and not path.exists()
    assert journal.append(entry(1)) and journal.append(entry(2)) and journal.append(entry(3))
    again = OutcomeJournal(path)  # as the next start reads it
    assert [e["row"] for e in again.entries()] == [1, 2, 3]
    assert again.for_row(2) == entry(2) and again.for_row(4) is None
    again.remove([entry(2)])
    assert [e["row"] for e in OutcomeJournal(path).entries()] == [1, 3]
    again.remove(again.entries())
    assert not path.exists() and len(OutcomeJournal(path)) == 0


def test_a_torn_last_line_is_ignored_with_a_warning_and_appends_go_on_after_it(tmp_path, caplog):
    path = tmp_path / "j" / "n1.journal"
    journal = OutcomeJournal(path)
    journal.append(entry(1))
    journal.append(entry(2))
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # a crash in the middle of the second append
    with caplog.at_level(logging.WARNING, logger="gateway.relayjournal"):
        reloaded = OutcomeJournal(path)
    assert [e["row"] for e in reloaded.entries()] == [1]
    assert "torn last line 2 ignored" in caplog.text
    assert reloaded.append(entry(3))  # not glued to the torn tail
    assert [e["row"] for e in OutcomeJournal(path).entries()] == [1, 3]
    assert path.read_bytes().count(b"\n") == 2


def test_a_corrupt_line_fails_its_checksum_and_only_it_is_ignored(tmp_path, caplog):
    path = tmp_path / "n1.journal"
    lines = [encode_line(entry(n)) for n in (1, 2, 3)]
    lines[1] = lines[1].replace(b'"row":2', b'"row":9')  # a flipped digit: the checksum no longer matches
    path.write_bytes(b"".join(lines))
    assert decode_line(lines[1]) is None and decode_line(lines[0]) == entry(1)
    assert decode_line(b"not a record\n") is None and decode_line(b"00000000 []\n") is None
    with caplog.at_level(logging.WARNING, logger="gateway.relayjournal"):
        journal = OutcomeJournal(path)
    assert [e["row"] for e in journal.entries()] == [1, 3]
    assert "corrupt line 2 ignored" in caplog.text


def test_a_full_journal_refuses_an_entry(tmp_path, caplog):
    line = len(encode_line(entry(1)))
    journal = OutcomeJournal(tmp_path / "n1.journal", max_bytes=2 * line + 1)
    assert journal.append(entry(1)) and journal.append(entry(2))
    with caplog.at_level(logging.ERROR, logger="gateway.relayjournal"):
        assert not journal.append(entry(3))
    assert "is full" in caplog.text
    assert [e["row"] for e in OutcomeJournal(journal.path).entries()] == [1, 2]
    journal.remove([entry(1)])  # room again
    assert journal.append(entry(3))


def test_a_rows_new_state_goes_through_json_unchanged():
    m = OutboundMessage
    when = dt.datetime(2026, 12, 1, 13, 0, 5, 123456)
    changes = {m.state: "sent", m.recipients: "[]", m.done_at: when, m.credentials: None, m.attempts: 3,
               m.claimed_by: None, m.claimed_until: None, m.last_error: ""}
    encoded = encode_changes(changes)
    assert decode_line(encode_line(entry(1, changes=encoded)))["changes"] == encoded
    assert decode_changes(encoded) == changes
