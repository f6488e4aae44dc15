"""A header line that is no field, through a running gateway that rewrites the sender, to
the sink: the line arrives (it used to be dropped by the header edits), as the first body
line after the blank line Postfix's cleanup would put before it; DKIM verifies on what
arrives, and the archive holds what was relayed.

One reading of the header section (gateway/rules/headerblock.py as_postfix_reads): crafted
header sections that the policy's parser (the email package) used to read otherwise than
Postfix and the recipient's mail program — a spoofed From or a colleague's customer in Cc
after an obsolete ``name :`` field (the email package stopped there), a Cc after a ``From ``
line (the email package read on, Postfix starts the body), a Subject or an attachment the
rules could not see — are decided on the fields that arrive, and what arrives at the sink is
read alike by the email package and by Postfix's reading."""

from __future__ import annotations

import email
import json
import re
import smtplib
import urllib.request
from email import policy

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

NO_EXE_RULE = """
rules:
  - name: no-exe-names
    priority: 30
    conditions:
      attachment-name: ['*.exe']
    actions:
      - reject: {reason: "no .exe attachments", code: 550, enhanced: 5.7.1}
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink):
    g = seeded(tmp_path_factory.mktemp("header-section"), dovecot, rules={"70-rewrite-offers.yaml": REWRITE_RULE,
                                                                                       "71-no-exe.yaml": NO_EXE_RULE})
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


# -- one reading: what the policy decides on is what arrives ----------------------------------

def send(gw, raw: bytes, rcpts: tuple[str, ...] = ("einkauf@hamburg-tools.de",)) -> None:
    """Alice submits ``raw``; raises smtplib.SMTPDataError on a refusal."""
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=tls_ctx(gw))
        conn.login("alice@acme.test", "alice-pw")
        conn.sendmail("alice@acme.test", list(rcpts), raw)


def refused(gw, raw: bytes) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPDataError) as err:
        send(gw, raw)
    return err.value.smtp_code, err.value.smtp_error


def fields_two_ways(data: bytes) -> list[tuple[str, str]]:
    """The top-level fields of ``data`` as the policy's parser (compat32) reads them, asserted
    to be the fields Postfix's reading (HeaderBlock) finds."""
    msg = email.message_from_bytes(data, policy=policy.compat32)
    parsed = [(n.lower(), " ".join(str(v).split())) for n, v in msg.items()]
    hb = HeaderBlock(data)
    assert parsed == [(n, " ".join(r.split(b":", 1)[1].decode("latin-1").split())) for n, r in hb.fields]
    assert not hb.separator_added  # nothing left for a reader to repair its own way
    return parsed


def record(message_id: str) -> ArchiveRecord:
    return ArchiveRecord.get(ArchiveRecord.message_id == message_id)


def test_a_spoofed_from_after_an_obsolete_field_is_refused(gw, sink):
    """The email package ended the header section at ``X-Note : x`` and saw only Alice's From;
    Postfix (and so the recipient) reads ``X-Note:`` as a field and shows Bob's From too."""
    sink.clear()
    code, text = refused(gw, b"From: alice@acme.test\r\nX-Note : x\r\nFrom: Bob <bob@acme.test>\r\n"
                             b"To: einkauf@hamburg-tools.de\r\nSubject: spoof\r\n\r\nhi\r\n")
    assert code == 550 and b"5.7.1" in text and b"bob@acme.test" in text
    code, text = refused(gw, b"From: alice@acme.test\r\nX-Note\t: x\r\nSender: bob@acme.test\r\n\r\nhi\r\n")
    assert code == 550 and b"bob@acme.test" in text
    send(gw, b"From: alice@acme.test\r\nSubject: marker\r\nMessage-ID: <marker-spoof@acme.test>\r\n\r\nm\r\n")
    [got] = sink.wait_for(1, timeout=20)  # nothing of the refused ones went out
    assert b"<marker-spoof@acme.test>" in got.data


def test_a_colleagues_customer_in_cc_after_an_obsolete_field_is_refused_by_send_conflict(gw, sink):
    raw = (b"From: alice@acme.test\r\nTo: einkauf@hamburg-tools.de\r\nX-Note : x\r\n"
           b"Cc: Chinedu <lagos.imports@gmail.com>\r\nSubject: conflict\r\n"
           b"Message-ID: <obsolete-cc@acme.test>\r\n\r\nhi\r\n")
    code, text = refused(gw, raw)
    assert code == 550 and b"lagos.imports@gmail.com" in text
    rec = record("<obsolete-cc@acme.test>")  # the refusal's record: the fields the policy read
    assert rec.verdict == "refused" and rec.subject == "conflict"
    assert [s["rule"] for s in json.loads(rec.trace) if s["hit"]] == ["send-conflict"]
    archive = for_config(load(gw.config_path))
    assert b"\r\nX-Note: x\r\n" in archive.read(rec)  # the message decided on
    assert archive.read_original(rec).endswith(raw)  # and the client's bytes as submitted


def test_a_cc_after_a_from_line_is_body_text_for_the_policy_as_for_the_recipient(gw, sink):
    """The email package skipped the ``From `` line and read the Cc (send-conflict refused a
    message whose recipient would see no Cc); Postfix starts the body at that line."""
    sink.clear()
    raw = (b"From: alice@acme.test\r\nTo: einkauf@hamburg-tools.de\r\nSubject: mid from line\r\n"
           b"Message-ID: <mid-from@acme.test>\r\nFrom bob Tue Dec  1 12:00:00 2026\r\n"
           b"Cc: lagos.imports@gmail.com\r\n\r\nhi\r\n")
    send(gw, raw)
    [got] = sink.wait_for(1, timeout=20)
    fields = fields_two_ways(got.data)
    assert "cc" not in dict(fields) and dict(fields)["subject"] == "mid from line"
    assert got.data.endswith(b"<mid-from@acme.test>\r\n\r\nFrom bob Tue Dec  1 12:00:00 2026\r\n"
                             b"Cc: lagos.imports@gmail.com\r\n\r\nhi\r\n")
    assert got.rcpt_tos == ["einkauf@hamburg-tools.de"]
    rec = record("<mid-from@acme.test>")
    assert rec.verdict == "accepted" and rec.subject == "mid from line"
    assert dkim.verify(got.data, dnsfunc=dns_stub(gw))


def test_an_obsolete_subject_field_is_seen_by_the_rules_and_arrives_plain_and_signed(gw, sink):
    """The rewrite rule's subject-regex did not see ``Subject :`` (body to the email package),
    dkimpy could not read it (sent unsigned); Postfix reads it as the Subject."""
    sink.clear()
    raw = (b"From: Alice <alice@acme.test>\r\nTo: einkauf@hamburg-tools.de\r\n"
           b"Subject : Offer with a stray line, obsolete\r\nMessage-ID : <obsolete-subject@acme.test>\r\n"
           b"\r\nbody\r\n")
    send(gw, raw)
    [got] = sink.wait_for(1, timeout=20)
    assert got.mail_from == "sales@acme.test"  # the rule matched
    fields = dict(fields_two_ways(got.data))
    assert fields["subject"] == "[ACME] Offer with a stray line, obsolete"
    assert fields["message-id"] == "<obsolete-subject@acme.test>"  # not a second one of the gateway's
    assert b"\r\nMessage-ID: <obsolete-subject@acme.test>\r\n" in got.data
    assert dkim.verify(got.data, dnsfunc=dns_stub(gw))
    rec = record("<obsolete-subject@acme.test>")
    assert rec.subject == "Offer with a stray line, obsolete"
    assert for_config(load(gw.config_path)).read_original(rec).endswith(raw)


def test_an_attachment_after_an_obsolete_field_is_seen_by_the_attachment_rules(gw, sink):
    """The email package read the message as text/plain (its header section ended at the
    obsolete field), so no rule saw the .exe the recipient's program shows."""
    sink.clear()
    code, text = refused(gw, b"From: alice@acme.test\r\nTo: einkauf@hamburg-tools.de\r\nX-Note : x\r\n"
                             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
                             b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
                             b"--b1\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Disposition: attachment; filename=tool.exe\r\n\r\nMZ\r\n--b1--\r\n")
    assert code == 550 and b"no .exe attachments" in text


def test_a_leading_mbox_line_becomes_a_field_and_the_fields_after_it_stay_fields(gw, sink):
    """Postfix's smtpd turns a leading ``From `` line into X-Mailbox-Line; the gateway's
    Received on top had made it a line that is no field, and every field of the client body
    text to Postfix's reading (while the policy read them as fields)."""
    sink.clear()
    raw = (b"From alice@acme.test Tue Dec  1 12:00:00 2026\r\nFrom: alice@acme.test\r\n"
           b"To: einkauf@hamburg-tools.de\r\nSubject: mbox line\r\nMessage-ID: <mbox-line@acme.test>\r\n"
           b"\r\nhi\r\n")
    send(gw, raw)
    [got] = sink.wait_for(1, timeout=20)
    fields = dict(fields_two_ways(got.data))
    assert fields["x-mailbox-line"] == "From alice@acme.test Tue Dec 1 12:00:00 2026"
    assert (fields["from"], fields["subject"]) == ("alice@acme.test", "mbox line")
    assert dkim.verify(got.data, dnsfunc=dns_stub(gw))
    code, text = refused(gw, b"From x\r\nFrom: bob@acme.test\r\n\r\nhi\r\n")  # and its From is checked
    assert code == 550 and b"bob@acme.test" in text


def test_a_header_section_over_1_mb_is_refused(gw, sink):
    """The policy used to read the first 1 MB of the header section only: a Cc past it was
    relayed unseen. Such a section is refused now (Postfix would relay it: no client sends it)."""
    fill = b"X-Fill: " + b"x" * 70 + b"\r\n"
    code, text = refused(gw, b"From: alice@acme.test\r\n" + fill * 14000 + b"Cc: lagos.imports@gmail.com\r\n\r\nhi\r\n")
    assert code == 552 and b"5.3.4" in text and b"header section" in text


PART_EXE = (b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b"--b1\r\nContent-Type : application/octet-stream\r\n"
            b"Content-Disposition: attachment; filename=tool.exe\r\n\r\nMZ\r\n--b1--\r\n")


def test_an_attachment_behind_an_obsolete_field_in_its_part_header_is_seen(gw, sink):
    """``Content-Type :`` ended the part's header section for the email package (a text part,
    no attachment for the rules); Postfix writes it ``Content-Type:`` — tool.exe arrives."""
    code, text = refused(gw, b"From: alice@acme.test\r\nTo: einkauf@hamburg-tools.de\r\nMIME-Version: 1.0\r\n"
                             b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n" + PART_EXE)
    assert code == 550 and b"no .exe attachments" in text


def test_a_stray_line_in_a_part_header_arrives_after_a_blank_line(gw, sink):
    sink.clear()
    raw = (b"From: alice@acme.test\r\nTo: einkauf@hamburg-tools.de\r\nSubject: part stray\r\n"
           b"Message-ID: <part-stray@acme.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"
           b"\r\n--b1\r\nContent-Type: text/plain\r\nFrom bob Tue\r\n"
           b"Content-Disposition: attachment; filename=tool.exe\r\n\r\nMZ\r\n--b1--\r\n")
    send(gw, raw)  # the Content-Disposition after the "From " line is body text, for the rules too
    [got] = sink.wait_for(1, timeout=20)
    assert got.data.endswith(b"\r\n--b1\r\nContent-Type: text/plain\r\n\r\nFrom bob Tue\r\n"
                             b"Content-Disposition: attachment; filename=tool.exe\r\n\r\nMZ\r\n--b1--\r\n")
    msg = email.message_from_bytes(got.data, policy=policy.compat32)
    assert [d for part in msg.walk() for d in part.defects] == []
    assert dkim.verify(got.data, dnsfunc=dns_stub(gw))
    assert for_config(load(gw.config_path)).read_original(record("<part-stray@acme.test>")).endswith(raw)


# -- MIME structure that readers read differently: refused, never guessed ---------------------

def refused_count(gw) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
    found = re.search(r'mailgate_smtp_messages_total\{verdict="refused"\} ([0-9.e+]+)', body)
    return float(found.group(1)) if found else 0.0


def mime_message(message_id: str, body: bytes, top: bytes = b"Content-Type: multipart/mixed; boundary=b1\r\n") -> bytes:
    return (b"From: alice@acme.test\r\nTo: einkauf@hamburg-tools.de\r\nSubject: quarterly figures\r\n"
            b"Message-ID: <" + message_id.encode() + b"@acme.test>\r\nMIME-Version: 1.0\r\n" + top + b"\r\n" + body)


TEXT_PART = b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
AMBIGUOUS = {
    "two-ctypes-part": (TEXT_PART + b"--b1\r\nContent-Type: text/plain\r\nContent-Type: application/x-msdownload;"
                        b" name=tool.exe\r\n\r\nMZ\r\n--b1--\r\n", None,
                        "two different Content-Type fields in MIME part 2"),
    "two-ctypes-top": (TEXT_PART + b"--b1--\r\n", b"Content-Type: text/plain\r\nContent-Type: multipart/mixed;"
                       b" boundary=b1\r\n", "two different Content-Type fields in the message header"),
    "two-dispositions": (TEXT_PART + b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: inline"
                         b"\r\nContent-Disposition: attachment; filename=tool.exe\r\n\r\nMZ\r\n--b1--\r\n", None,
                         "two different Content-Disposition fields in MIME part 2"),
    "two-encodings": (b"--b1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 7bit\r\n"
                      b"Content-Transfer-Encoding: base64\r\n\r\naGk=\r\n--b1--\r\n", None,
                      "two different Content-Transfer-Encoding fields in MIME part 1"),
    "boundary-text": (TEXT_PART + b"--b1 hidden\r\nContent-Type: application/octet-stream; name=tool.exe\r\n\r\n"
                      b"MZ\r\n--b1--\r\n", None, "a boundary line with text after it in the message body"),
}


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_mime_structure_is_refused_archived_logged_and_counted(gw, sink, case):
    """What the rules read (the email package: the first field, no boundary) is not what
    Postfix and some mail programs show: refused with a permanent reply that says what and
    where, archived as refused with the client's bytes and a trace entry, logged without
    the message's content, counted as refused — and nothing reaches the sink."""
    body, top, what = AMBIGUOUS[case]
    raw = mime_message(f"ambiguous-{case}", body, *([top] if top else []))
    sink.clear()
    before, mark = refused_count(gw), len(gw.log_lines)
    code, text = refused(gw, raw)
    assert (code, text.decode()) == (550, f"5.6.0 Ambiguous MIME structure: {what}; refused")
    rec = record(f"<ambiguous-{case}@acme.test>")
    assert rec.verdict == "refused" and rec.subject == "quarterly figures"
    assert [(s["rule"], s["hit"], s["why"]) for s in json.loads(rec.trace)] == [("ambiguous-mime", True, what)]
    archive = for_config(load(gw.config_path))
    assert archive.read(rec).endswith(raw)  # well-formed otherwise: what was decided on is what was sent
    line = gw.wait_for_log("reason=ambiguous-mime", after=mark)
    assert what in line and "quarterly" not in line and "see attached" not in line
    assert "verdict=reject rule=ambiguous-mime" in gw.wait_for_log("verdict=reject", after=mark)
    assert refused_count(gw) == before + 1
    send(gw, mime_message("ambiguous-marker", TEXT_PART + b"--b1--\r\n"))
    [got] = sink.wait_for(1, timeout=20)  # only the marker went out
    assert b"<ambiguous-marker@acme.test>" in got.data


def test_ambiguous_structure_behind_a_repaired_header_keeps_the_submitted_bytes(gw, sink):
    raw = (b"From: alice@acme.test\r\nX-Note : x\r\nMessage-ID: <ambiguous-repaired@acme.test>\r\n"
           b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\nContent-Type: text/plain\r\n"
           b"Content-Type: text/html\r\n\r\nx\r\n--b1--\r\n")
    code, text = refused(gw, raw)
    assert code == 550 and b"5.6.0 Ambiguous MIME structure" in text
    rec = record("<ambiguous-repaired@acme.test>")
    archive = for_config(load(gw.config_path))
    assert rec.verdict == "refused" and b"\r\nX-Note: x\r\n" in archive.read(rec)
    assert archive.read_original(rec).endswith(raw)


NEAR_MISSES = {
    "transport-padding": b"--b1 \t\r\nContent-Type: text/plain\r\n\r\nx\r\n--b1\t\r\nContent-Type: application/pdf;"
                         b" name=a.pdf\r\n\r\nJVBERi0=\r\n--b1--  \r\n",
    "mime-version-twice": b"--b1\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nx\r\n--b1--\r\n",
    "forwarded": TEXT_PART + b"--b1\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
                 b"From: x@y.test\r\nSubject: fw\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=in\r\n"
                 b"\r\n--in\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nx\r\n--in--\r\n--b1--\r\n",
    "same-value-twice": b"--b1\r\nContent-Type: text/plain; charset=UTF-8\r\n"
                        b"Content-type: text/plain; charset=\"utf-8\"\r\n\r\nx\r\n--b1--\r\n",  # git-send-email's
}


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_legitimate_near_misses_are_delivered(gw, sink, case):
    """RFC 2046's transport padding after a boundary, MIME-Version in a part (and twice at the
    top), a forwarded message with its own Content-Type, a Content-Type repeated with the same
    meaning (git-send-email writes ``charset=UTF-8`` and ``charset="utf-8"``): every reader
    reads them alike."""
    sink.clear()
    top = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"
    raw = mime_message(f"near-{case}", NEAR_MISSES[case], top)
    send(gw, raw)
    [got] = sink.wait_for(1, timeout=20)
    assert got.data.endswith(raw[raw.index(b"\r\n\r\n"):])  # the body as sent
    assert record(f"<near-{case}@acme.test>").verdict == "accepted"
    assert dkim.verify(got.data, dnsfunc=dns_stub(gw))
