"""What routing needs to know about one message from the shared mailbox.

Parsing is defensive: broken headers or bodies give empty fields, never an
exception, so a malformed message still gets a decision (usually "undistributed").
"""

from __future__ import annotations

import email
import email.policy
import html
import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import getaddresses, parseaddr

from gateway.distribute.language import detect
from gateway.mimeparts import filename

LOOP_HEADER = "X-Mailgate-Distribution-Id"
MAX_TEXT = 64 * 1024  # characters of body text kept for keywords and language
PREVIEW = 2000  # characters stored for the panel's preview
_MSGID = re.compile(r"<[^<>\s]{1,990}>")
_TAG = re.compile(r"<[^>]{0,2000}>")
_SPACE = re.compile(r"[ \t\r\f\v]+")


@dataclass
class Inquiry:
    raw: bytes
    from_addr: str = ""
    from_name: str = ""
    reply_to: str = ""
    subject: str = ""
    message_id: str = ""
    in_reply_to: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    text: str = ""
    language_header: str = ""
    looped: bool = False

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def from_domain(self) -> str:
        return self.from_addr.rpartition("@")[2]

    @property
    def language(self) -> str:
        if self.language_header:
            return self.language_header.split(",")[0].strip().split("-")[0].lower()
        return detect(self.subject + "\n" + self.text)

    @property
    def preview(self) -> str:
        return self.text[:PREVIEW]

    @property
    def thread_ids(self) -> list[str]:
        """Message-IDs this message answers, most direct first (In-Reply-To, then References newest first)."""
        seen: list[str] = []
        for mid in [*self.in_reply_to, *reversed(self.references)]:
            if mid not in seen:
                seen.append(mid)
        return seen


def _header(msg: Message, name: str) -> str:
    """The header's text; a NUL (raw, or from an encoded-word) as a space: PostgreSQL refuses
    NUL in the distribution row's text, and the shared mailbox's watcher would stop at the
    message on every pass."""
    try:
        value = msg.get(name)
        return "" if value is None else str(value).replace("\x00", " ")
    except Exception:  # a header the parser cannot decode: its raw text
        for key, value in msg.raw_items():
            if key.lower() == name.lower():
                return str(value).replace("\x00", " ")
        return ""


def _text_of(msg: Message) -> str:
    plain, markup = "", ""
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if part.get_content_maintype() != "text" or filename(part):  # an attached text file
            continue
        try:
            payload = part.get_payload(decode=True) or b""
            charset = part.get_content_charset() or "utf-8"
            try:
                text = payload[: MAX_TEXT * 4].decode(charset, errors="replace")
            except LookupError:
                text = payload[: MAX_TEXT * 4].decode("utf-8", errors="replace")
        except Exception:
            continue
        if part.get_content_subtype() == "plain" and not plain:
            plain = text
        elif part.get_content_subtype() == "html" and not markup:
            markup = html.unescape(_TAG.sub(" ", text))
        if plain:
            break
    text = (plain or markup).replace("\x00", " ")  # (the preview is stored: no NUL, as in _header)
    lines = [_SPACE.sub(" ", line).strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)[:MAX_TEXT]


def parse(raw: bytes) -> Inquiry:
    """Parse a message (bytes as stored in the shared mailbox)."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception:
        return Inquiry(raw=raw)
    name, addr = parseaddr(_header(msg, "From"))
    reply = getaddresses([_header(msg, "Reply-To")])
    inquiry = Inquiry(
        raw=raw,
        from_addr=addr.strip().lower(),
        from_name=name.strip()[:300],
        reply_to=reply[0][1] if reply and reply[0][1] else "",
        subject=" ".join(_header(msg, "Subject").split())[:1000],
        message_id=(_MSGID.findall(_header(msg, "Message-ID")) or [""])[0],
        in_reply_to=_MSGID.findall(_header(msg, "In-Reply-To"))[:20],
        references=_MSGID.findall(_header(msg, "References"))[-50:],
        language_header=_header(msg, "Content-Language")[:50],
        looped=LOOP_HEADER.lower() in {k.lower() for k in msg.keys()},
    )
    try:
        inquiry.text = _text_of(msg)
    except Exception:
        inquiry.text = ""
    return inquiry
