"""A NUL in a message's Subject or Message-ID (raw, or decoded from an RFC 2047 word) on the
real PostgreSQL fixture: PostgreSQL refuses NUL in text values, so the archive record of such
a message could not be written (the submission got 451 on every try), nor the distribution row
of a shared-mailbox message (its watcher stopped there)."""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import compat32
from types import SimpleNamespace

import pytest

from gateway.db import is_postgres
from gateway.policy.context import header_text
from gateway.smtp.handler import SubmissionHandler
from tests.harness.pgdb import pg_db

pytestmark = pytest.mark.integration

RAW = (b"From: alice@acme.test\r\nTo: buyer@customer.example\r\nSubject: a\x00b =?utf-8?b?YwBk?=\r\n"
       b"Message-ID: <m\x00@acme.test>\r\n\r\nbody\r\n")


db = pg_db("t_nul_header_")


def test_a_nul_in_the_subject_and_message_id_is_archived_on_postgresql(db, tmp_path):
    from gateway.archive import Archive
    from gateway.archive.schema import ArchiveRecord
    from gateway.config import Config

    assert is_postgres()
    cfg = Config()
    cfg.node.data_dir = tmp_path / "var"
    cfg.archive.key_file = tmp_path / "archive.keys"
    archive = Archive.from_config(cfg)
    archive.record(RAW, direction="inbound", verdict="seen", subject=None, message_id=None,
                   mail_from="alice@acme.test", recipients=["buyer@customer.example"])
    rec = ArchiveRecord.get()
    assert (rec.subject, rec.message_id) == ("a b c d", "<m @acme.test>")
    # the SMTP handler's fields (ctx.subject, its Message-ID) for an outbound copy
    headers = BytesHeaderParser(policy=compat32).parsebytes(RAW.replace(b"body", b"other body"))
    ctx = SimpleNamespace(headers=headers)
    archive.record(RAW.replace(b"body", b"other body"), direction="outbound", verdict="accepted",
                   subject=header_text(headers.get("Subject")), message_id=SubmissionHandler._message_id(ctx),
                   mail_from="alice@acme.test", recipients=["buyer@customer.example"])
    assert ArchiveRecord.select().where(ArchiveRecord.direction == "outbound").get().subject == "a b c d"


def test_a_nul_in_a_shared_mailbox_message_is_recorded_on_postgresql(db):
    from gateway.distribute.inquiry import parse
    from gateway.distribute.schema import Distribution

    got = parse(RAW.replace(b"body", b"need\x00 price"))
    Distribution.create(mailbox="sales@acme.test", folder="INBOX", uidvalidity=1, uid=1, token="t1",
                        message_id=got.message_id, from_addr=got.from_addr, from_name=got.from_name,
                        subject=got.subject, preview=got.preview, state="undistributed")
    assert (Distribution.get().subject, Distribution.get().preview) == ("a b c d", "need price")


def test_a_nul_in_the_message_id_is_recorded_for_reply_routing_on_postgresql(db):
    """The sender rewrite remembers who sent a Message-ID (replies go back to them): with a NUL
    in it the insert failed on PostgreSQL (logged, nothing stored).  Stored now, the NUL as a
    space as everywhere else."""
    from gateway.db.models import Employee, SentMessage
    from gateway.rewrite import record_message_id

    alice = Employee.create(email="alice@acme.test", name="Alice")
    record_message_id("<m\x00@acme.test>", alice.id, "sales@acme.test")
    assert [(r.message_id, r.employee_id) for r in SentMessage.select()] == [("<m @acme.test>", alice.id)]
