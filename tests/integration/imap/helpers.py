"""Small helpers shared by the IMAP integration tests."""

from __future__ import annotations

import imaplib
import re
import ssl
import uuid
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser


def message(sender: str, to: str = "alice@acme.test", subject: str = "Hello", body: str = "Body line\r\n",
            cc: str | None = None, extra: str = "") -> tuple[str, bytes]:
    mid = f"<{uuid.uuid4().hex}@test>"
    lines = [f"From: {sender}", f"To: {to}"]
    if cc:
        lines.append(f"Cc: {cc}")
    lines += [f"Subject: {subject}", f"Message-ID: {mid}", "Date: Mon, 1 Jan 2024 10:00:00 +0000",
              "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    if extra:
        lines.append(extra)
    raw = ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")
    return mid, raw


def direct(upstream, user: str = "alice@acme.test") -> imaplib.IMAP4_SSL:
    c = imaplib.IMAP4_SSL(upstream.host, upstream.imaps_port, ssl_context=upstream.ssl_context())
    c.login(user, {"alice@acme.test": "alice-pw", "bob@acme.test": "bob-pw",
                   "carol@acme.test": "carol-pw"}[user])
    return c


def gateway_context(cert) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert[0]))


def via(proxy, user: str = "alice@acme.test", password: str | None = None) -> imaplib.IMAP4:
    c = imaplib.IMAP4(proxy.host, proxy.starttls_port)
    c.login(user, password or {"alice@acme.test": "alice-pw", "bob@acme.test": "bob-pw",
                               "carol@acme.test": "carol-pw"}[user])
    return c


def uid_of(client: imaplib.IMAP4, message_id: str, mailbox: str = "INBOX") -> int:
    client.select(mailbox)
    typ, data = client.uid("SEARCH", None, "HEADER", "Message-ID", message_id)
    assert typ == "OK", data
    uids = data[0].split()
    assert len(uids) == 1, (message_id, data)
    return int(uids[0])


def fetch_item(client: imaplib.IMAP4, uid: int, item: str) -> bytes:
    """The literal (or value) of one FETCH item, by UID."""
    typ, data = client.uid("FETCH", str(uid), f"({item})")
    assert typ == "OK", data
    for part in data:
        if isinstance(part, tuple):
            return part[1]
    raise AssertionError(f"no literal in {data!r}")


def fetch_size(client: imaplib.IMAP4, uid: int) -> int:
    typ, data = client.uid("FETCH", str(uid), "(RFC822.SIZE)")
    assert typ == "OK", data
    text = data[0].decode()
    return int(text.split("RFC822.SIZE ")[1].split(")")[0].split()[0])


def display_names(raw: bytes, field: str) -> list[str]:
    msg = BytesHeaderParser().parsebytes(raw)
    return [str(make_header(decode_header(v))) for v in msg.get_all(field, [])]


def envelope_from_name(client: imaplib.IMAP4, uid: int) -> str:
    """The decoded display name of the first From address in the proxy's ENVELOPE ("" for NIL)."""
    typ, data = client.uid("FETCH", str(uid), "(ENVELOPE)")
    assert typ == "OK", data
    m = re.search(rb'ENVELOPE \((?:NIL|"(?:[^"\\]|\\.)*") (?:NIL|"(?:[^"\\]|\\.)*") '
                  rb'\(\((NIL|"(?:[^"\\]|\\.)*") NIL', data[0])
    assert m, data
    return "" if m.group(1) == b"NIL" else str(make_header(decode_header(m.group(1)[1:-1].decode())))
