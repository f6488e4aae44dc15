"""A header line that is no field, through a running gateway that rewrites the sender, to
the sink: the line arrives (it used to be dropped by the header edits), as the first body
line after the blank line Postfix's cleanup would put before it; DKIM verifies on what
arrives, and the archive holds what was relayed."""

from __future__ import annotations

import smtplib

import dkim
import pytest

from gateway.archive import for_config
from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.config import load
from gateway.rules.headerblock import HeaderBlock
from tests.harness import wait_until
from tests.harness.gateway import seeded
from tests.integration.test_approval_flow import dns_stub
from tests.integration.test_submission import tls_ctx

pytestmark = pytest.mark.integration

REWRITE_RULE = """
rules:
  - name: company-sender-for-offers
    priority: 40
    conditions:
      subject-regex: ['^Offer with a stray line']
    actions:
      - rewrite_sender: {address: sales@acme.test, display_name: "{name} | {company}", reply_to: company}
      - prepend_subject: "[ACME] "
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink):
    g = seeded(tmp_path_factory.mktemp("header-section"), dovecot, rules={"70-rewrite-offers.yaml": REWRITE_RULE})
    g.start()
    yield g
    g.stop()


def test_a_line_without_a_colon_arrives_as_the_first_body_line(gw, sink):
    sink.clear()
    raw = (b"From: Alice <alice@acme.test>\r\nTo: einkauf@hamburg-tools.de\r\n"
           b"Subject: Offer with a stray line\r\nMessage-ID: <stray-line@acme.test>\r\n"
           b"Price list attached below\r\nX-After: a field after it is body text too\r\n\r\nbody\r\n")
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=tls_ctx(gw))
        conn.login("alice@acme.test", "alice-pw")
        conn.sendmail("alice@acme.test", ["einkauf@hamburg-tools.de"], raw)
    [got] = sink.wait_for(1, timeout=20)
    assert got.mail_from == "sales@acme.test"  # the rule's rewrite ran (HeaderBlock's edits)
    head, _, body = got.data.partition(b"\r\n\r\n")
    fields = HeaderBlock(got.data)
    assert fields.get("From") == "Alice Wang 王丽 | ACME Trading <sales@acme.test>"
    assert fields.get("Subject") == "[ACME] Offer with a stray line"
    assert b"Price list" not in head and b"X-After" not in head
    assert body == b"Price list attached below\r\nX-After: a field after it is body text too\r\n\r\nbody\r\n"
    assert dkim.verify(got.data, dnsfunc=dns_stub(gw))

    rec = ArchiveRecord.get(ArchiveRecord.message_id == "<stray-line@acme.test>")
    relayed = wait_until(lambda: list(ArchiveSighting.select().where(
        (ArchiveSighting.record == rec.id) & (ArchiveSighting.place == "relay:sent"))), what="relay:sent sighting")
    assert relayed
    archive = for_config(load(gw.config_path))
    stored = archive.read(rec)
    assert got.data.endswith(stored)  # what was relayed, as archived (Dovecot adds its Received on top)
    assert archive.read_original(rec).endswith(raw)  # and the client's bytes as submitted
