"""HeaderBlock: where the header section ends, and that no line of it is lost."""

from __future__ import annotations

import email
from email import policy

import pytest

from gateway.rules.headerblock import HeaderBlock

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
