"""Message content facts for rule conditions: body text and attachments.

Parsing the MIME tree costs ~10 ms per MB, so it happens at most once per
message and only when a rule asks about the body or attachments.  Every read
is bounded: body text to ``BODY_SCAN_LIMIT`` characters (the regex time budget
builds on this), the content sniffed by python-magic to ``MAGIC_PREFIX`` bytes.
python-magic's ``Magic`` is not thread-safe: one instance per thread.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message

from gateway.mimeparts import disposition, filename, parse_bytes

BODY_SCAN_LIMIT = 256 * 1024  # characters of body text scanned by contains/regex
MAGIC_PREFIX = 16 * 1024  # bytes of an attachment given to libmagic
_TAG = re.compile(r"<[^>]{0,2000}>")

_local = threading.local()


def sniff_type(prefix: bytes) -> str:
    """MIME type of content by its first bytes (libmagic), per-thread instance."""
    m = getattr(_local, "magic", None)
    if m is None:
        import magic

        m = _local.magic = magic.Magic(mime=True)
    try:
        return m.from_buffer(prefix[:MAGIC_PREFIX]) or "application/octet-stream"
    except Exception:
        return "application/octet-stream"


@dataclass
class Attachment:
    name: str
    size: int
    declared_type: str
    prefix: bytes
    _sniffed: str | None = None

    @property
    def content_type(self) -> str:
        if self._sniffed is None:
            self._sniffed = sniff_type(self.prefix)
        return self._sniffed


@dataclass
class Content:
    body_text: str
    attachments: list[Attachment]


def _is_attachment(part: Message) -> bool:
    # (raw 8-bit UTF-8/GBK header values — a Chinese file name written bare — decoded first:
    # gateway/mimeparts.py; compat32's own answer for them has no split())
    kind = disposition(part)
    return kind == "attachment" or bool(filename(part)) or (
        kind != "inline" and part.get_content_maintype() not in ("text", "multipart", "message")
    )


def may_have_attachments(headers: Message) -> bool:
    """False when the top-level header section alone shows a message without attachments: a
    single part (not multipart/*, not message/*) that is not an attachment itself.  For such
    a message ``parse_content`` finds no attachment (its MIME walk yields only the message),
    so attachment conditions need not parse the body (~10 ms/MB)."""
    return headers.get_content_maintype() in ("multipart", "message") or _is_attachment(headers)


def _text_of(part: Message, payload: bytes) -> str:
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except LookupError:
        text = payload.decode("utf-8", "replace")
    if part.get_content_subtype() == "html":
        text = _TAG.sub(" ", text)
    return text


def parse_content(raw: bytes) -> Content:
    """Body text (bounded) and attachments of a raw message."""
    msg = parse_bytes(raw)  # a mixed RFC 2231 parameter list does not raise
    texts: list[str] = []
    budget = BODY_SCAN_LIMIT
    attachments: list[Attachment] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        if _is_attachment(part):
            name = filename(part)
            try:
                name = str(make_header(decode_header(name)))
            except Exception:
                pass
            attachments.append(Attachment(name, len(payload), part.get_content_type(), payload[:MAGIC_PREFIX]))
        elif part.get_content_maintype() == "text" and budget > 0:
            text = _text_of(part, payload[: budget * 4])[:budget]
            texts.append(text)
            budget -= len(text)
    return Content("\n".join(texts), attachments)
