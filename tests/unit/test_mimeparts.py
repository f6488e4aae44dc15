"""A part's disposition and file name whatever the client wrote: bare UTF-8 or GBK bytes in
the header (as phone apps and older Foxmail/Outlook builds send them), RFC 2231, RFC 2047."""

from __future__ import annotations

import email
from email.policy import compat32

import pytest

from gateway.mimeparts import decode_8bit, disposition, filename, header_str

NAME = "报价单 2026.pdf"


def message(part_headers: bytes) -> bytes:
    return (b"From: alice@acme.test\r\nTo: buyer@hamburg-tools.de\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
            b"--b\r\n" + part_headers + b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n")


def last_part(raw: bytes) -> email.message.Message:
    return list(email.message_from_bytes(raw, policy=compat32).walk())[-1]


@pytest.mark.parametrize("codec", ["utf-8", "gbk"])
def test_bare_8bit_file_names_are_decoded(codec):
    raw = message(f'Content-Type: application/pdf; name="{NAME}"\r\n'
                  f'Content-Disposition: attachment; filename="{NAME}"\r\n'.encode(codec))
    part = last_part(raw)
    assert not isinstance(part.get("Content-Disposition"), str)  # what compat32 answers: a Header
    assert disposition(part) == "attachment"
    assert filename(part) == NAME
    assert header_str(part, "Content-Type") == f'application/pdf; name="{NAME}"'


def test_rfc2231_and_rfc2047_names_and_a_name_only_in_content_type():
    rfc2231 = last_part(message(
        b"Content-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''%E6%8A%A5%E4%BB%B7%E5%8D%95.pdf\r\n"))
    assert filename(rfc2231) == "报价单.pdf"
    rfc2047 = last_part(message(b'Content-Type: application/pdf; name="=?UTF-8?B?5oql5Lu35Y2VLnBkZg==?="\r\n'))
    assert filename(rfc2047) == "=?UTF-8?B?5oql5Lu35Y2VLnBkZg==?="  # left for the caller's header decoding
    assert disposition(rfc2047) == ""
    bare = last_part(message('Content-Type: application/pdf; name="报价单.pdf"\r\n'.encode()))
    assert filename(bare) == "报价单.pdf" and disposition(bare) == ""


def test_no_name_and_a_malformed_parameter_list():
    plain = last_part(message(b"Content-Type: application/octet-stream\r\n"))
    assert filename(plain) == "" and header_str(plain, "Content-Disposition") == ""
    broken = last_part(message(b'Content-Disposition: attachment; filename="unterminated\r\n'))
    assert disposition(broken) == "attachment"
    assert isinstance(filename(broken), str)  # never raises


def test_decode_8bit_falls_back_from_utf8_to_gb18030_to_cp1252():
    assert decode_8bit("报价".encode()) == "报价"
    assert decode_8bit("报价".encode("gbk")) == "报价"
    assert decode_8bit(b"caf\xe9") == "café"  # neither UTF-8 nor GB18030
    assert decode_8bit(b"\x81") == "\ufffd"  # nothing decodes it: replaced, never an error
