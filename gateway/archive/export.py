"""Getting archived messages out: attachments of one message, a result set as mbox or zip.

``attachments(raw)`` lists the attachment parts of a message in a stable order (the
order the message view shows and the download URLs use); ``attachment(raw, n)`` returns
one with its decoded bytes.

``write_mbox(out, messages)`` writes the mboxrd variant (RFC 4155 "From " separator
lines; body lines matching ``>*From `` get one more ``>``, so the original is
recoverable exactly).  ``write_zip(out, messages)`` writes one ``.eml`` file per message
plus ``index.csv`` (record id, date, direction, from, to, subject, SHA-256, file name)
and, given ``notes``, an ``EXPORT-NOTES.txt`` written last (what is missing and why —
known only once every message was read).
Both take an iterable of ``ExportItem`` and write to a binary file object, so a large
export goes through a temporary file rather than memory.  Blocking.
"""

from __future__ import annotations

import csv
import datetime as dt
import email
import email.message
import email.utils
import io
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from gateway.archive.extraction import decode_header
from gateway.mimeparts import disposition, filename, parse_bytes

MAX_PARTS = 1000
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_UNSAFE_NAME = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')


@dataclass
class AttachmentPart:
    index: int
    name: str
    content_type: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class ExportItem:
    record_id: int
    created_at: dt.datetime
    direction: str
    mail_from: str
    recipients: str
    subject: str
    sha256: str
    raw: bytes


def safe_filename(name: str, default: str = "attachment") -> str:
    """A file name fit for Content-Disposition and zip entries: no path, no control characters."""
    name = _UNSAFE_NAME.sub("_", name or "").strip(" ._")
    return (name or default)[:150]


def attachments(raw: bytes) -> list[AttachmentPart]:
    """The attachment parts of ``raw`` (a part with a file name or ``Content-Disposition:
    attachment``, and attached messages — whose own attachments follow them), numbered from 0.
    Never raises."""
    try:
        msg = parse_bytes(raw)
    except Exception:  # noqa: BLE001 - unreadable MIME has no attachments to offer
        return []
    out: list[AttachmentPart] = []
    try:
        for n, part in enumerate(msg.walk()):
            if n > MAX_PARTS:
                break
            ctype = (part.get_content_type() or "application/octet-stream").lower()
            if part.is_multipart() and ctype != "message/rfc822":
                continue
            name = _name(part)
            if ctype == "message/rfc822":
                inner = part.get_payload()
                data = inner[0].as_bytes() if isinstance(inner, list) and inner else b""
                name = name or "message.eml"
            elif name or disposition(part) == "attachment":
                payload = part.get_payload(decode=True)
                data = payload if isinstance(payload, bytes) else b""
            else:
                continue
            out.append(AttachmentPart(len(out), name or f"attachment-{len(out) + 1}", ctype, data))
    except Exception:  # noqa: BLE001 - keep what was found
        pass
    return out


def _name(part: email.message.Message) -> str:
    name = filename(part)  # raw 8-bit (UTF-8/GBK) names decoded: gateway/mimeparts.py
    return decode_header(name) if name else ""


def attachment(raw: bytes, n: int) -> AttachmentPart | None:
    parts = attachments(raw)
    return parts[n] if 0 <= n < len(parts) else None


def _mbox_from_line(item: ExportItem) -> bytes:
    sender = item.mail_from.strip() or "MAILER-DAEMON"
    sender = re.sub(r"\s+", "", sender) or "MAILER-DAEMON"
    when = item.created_at.strftime("%a %b %d %H:%M:%S %Y")
    return f"From {sender} {when}\n".encode("ascii", "replace")


def write_mbox(out: BinaryIO, items: Iterable[ExportItem]) -> int:
    """mboxrd; line ends as LF.  Returns the number of messages written."""
    count = 0
    for item in items:
        body = item.raw.replace(b"\r\n", b"\n")
        out.write(_mbox_from_line(item))
        out.write(_FROM_LINE.sub(rb">\1", body))
        if not body.endswith(b"\n"):
            out.write(b"\n")
        out.write(b"\n")
        count += 1
    return count


def read_mbox(data: bytes) -> list[bytes]:
    """The messages of an mboxrd file (LF line ends), unescaped — the inverse of ``write_mbox``."""
    messages: list[bytes] = []
    current: list[bytes] | None = None
    for line in data.split(b"\n"):
        if line.startswith(b"From "):
            if current is not None:
                messages.append(_joined(current[:-1]))  # minus the separating empty line
            current = []
            continue
        if current is not None:
            current.append(re.sub(rb"^>(>*From )", rb"\1", line))
    if current is not None:
        messages.append(_joined(current[:-2]))  # minus the separating line and the final split
    return messages


def _joined(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


NOTES_FILE = "EXPORT-NOTES.txt"


def write_zip(out: BinaryIO, items: Iterable[ExportItem], notes: Callable[[int], str] | None = None) -> int:
    """One ``<date>-<record id>-<subject>.eml`` per message plus ``index.csv``; with ``notes``
    also ``EXPORT-NOTES.txt``: ``notes(count)``, called after the last message."""
    index = io.StringIO()
    table = csv.writer(index)
    table.writerow(["record_id", "created_at_utc", "direction", "from", "to", "subject", "sha256", "file"])
    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for item in items:
            name = (f"{item.created_at:%Y%m%d-%H%M%S}-{item.record_id}-"
                    f"{safe_filename(item.subject, 'message')[:60]}.eml")
            zf.writestr(name, item.raw)
            table.writerow([item.record_id, item.created_at.isoformat(timespec="seconds"), item.direction,
                            item.mail_from, item.recipients, item.subject, item.sha256, name])
            count += 1
        zf.writestr("index.csv", "\ufeff" + index.getvalue())  # BOM: spreadsheet programs read UTF-8
        if notes is not None:
            zf.writestr(NOTES_FILE, "\ufeff" + notes(count))  # BOM: Windows editors read UTF-8
    return count
