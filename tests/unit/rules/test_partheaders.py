"""MIME part header sections written as Postfix's cleanup writes them (gateway/rules/partheaders.py,
through as_postfix_reads): what the rules read of the parts is what the recipient sees."""

from __future__ import annotations

import email
import os
from email import errors, policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rules.content import parse_content
from gateway.rules.headerblock import as_postfix_reads

LIMIT = 1 << 20
TOP = b"From: alice@acme.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
EXE = b"Content-Disposition: attachment; filename=tool.exe\r\n\r\nMZ\r\n"


def read(raw: bytes) -> bytes:
    out, _ = as_postfix_reads(raw, LIMIT)
    assert as_postfix_reads(out, LIMIT)[0] is out  # nothing left to repair
    return out


def header_defects(raw: bytes) -> list[str]:
    """The header-section defects the email package notes in any part."""
    kinds = (errors.MissingHeaderBodySeparatorDefect, errors.MisplacedEnvelopeHeaderDefect,
             errors.FirstHeaderLineIsContinuationDefect, errors.InvalidHeaderDefect)
    msg = email.message_from_bytes(raw, policy=policy.compat32)
    return [type(d).__name__ for part in msg.walk() for d in part.defects if isinstance(d, kinds)]


def test_a_well_formed_multipart_is_given_back_itself() -> None:
    raw = (TOP + b"preamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nsee: attached\r\nNote : text\r\n"
           b"--b1\r\nContent-Type: message/rfc822\r\n\r\nFrom: x@y.test\r\nSubject: inner\r\n\r\ninner body\r\n"
           b"--b1--\r\nepilogue\r\n")
    assert as_postfix_reads(raw, LIMIT)[0] is raw


def test_an_obsolete_content_type_in_a_part_no_longer_hides_its_attachment() -> None:
    raw = (TOP + b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
           b"--b1\r\nContent-Type : application/octet-stream\r\n" + EXE + b"--b1--\r\n")
    assert parse_content(raw).attachments == []  # what the rules used to read
    out = read(raw)
    assert b"\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition" in out
    assert [a.name for a in parse_content(out).attachments] == ["tool.exe"]
    assert header_defects(raw) and not header_defects(out)


@pytest.mark.parametrize("line", [b"stray words", b"From bob Tue", b": x", b" leading continuation"])
def test_a_part_header_line_that_is_no_field_starts_the_parts_body(line: bytes) -> None:
    """The email package skipped a ``From `` or ``: x`` line and read the Content-Disposition
    after it; Postfix starts the part's body there: no attachment for the recipient."""
    raw = TOP + b"--b1\r\n" + (b"" if line.startswith(b" ") else b"Content-Type: text/plain\r\n") + line + b"\r\n"
    raw += EXE + b"--b1--\r\n"
    out = read(raw)
    assert b"\r\n\r\n" + line + b"\r\nContent-Disposition" in out
    assert parse_content(out).attachments == [] and not header_defects(out)


def test_nested_multiparts_messages_and_digests() -> None:
    raw = (TOP + b"--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n"
           b"--b2\r\nContent-Type : text/plain\r\n\r\nplain\r\n--b2\r\nContent-Type: text/html\r\nstray\r\n\r\nh\r\n"
           b"--b1\r\nContent-Type: message/rfc822\r\n\r\n"
           b"From : x@y.test\r\nContent-Type: multipart/mixed; boundary=b3\r\n"
           b"\r\n--b3\r\nContent-Type : application/octet-stream\r\n" + EXE
           + b"--b3--\r\n--b1\r\nContent-Type: multipart/digest; boundary=b4\r\n\r\n"
           b"--b4\r\nSubject : in a digest\r\n\r\ndigest body\r\n--b4--\r\n--b1--\r\n")
    out = read(raw)
    assert b"--b2\r\nContent-Type: text/plain\r\n" in out
    assert b"Content-Type: text/html\r\n\r\nstray\r\n" in out
    assert b"\r\nFrom: x@y.test\r\n" in out  # the embedded message's header section
    assert b"--b3\r\nContent-Type: application/octet-stream\r\n" in out
    assert b"--b4\r\nSubject: in a digest\r\n" in out  # a digest's part is a message
    assert [a.name for a in parse_content(out).attachments] == ["tool.exe"]
    assert not header_defects(out)


def test_an_outer_boundary_closes_the_inner_multipart() -> None:
    raw = (TOP + b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n--b2\r\nContent-Type: text/plain\r\n"
           b"\r\nno close for b2\r\n--b1\r\nContent-Type : application/octet-stream\r\n" + EXE
           + b"--b2\r\nX-After : b2 is closed\r\n\r\n--b1--\r\n")
    out = read(raw)
    assert b"--b1\r\nContent-Type: application/octet-stream\r\n" in out
    assert b"--b2\r\nX-After : b2 is closed\r\n" in out  # body text of the .exe part: b2 was closed
    assert [a.name for a in parse_content(out).attachments] == ["tool.exe"]


def test_a_top_level_message_rfc822_body_is_a_header_section() -> None:
    raw = (b"From: alice@acme.test\r\nContent-Type: message/rfc822\r\n\r\n"
           b"From : bob@acme.test\r\nSubject: fw\r\n\r\nb\r\n")
    assert read(raw).endswith(b"\r\n\r\nFrom: bob@acme.test\r\nSubject: fw\r\n\r\nb\r\n")


PART_LINES = st.sampled_from([
    b"Content-Type: text/plain", b"Content-Type : application/octet-stream", b"Content-Disposition: attachment; "
    b"filename=a.exe", b"X-Old : v", b" folded", b"stray words", b": empty", b"From bob Tue", b"\t",
])
ANY_LINES = st.sampled_from([
    b"Content-Type: text/plain", b"Content-Type : application/octet-stream", b"Content-Type: message/rfc822",
    b"Content-Type: multipart/mixed; boundary=b2", b"Content-Type: multipart/digest; boundary=b3", b"--b1", b"--b2",
    b"--b3", b"--b1--", b"--b2--", b"--b2 trailing", b"X-Old : v", b" folded", b"stray words", b": empty",
    b"From bob Tue", b"", b"MZ body",
])


@settings(max_examples=int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "200")), deadline=None)
@given(parts=st.lists(st.lists(PART_LINES, max_size=5), min_size=1, max_size=4), blank=st.booleans())
def test_after_it_the_email_package_reads_every_part_header_section_plainly(parts: list[list[bytes]],
                                                                            blank: bool) -> None:
    raw = TOP
    for lines in parts:
        raw += b"--b1\r\n" + b"".join(line + b"\r\n" for line in lines) + (b"\r\n" if blank else b"") + b"MZ body\r\n"
    raw += b"--b1--\r\n"
    out = read(raw)
    assert not header_defects(out)
    msg = email.message_from_bytes(out, policy=policy.compat32)
    assert len(msg.get_payload()) == len(parts)


@settings(max_examples=int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "500")), deadline=None)
@given(rest=st.text(alphabet='ab "=;<>\\*\t', max_size=30))
def test_the_boundary_is_the_one_the_email_package_reads(rest: str) -> None:
    from gateway.mimeparts import SafeParamsMessage
    from gateway.rules.partheaders import _boundary

    text = "multipart/mixed; boundary" + rest
    msg = SafeParamsMessage()
    msg["Content-Type"] = text
    assert _boundary(text) == msg.get_boundary()


@settings(max_examples=int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "300")), deadline=None)
@given(lines=st.lists(ANY_LINES, max_size=30), crlf=st.booleans())
def test_any_line_soup_is_read_once_for_all(lines: list[bytes], crlf: bool) -> None:
    """Whatever the lines: no exception, every line kept (only blank lines and the blanks before
    a colon change), and nothing left to repair."""
    eol = b"\r\n" if crlf else b"\n"
    raw = TOP.replace(b"\r\n", eol) + b"".join(line + eol for line in lines)
    out, _ = as_postfix_reads(raw, LIMIT)
    assert as_postfix_reads(out, LIMIT)[0] is out
    def kept(b: bytes) -> list[bytes]:
        return [x.replace(b" ", b"").replace(b"\t", b"") for x in b.split(eol) if x.strip()]
    assert kept(out) == kept(raw)
    parse_content(out)  # the rules read it


def test_a_mixed_rfc2231_parameter_list_does_not_stop_the_walk() -> None:
    """The email package raises on ``name*=…; name*0*=…`` (the SMTP path answered 451)."""
    raw = (b"From: alice@acme.test\r\nContent-Type: multipart/mixed; boundary=b1; name*=utf-8''%E6%8A%A5; "
           b"name*0*=utf-8''x\r\n\r\n--b1\r\nContent-Type : text/plain\r\n\r\nx\r\n--b1--\r\n")
    assert b"--b1\r\nContent-Type: text/plain\r\n" in read(raw)
