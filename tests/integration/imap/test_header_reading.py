"""The IMAP side's reading of a header section (gateway/imap/headers.iter_fields, which the
tagging uses) against Dovecot's own (HEADER.FIELDS, ENVELOPE), for the header sections the
submission side rewrites on arrival (gateway/rules/headerblock.as_postfix_reads). Dovecot,
unlike Postfix, does not end the header section at a line that is no field: it skips the
line and reads on, and reads ``name :`` as the field ``name``; so does iter_fields. Mail
fetched through the proxy may come from anywhere, so iter_fields follows Dovecot, not
Postfix."""

from __future__ import annotations

import re

import pytest
from imapclient import IMAPClient

from gateway.imap.headers import iter_fields

pytestmark = pytest.mark.integration

HEADERS = [
    b"From: alice@acme.test\r\nstray line\r\nTo: t1@x.test\r\nSubject: s1\r\n\r\n",
    b"From: alice@acme.test\r\nX-Note : x\r\nTo : t2@x.test\r\nSubject\t: s2\r\n\r\n",
    b"From: alice@acme.test\r\nFrom bob Tue Dec  1 12:00:00 2026\r\nTo: t3@x.test\r\nSubject: s3\r\n\r\n",
    b"From: alice@acme.test\r\n: x\r\nTo: t4@x.test\r\nSubject: s4\r\n\r\n",
    b"From: alice@acme.test\r\n  \r\nTo: t5@x.test\r\nSubject: s5\r\n\r\n",
]


def fields(header: bytes, names: tuple[str, ...]) -> list[tuple[str, bytes]]:
    return [(f.name, header[f.colon + 1:f.end].strip()) for f in iter_fields(header) if f.name in names]


def test_iter_fields_reads_the_header_section_as_dovecot_does(dovecot):
    with IMAPClient("127.0.0.1", port=dovecot.imaps_port, ssl=True, ssl_context=dovecot.ssl_context()) as c:
        c.login("alice@acme.test", "alice-pw")
        c.create_folder("HeaderReading")
        for header in HEADERS:
            c.append("HeaderReading", header + b"body\r\n")
        c.select_folder("HeaderReading")
        got = c.fetch(c.search("ALL"), ["ENVELOPE", "BODY.PEEK[HEADER]", "BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT)]"])
        c.delete_folder("HeaderReading")
    for i, header in enumerate(HEADERS):
        item = got[sorted(got)[i]]
        assert item[b"BODY[HEADER]"] == header  # Dovecot keeps the section as it is
        theirs = item[b"BODY[HEADER.FIELDS (FROM TO SUBJECT)]"]
        dovecot_fields = [(n.strip().lower().decode(), v.strip())  # one field per unfolded line
                          for n, _, v in (f.partition(b":") for f in re.split(rb"\r\n(?![ \t])", theirs) if f)]
        assert fields(header, ("from", "to", "subject")) == dovecot_fields
        envelope = item[b"ENVELOPE"]
        assert envelope.subject == f"s{i + 1}".encode() and envelope.to[0].mailbox == f"t{i + 1}".encode()
