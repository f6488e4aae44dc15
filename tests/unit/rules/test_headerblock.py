"""HeaderBlock: where the header section ends, and that no line of it is lost; as_postfix_reads:
the one reading of a submitted header section, which every reader then reads alike."""

from __future__ import annotations

import email
import os
from email import policy
from email.parser import BytesHeaderParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.archive.mime_walk import parse_headers
from gateway.rules.headerblock import HeaderBlock, HeaderSectionTooLarge, as_postfix_reads

GARBAGE = b"From: alice@acme.test\r\nno colon here\r\nSubject: after it\r\n\r\nbody\r\n"


def test_a_well_formed_message_comes_back_byte_for_byte() -> None:
    raw = b"From: a@acme.test\r\nSubject: hi\r\n  folded\r\nX-Obs : old\r\n\r\nbody\r\n\r\nmore\r\n"
    hb = HeaderBlock(raw)
    assert [n for n, _ in hb.fields] == ["from", "subject", "x-obs"]
    assert hb.get("Subject") == "hi folded" and hb.get("X-Obs") == "old"  # Postfix: obsolete "name :" is a field
    assert hb.to_bytes() == raw and not hb.separator_added


@pytest.mark.parametrize("line", [b"no colon here", b": empty name", b"Subj\xc3\xa9ct: 8-bit name",
                                  b"From alice@acme.test Tue Dec  1 12:00:00 2026", b"\x7fX: control"])
def test_a_line_that_is_no_field_starts_the_body_after_a_blank_line(line: bytes) -> None:
    """As Postfix's cleanup: the line and all after it are the body, one blank line put in
    before it. The line used to be dropped, and the fields after it kept as fields."""
    raw = b"From: alice@acme.test\r\n" + line + b"\r\nSubject: after it\r\n\r\nbody\r\n"
    hb = HeaderBlock(raw)
    assert [n for n, _ in hb.fields] == ["from"] and hb.get("Subject") is None
    assert hb.separator_added
    assert hb.to_bytes() == b"From: alice@acme.test\r\n\r\n" + line + b"\r\nSubject: after it\r\n\r\nbody\r\n"


def test_a_continuation_before_any_field_starts_the_body() -> None:
    hb = HeaderBlock(b" leading continuation\r\nFrom: alice@acme.test\r\n\r\nbody\r\n")
    assert hb.fields == [] and hb.to_bytes() == b"\r\n leading continuation\r\nFrom: alice@acme.test\r\n\r\nbody\r\n"


def test_a_body_without_any_blank_line_is_kept() -> None:
    """No CRLF CRLF anywhere: the whole message used to be read as the header section, and
    every body line without a colon vanished."""
    raw = b"From: alice@acme.test\r\nSubject: s\r\nHello there\r\nsee you: tomorrow\r\nbye\r\n"
    hb = HeaderBlock(raw)
    hb.set("Subject", "[Tag] s")
    assert hb.to_bytes() == (b"From: alice@acme.test\r\nSubject: [Tag] s\r\n\r\n"
                             b"Hello there\r\nsee you: tomorrow\r\nbye\r\n")


def test_edits_land_in_the_header_section_the_email_package_reads() -> None:
    hb = HeaderBlock(GARBAGE)
    hb.set("Subject", "new")
    hb.add("X-Policy", "export")
    out = hb.to_bytes()
    assert out == (b"From: alice@acme.test\r\nSubject: new\r\nX-Policy: export\r\n\r\n"
                   b"no colon here\r\nSubject: after it\r\n\r\nbody\r\n")
    msg = email.message_from_bytes(out, policy=policy.compat32)
    assert (msg["Subject"], msg["X-Policy"]) == ("new", "export") and not msg.defects
    assert msg.get_payload() == "no colon here\r\nSubject: after it\r\n\r\nbody\r\n"


def test_lf_only_lines_get_a_lf_blank_line() -> None:
    hb = HeaderBlock(b"From: a@acme.test\nno colon\nbody\n")
    assert hb.to_bytes() == b"From: a@acme.test\n\nno colon\nbody\n"


def test_headers_only() -> None:
    hb = HeaderBlock(b"From: a@acme.test\r\nSubject: s\r\n")
    assert hb.rest == b"" and hb.to_bytes() == b"From: a@acme.test\r\nSubject: s\r\n"
    assert HeaderBlock(b"").to_bytes() == b""


# -- as_postfix_reads: one reading on arrival ------------------------------------------------

LIMIT = 1 << 20


def email_package_fields(raw: bytes) -> list[tuple[str, str]]:
    """The top-level fields as the policy's parser (compat32) reads them: names lower-cased,
    values unfolded."""
    msg = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
    return [(n.lower(), " ".join(str(v).split())) for n, v in msg.items()]


def header_block_fields(raw: bytes) -> list[tuple[str, str]]:
    hb = HeaderBlock(raw)
    return [(n, " ".join(r.split(b":", 1)[1].decode("latin-1").split())) for n, r in hb.fields]


def test_a_well_formed_message_is_given_back_itself() -> None:
    raw = b"From: a@acme.test\r\nSubject: hi\r\n  folded\r\n\r\nbody\r\nX-Not : a field\r\n"
    out, body_at = as_postfix_reads(raw, LIMIT)
    assert out is raw and out[body_at:] == b"body\r\nX-Not : a field\r\n"


@pytest.mark.parametrize(("raw", "expected"), [
    # obsolete "name :" (cleanup's mime_state takes the blanks out); the email package ended the
    # header section there, so the From after it was seen by Postfix and the recipient only
    (b"From: alice@acme.test\r\nX-Note : x\r\nFrom: bob@acme.test\r\n\r\nb\r\n",
     b"From: alice@acme.test\r\nX-Note: x\r\nFrom: bob@acme.test\r\n\r\nb\r\n"),
    (b"Subject\t : s\r\n\r\nb", b"Subject: s\r\n\r\nb"),
    # a "From " line inside: the email package skipped it and read on; Postfix starts the body
    (b"From: alice@acme.test\r\nFrom bob Tue\r\nCc: lagos.imports@gmail.com\r\n\r\nb\r\n",
     b"From: alice@acme.test\r\n\r\nFrom bob Tue\r\nCc: lagos.imports@gmail.com\r\n\r\nb\r\n"),
    # ": value" (empty name): skipped by the email package, the body to Postfix
    (b"From: alice@acme.test\r\n: x\r\nTo: z@y.test\r\n\r\nb",
     b"From: alice@acme.test\r\n\r\n: x\r\nTo: z@y.test\r\n\r\nb"),
    # a plain stray line: both already ended there; the blank line is written out
    (b"From: a@acme.test\r\nstray\r\nTo: z@y.test\r\n\r\nb",
     b"From: a@acme.test\r\n\r\nstray\r\nTo: z@y.test\r\n\r\nb"),
    # leading mbox lines (smtpd: X-Mailbox-Line), then the fields go on
    (b"From alice Tue Dec  1\r\n>From x\r\nFrom: alice@acme.test\r\n\r\nb",
     b"X-Mailbox-Line: From alice Tue Dec  1\r\nX-Mailbox-Line: >From x\r\nFrom: alice@acme.test\r\n\r\nb"),
    # a continuation line first (smtpd: a blank line before it): all of it is the body
    (b" lead\r\nFrom: bob@acme.test\r\n\r\nb", b"\r\n lead\r\nFrom: bob@acme.test\r\n\r\nb"),
    (b"From x\r\n\tlead\r\nFrom: bob@acme.test\r\n\r\nb",
     b"X-Mailbox-Line: From x\r\n\r\n\tlead\r\nFrom: bob@acme.test\r\n\r\nb"),
    # no blank line at all: the obsolete field still repaired, the section runs to the end
    (b"From: a@acme.test\r\nX : y\r\n", b"From: a@acme.test\r\nX: y\r\n"),
])
def test_the_header_section_is_written_as_postfix_reads_it(raw: bytes, expected: bytes) -> None:
    out, body_at = as_postfix_reads(raw, LIMIT)
    assert out == expected
    assert out[body_at:] == HeaderBlock(out).rest.removeprefix(b"\r\n")  # the body
    assert email_package_fields(out) == header_block_fields(out)
    assert as_postfix_reads(out, LIMIT) == (out, body_at)


def test_the_spoofed_from_after_an_obsolete_field_is_seen_by_the_policys_parser() -> None:
    raw = b"From: alice@acme.test\r\nX-Note : x\r\nFrom: bob@acme.test\r\n\r\nb\r\n"
    assert email_package_fields(raw) == [("from", "alice@acme.test")]  # what the policy used to read
    out, body_at = as_postfix_reads(raw, LIMIT)
    headers = parse_headers(out[:body_at]) or BytesHeaderParser(policy=policy.compat32).parsebytes(out[:body_at])
    assert headers.get_all("From") == ["alice@acme.test", "bob@acme.test"]


def test_a_header_section_past_the_limit_is_refused() -> None:
    fields = b"X-Fill: " + b"x" * 70 + b"\r\n"
    raw = fields * 20 + b"To: lagos.imports@gmail.com\r\n\r\nbody"
    with pytest.raises(HeaderSectionTooLarge):
        as_postfix_reads(raw, 1000)
    with pytest.raises(HeaderSectionTooLarge):
        as_postfix_reads(b"X-Old : y\r\n" + raw, 1000)  # the same on the slow path
    assert as_postfix_reads(raw, 4000)[0] is raw
    with pytest.raises(HeaderSectionTooLarge):
        as_postfix_reads(b"From x\r\n" * 200 + b"\r\nbody", 1000)  # mbox lines count too
    assert as_postfix_reads(b"Subject: s\r\n\r\n" + b"body line\r\n" * 500, 100)[1] == 14  # the body may be long


LINES = st.sampled_from([
    b"From: alice@acme.test", b"To: z@y.test", b"Cc: lagos.imports@gmail.com", b"X-Old : obsolete",
    b"Subject\t:tab", b" folded", b"\t", b"   ", b"stray words", b": empty name", b"From bob Tue",
    b">From bob", b"From:x", b"Subj\xc3\xa9ct: 8-bit", b"\x7fX: control", b"X-Empty:", b"",
])


@settings(max_examples=int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "300")), deadline=None)
@given(lines=st.lists(LINES, max_size=12), crlf=st.booleans())
def test_after_it_the_policys_parser_and_postfixs_reading_agree(lines: list[bytes], crlf: bool) -> None:
    eol = b"\r\n" if crlf else b"\n"
    raw = b"".join(line + eol for line in lines) + eol + b"body" + eol
    out, body_at = as_postfix_reads(raw, LIMIT)
    with_trace = b"Received: by gw" + eol + out  # the handler puts its trace fields on top
    assert email_package_fields(with_trace) == header_block_fields(with_trace)
    assert email_package_fields(out[:body_at]) == header_block_fields(out)
    walked = parse_headers(b"Received: by gw" + eol + out[:body_at])  # the handler's header view: never declined
    assert [(n.lower(), " ".join(v.split())) for n, v in walked.items()] == header_block_fields(with_trace)
    assert as_postfix_reads(out, LIMIT) == (out, body_at)
    assert HeaderBlock(out).to_bytes() == out  # nothing left for the signer to repair
