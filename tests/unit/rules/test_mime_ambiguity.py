"""MIME structure that readers read differently (gateway/rules/partheaders.py, through
as_postfix_reads' ``ambiguities``): found and described for a user; what real mail
programs write, RFC 2046's transport padding and identical duplicates are not."""

from __future__ import annotations

import email
import os
import re
from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rules.content import parse_content
from gateway.rules.headerblock import as_postfix_reads
from gateway.rules.partheaders import MAX_DEPTH, differing_field

LIMIT = 1 << 20
TOP = b"From: alice@acme.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
TEXT = b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"


def ambiguities(raw: bytes) -> list[str]:
    found: list[str] = []
    out, _ = as_postfix_reads(raw, LIMIT, found)
    assert out == as_postfix_reads(raw, LIMIT)[0]  # looking changes nothing of the reading
    return found


# -- duplicate fields ------------------------------------------------------------------------

def test_two_content_types_in_a_part_hide_an_attachment_from_the_rules() -> None:
    raw = (TOP + TEXT + b"--b1\r\nContent-Type: text/plain\r\nContent-Type: application/x-msdownload\r\n"
           b"Content-Disposition: attachment\r\n\r\nMZ\r\n--b1--\r\n")
    part = email.message_from_bytes(raw, policy=policy.compat32).get_payload(1)
    assert part.get_content_type() == "text/plain"  # the first: what the rules read
    assert ambiguities(raw) == ["two different Content-Type fields in MIME part 2"]


def test_two_content_types_at_the_top() -> None:
    raw = (b"From: alice@acme.test\r\nContent-Type: text/plain\r\nSubject: s\r\n"
           b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n" + TEXT + b"--b1--\r\n")
    assert ambiguities(raw) == ["two different Content-Type fields in the message header"]


@pytest.mark.parametrize(("name", "first", "second"), [
    (b"Content-Disposition", b"inline", b"attachment; filename=tool.exe"),
    (b"Content-Transfer-Encoding", b"7bit", b"base64"),
    (b"content-type", b"text/plain; charset=utf-8", b"text/plain; charset=gbk"),  # another charset, other text
])
def test_other_fields_that_choose_how_a_part_is_read(name: bytes, first: bytes, second: bytes) -> None:
    raw = (TOP + b"--b1\r\nContent-Type: text/plain\r\n" + name + b": " + first + b"\r\n"
           + name.upper() + b": " + second + b"\r\n\r\nx\r\n--b1--\r\n")
    if name == b"content-type":
        raw = raw.replace(b"Content-Type: text/plain\r\n", b"", 1)
    [found] = ambiguities(raw)
    assert found.startswith("two different Content-") and found.endswith(" fields in MIME part 1")


def test_nested_parts_are_named_by_their_imap_numbers() -> None:
    raw = (TOP + TEXT + b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n"
           b"--b2\r\nContent-Type: text/plain\r\n\r\nx\r\n"
           b"--b2\r\nContent-Type: text/html\r\nContent-Disposition: inline\r\n"
           b"Content-Disposition: attachment; filename=a.exe\r\n\r\nx\r\n--b2--\r\n--b1--\r\n")
    assert ambiguities(raw) == ["two different Content-Disposition fields in MIME part 2.2"]


def test_an_attached_messages_own_header_is_looked_at_too() -> None:
    raw = (TOP + TEXT + b"--b1\r\nContent-Type: message/rfc822\r\n\r\nFrom: x@y.test\r\n"
           b"Content-Type: text/plain\r\nContent-Type: application/octet-stream\r\n\r\nMZ\r\n--b1--\r\n")
    assert ambiguities(raw) == ["two different Content-Type fields in the header of the message attached as"
                                " MIME part 2"]


def test_identical_duplicates_and_other_duplicate_fields_are_read_alike() -> None:
    """Blanks, folding and the name's case aside the same value: every reader reads it so.
    MIME-Version twice (some programs write it in each part too) chooses nothing."""
    raw = (b"From: alice@acme.test\r\nMIME-Version: 1.0\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b1\r\ncontent-type: multipart/mixed;\r\n\tboundary=b1\r\n\r\n"
           b"--b1\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Type:  text/plain\r\n"
           b"X-Note: a\r\nX-Note: b\r\n\r\nx\r\n--b1--\r\n")
    assert ambiguities(raw) == []


def test_git_send_emails_two_content_types_mean_the_same() -> None:
    """git-send-email writes its own Content-Type below the patch's (seen on the kernel lists,
    where rspamd scores it MULTIPLE_UNIQUE_HEADERS): the same type and charset, written otherwise."""
    raw = (b"From: alice@acme.test\r\nSubject: [PATCH] fix\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=UTF-8\r\nContent-Type: text/plain; charset=\"utf-8\"\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe4\xbd\xa0\xe5\xa5\xbd\r\n")
    assert ambiguities(raw) == []


@pytest.mark.parametrize(("first", "second"), [
    (b"Content-Type: text/plain; charset=UTF-8; format=flowed",
     b"content-type: TEXT/Plain;format=\"flowed\"; CHARSET=utf-8"),
    (b"Content-Disposition: attachment; filename*=utf-8''a.pdf",
     b"Content-Disposition: ATTACHMENT; filename=\"a.pdf\""),
    (b"Content-Transfer-Encoding: 8bit", b"Content-Transfer-Encoding: 8BIT"),
    (b"Content-Type: a/b", b"Content-Type:\r\n a/b"),
])
def test_the_same_meaning_written_otherwise(first: bytes, second: bytes) -> None:
    assert differing_field([first + b"\r\n", second + b"\r\n"]) is None


def test_differing_field() -> None:
    assert differing_field([b"Content-Type: text/plain\r\n", b"Content-Type: text/plain; name=a.exe\r\n"])
    assert differing_field([b"Content-Disposition: attachment; filename=a.pdf\r\n",
                            b"Content-Disposition: attachment; filename=a.exe\r\n"]) == "Content-Disposition"
    assert differing_field([b"Content-Type: a/b\r\n", b"content-type: a/c\r\n"]) == "Content-Type"
    assert differing_field([b"Content-Type: a/b; boundary=A\r\n", b"Content-Type: a/b; boundary=a\r\n"])
    assert differing_field([b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.1\r\n"]) is None


# -- boundary lines --------------------------------------------------------------------------

@pytest.mark.parametrize("line", [b"--b1x", b"--b1 x", b"--b1-", b"--b1--x", b"--b1-- trailing words"])
def test_a_boundary_line_with_text_after_it(line: bytes) -> None:
    """Postfix (a prefix match) reads a boundary where the email package reads a text line:
    the rules would see no attachment after it, Postfix and prefix-matching programs one."""
    raw = TOP + TEXT + line + b"\r\nContent-Type: application/octet-stream; name=tool.exe\r\n\r\nMZ\r\n--b1--\r\n"
    assert len(parse_content(raw).attachments) == 0
    assert ambiguities(raw) == ["a boundary line with text after it in the message body"]


def test_an_inner_boundary_that_starts_the_outer_ones_lines() -> None:
    """``--b1`` starts with the inner ``--b``: the inner multipart's boundary for Postfix (it
    looks at the innermost first), the outer's for the email package."""
    raw = (TOP + b"--b1\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b1\r\nContent-Type: text/plain\r\n\r\ny\r\n--b1--\r\n")
    assert set(ambiguities(raw)) == {"a boundary line with text after it in MIME part 1"}


def test_transport_padding_after_a_boundary_is_a_boundary_for_every_reader() -> None:
    """RFC 2046 §5.1.1: blanks after a boundary (and after a close delimiter) are padding."""
    raw = (TOP + b"--b1 \t\r\nContent-Type: text/plain\r\n\r\nx\r\n--b1\t\r\nContent-Type: application/octet-stream;"
           b" name=tool.exe\r\n\r\nMZ\r\n--b1--   \r\nepilogue\r\n")
    assert ambiguities(raw) == []
    assert [a.name for a in parse_content(raw).attachments] == ["tool.exe"]


def test_a_text_line_that_merely_starts_with_dashes_is_not_a_boundary() -> None:
    raw = TOP + TEXT.replace(b"see attached", b"--\r\n-- b1\r\n---b1x\r\nsignature") + b"--b1--\r\n"
    assert ambiguities(raw) == []


def test_nesting_deeper_than_postfix_reads() -> None:
    raw = b"From: a@b.test\r\nContent-Type: multipart/mixed; boundary=d0\r\n\r\n"
    for i in range(MAX_DEPTH + 1):
        raw += b"--d%d\r\nContent-Type: multipart/mixed; boundary=d%d\r\n\r\n" % (i, i + 1)
    assert ambiguities(raw)[0].startswith(f"MIME parts nested deeper than {MAX_DEPTH} levels")


# -- what real programs write ------------------------------------------------------------------

def test_a_forwarded_message_with_its_own_content_type_is_not_ambiguous() -> None:
    raw = (TOP + TEXT + b"--b1\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
           b"From: x@y.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=inner\r\n\r\n"
           b"--inner\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 7bit\r\n\r\nx\r\n--inner--\r\n"
           b"--b1--\r\n")
    assert ambiguities(raw) == []


OUTLOOK = (b"From: alice@acme.test\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed;\r\n\tboundary=\"----=_NextPart_000_0001_01DB4A2B.12345670\"\r\n\r\n"
           b"This is a multi-part message in MIME format.\r\n\r\n"
           b"------=_NextPart_000_0001_01DB4A2B.12345670\r\nContent-Type: multipart/alternative;\r\n"
           b"\tboundary=\"----=_NextPart_001_0002_01DB4A2B.12345670\"\r\n\r\n\r\n"
           b"------=_NextPart_001_0002_01DB4A2B.12345670\r\nContent-Type: text/plain;\r\n\tcharset=\"gb2312\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nxOO6ww==\r\n\r\n"
           b"------=_NextPart_001_0002_01DB4A2B.12345670\r\nContent-Type: text/html;\r\n\tcharset=\"gb2312\"\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n<p>=C4=E3=BA=C3</p>\r\n\r\n"
           b"------=_NextPart_001_0002_01DB4A2B.12345670--\r\n\r\n"
           b"------=_NextPart_000_0001_01DB4A2B.12345670\r\nContent-Type: application/pdf;\r\n\tname=\"a.pdf\"\r\n"
           b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment;\r\n\tfilename=\"a.pdf\"\r\n\r\n"
           b"JVBERi0=\r\n\r\n------=_NextPart_000_0001_01DB4A2B.12345670--\r\n\r\n")


def test_an_outlook_style_message_is_not_ambiguous() -> None:
    """Outlook's boundaries differ in the middle, not at the end (no line starts with another's)."""
    assert ambiguities(OUTLOOK) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["text/plain", "text/html", "application/pdf", "message/rfc822"]),
                          st.text(max_size=40)), min_size=1, max_size=5),
       st.booleans())
def test_what_the_email_package_writes_is_never_ambiguous(parts: list[tuple[str, str]], nested: bool) -> None:
    msg = EmailMessage()
    msg["From"] = "alice@acme.test"
    msg.set_content("body")
    for ctype, text in parts:
        if ctype == "message/rfc822":
            inner = EmailMessage()
            inner["Subject"] = "fw"
            inner.set_content(text)
            inner.add_attachment(text.encode(), maintype="application", subtype="pdf", filename="a.pdf")
            msg.add_attachment(inner)
        elif ctype == "text/html" and nested and not msg.is_multipart():
            msg.add_alternative(f"<p>{text}</p>", subtype="html")
        else:
            maintype, subtype = ctype.split("/")
            if maintype == "text":
                msg.add_attachment(text, subtype=subtype)
            else:
                msg.add_attachment(text.encode(), maintype=maintype, subtype=subtype, filename="f.bin")
    raw = msg.as_bytes(policy=policy.SMTP)
    assert ambiguities(raw) == []


SOUP = st.sampled_from([
    b"Content-Type: text/plain", b"Content-Type: text/html", b"Content-Type: message/rfc822",
    b"Content-Type: multipart/mixed; boundary=b2", b"Content-Type: multipart/digest; boundary=b3",
    b"Content-Disposition: attachment; filename=secret-plan.exe", b"Content-Transfer-Encoding: base64",
    b"--b1", b"--b2", b"--b3", b"--b1--", b"--b2--", b"--b2 secret words", b"--b1\t", b"X-Old : v",
    b" folded", b"stray words", b"", b"MZ body",
])
#: Every description: a fixed sentence, field names and part numbers — nothing of the message.
DESCRIPTION = re.compile(
    r"(two different (Content-Type|Content-Disposition|Content-Transfer-Encoding) fields in"
    r" (the message header|(the header of )?(MIME part [0-9.]+|the message attached as MIME part [0-9.]+))"
    r"|a boundary line with text after it in (the message body|MIME part [0-9.]+"
    r"|the message attached as MIME part [0-9.]+)"
    r"|MIME parts nested deeper than [0-9]+ levels in .*)")


@settings(max_examples=int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "300")), deadline=None)
@given(lines=st.lists(SOUP, max_size=30))
def test_any_soup_is_described_in_words_of_the_gateways_own(lines: list[bytes]) -> None:
    """Whatever the lines: no exception, the reading unchanged by looking, and each finding
    a sentence of field names and part numbers (it is logged: nothing of the content)."""
    raw = TOP + b"".join(line + b"\r\n" for line in lines)
    for found in ambiguities(raw):
        assert DESCRIPTION.fullmatch(found), found
        assert "secret" not in found
