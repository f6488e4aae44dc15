"""Outbound mail the gateway changed keeps the client's bytes as submitted (gateway/archive/original.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.archive import ArchiveError, BlobError
from gateway.archive.original import HEAD_ONLY, WHOLE, body_start, capture, restore
from gateway.archive.retention import purge
from gateway.archive.schema import ArchiveRecord
from gateway.archive.verify import verify
from gateway.db.models import utcnow

SUBMITTED = (b"Received: from laptop ([127.0.0.1])\r\n\tby gw (Mailgate) with ESMTPSA id Q1;\r\n\tMon, 1 Jan 2026\r\n"
             b"From: Alice <alice.private@acme.test>\r\nTo: buyer@example.com\r\nSubject: =?utf-8?b?5oql5Lu3?=\r\n"
             b"Message-ID: <m1@acme.test>\r\n\r\nPrice list attached.\r\n\r\nRegards\r\n")
# What the gateway relays: sender rewritten, a DKIM signature on top; the body is untouched.
RELAYED = (b"DKIM-Signature: v=1; a=rsa-sha256; d=acme.test; s=mg; b=abc\r\n"
           + SUBMITTED.replace(b"alice.private@acme.test", b"alice@acme.test"))


def test_body_start_handles_crlf_lf_and_no_body() -> None:
    assert body_start(b"A: 1\r\n\r\nbody") == 8
    assert body_start(b"A: 1\n\nbody") == 6
    assert body_start(b"A: 1\r\n") == 6
    assert body_start(b"A: 1\r\n\r\nx\n\ny") == 8  # the first empty line wins


def test_header_change_keeps_only_the_submitted_header_section(archive) -> None:
    copy = capture(archive.store, SUBMITTED, RELAYED)
    assert copy is not None
    payload = archive.store.decode(copy.sealed)
    assert payload[:1] == HEAD_ONLY and payload[1:] == SUBMITTED[:body_start(SUBMITTED)]
    assert b"alice.private" not in copy.sealed  # sealed: compressed and encrypted
    assert restore(archive.store, copy.sealed, copy.sha256, RELAYED) == SUBMITTED


def test_a_changed_body_keeps_the_whole_submitted_message(archive) -> None:
    relayed = RELAYED.replace(b"Price list", b"PRICE LIST")
    copy = capture(archive.store, SUBMITTED, relayed)
    assert archive.store.decode(copy.sealed)[:1] == WHOLE
    assert restore(archive.store, copy.sealed, copy.sha256, relayed) == SUBMITTED


def test_unchanged_mail_keeps_nothing_extra(archive) -> None:
    assert capture(archive.store, SUBMITTED, SUBMITTED) is None
    rec = archive.record(SUBMITTED, direction="outbound", verdict="accepted",
                         original=archive.original_copy(SUBMITTED, SUBMITTED))
    assert rec.original_sha256 == "" and archive.read_original(rec) is None


def test_altered_copy_or_relayed_body_does_not_pass_for_the_original(archive) -> None:
    copy = capture(archive.store, SUBMITTED, RELAYED)
    flipped = bytearray(copy.sealed)
    flipped[-1] ^= 1
    with pytest.raises(BlobError, match="decrypt"):
        restore(archive.store, bytes(flipped), copy.sha256, RELAYED)
    with pytest.raises(BlobError, match="does not match"):
        restore(archive.store, copy.sealed, copy.sha256, RELAYED.replace(b"Regards", b"Thanks!"))


def test_record_keeps_reads_and_verifies_the_original(archive) -> None:
    rec = archive.record(RELAYED, direction="outbound", verdict="accepted", queue_id="Q1",
                         original=archive.original_copy(SUBMITTED, RELAYED))
    rec = ArchiveRecord.get_by_id(rec.id)
    assert archive.read(rec) == RELAYED
    assert archive.read_original(rec) == SUBMITTED
    assert verify(archive.store) == []


def test_verify_reports_an_altered_original(archive) -> None:
    rec = archive.record(RELAYED, direction="outbound", verdict="accepted",
                         original=archive.original_copy(SUBMITTED, RELAYED))
    # Another sealed header section (valid ciphertext, wrong content): the hash check catches it.
    forged = capture(archive.store, SUBMITTED.replace(b"buyer@", b"other@"), RELAYED)
    ArchiveRecord.update(original=forged.sealed).where(ArchiveRecord.id == rec.id).execute()
    problems = verify(archive.store)
    assert any(f"record {rec.id}" in p and "submitted original" in p for p in problems), problems


def test_verify_reports_a_changed_original_hash(archive) -> None:
    rec = archive.record(RELAYED, direction="outbound", verdict="accepted",
                         original=archive.original_copy(SUBMITTED, RELAYED))
    ArchiveRecord.update(original_sha256="0" * 64).where(ArchiveRecord.id == rec.id).execute()
    problems = verify(archive.store)
    assert any(f"record {rec.id}" in p and "altered" in p for p in problems), problems


def test_purge_removes_the_original_too(archive) -> None:
    old = utcnow() - dt.timedelta(days=365 * 8)
    rec = archive.record(RELAYED, direction="outbound", verdict="accepted", seen_at=old,
                         original=archive.original_copy(SUBMITTED, RELAYED))
    assert purge(archive.store, 7).purged == [rec.id]
    gone = ArchiveRecord.get_by_id(rec.id)
    assert gone.original is None and gone.original_sha256 == ""
    with pytest.raises(ArchiveError, match="purged"):
        archive.read_original(gone)
    assert verify(archive.store) == []
