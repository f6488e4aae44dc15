"""Reading a message for the search index: the searchable text of a raw message (``Extracted``).

``extract(raw)`` pulls the searchable text out of a message: subject, From and
To/Cc/Bcc names and addresses (RFC 2047 / RFC 2231 decoded, Chinese charsets mapped
to their supersets), text/plain and text/html (converted to text) bodies, and
attachment names.  It never raises: malformed mail yields whatever could be read.
Body text is bounded (``BODY_LIMIT`` characters) and so is the work per part.
``indexable(raw)`` is the part of a message ``extract`` reads (long base64 bodies cut).
The tokens derived from this text are ``terms``'; the document rows built from it,
``documents``'.
"""

from __future__ import annotations

import codecs
import datetime as dt
import email
import email.header
import email.message
import email.utils
import html
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser

from gateway.archive import mime_walk
from gateway.archive.headertext import getaddresses
from gateway.mimeparts import SURROGATE, decode_8bit, disposition, filename, parse_bytes

BODY_LIMIT = 64 * 1024  # characters of body text indexed per message
PART_LIMIT = 1024 * 1024  # bytes of one text part looked at
HEADER_LIMIT = 16 * 1024  # characters of one header looked at
MAX_ADDRESSES = 500
MAX_ATTACHMENTS = 200
# Base64 bodies are cut before parsing: an attachment's (a part with a file name, an
# attachment disposition or a non-text type) to one line — only its name is indexed — and a
# text part's to BASE64_KEEP_LINES lines (76 characters each decode to ~68 KB: all of an ASCII
# text body up to BODY_LIMIT, ~22k CJK characters).  Attachments' lines were most of the
# parsing time.  A run starts after a blank line and ends before the next line starting with
# "-" (a boundary; base64 has no "-") or a blank line.
BASE64_KEEP_LINES = 1200
_BASE64_START = re.compile(rb"\n\r?\n(?=[A-Za-z0-9+/]{60,}={0,2}\r?\n)")
_TEXT_TYPE = re.compile(rb"content-type:\s*(?:text|multipart|message)/")
_ANY_TYPE = re.compile(rb"content-type:")
_RUN_END = re.compile(rb"\n(?:-|\r?\n)")

# Charsets mail actually carries, mapped to the codec that decodes them best
# (GB2312/GBK mail is often really GBK or GB18030; Big5 mail often HKSCS).
_CHARSET_ALIASES = {
    "gb2312": "gb18030", "gb_2312-80": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "cp936": "gb18030",
    "euc-cn": "gb18030", "x-euc-cn": "gb18030", "chinese": "gb18030", "csgb2312": "gb18030",
    "big5": "big5hkscs", "x-big5": "big5hkscs", "big5-hkscs": "big5hkscs", "cn-big5": "big5hkscs",
    "unicode-1-1-utf-7": "utf-7", "us-ascii": "utf-8", "ascii": "utf-8", "ks_c_5601-1987": "cp949",
    "iso-8859-1": "cp1252", "latin1": "cp1252", "windows-874": "cp874",
}


@dataclass
class Extracted:
    subject: str = ""
    sender: str = ""  # "Name <addr>" of From (and Sender)
    rcpt: str = ""  # names and addresses of To, Cc, Bcc
    body: str = ""
    attnames: str = ""  # attachment file names, one per line
    from_addrs: list[str] = field(default_factory=list)
    to_addrs: list[str] = field(default_factory=list)
    has_attachment: bool = False
    date: dt.datetime | None = None
    headers: dict | None = None  # gateway.archive.headers_of's fields from the same parse (None: not known)



def all_text(ex: Extracted) -> str:
    return "\n".join((ex.subject, ex.sender, ex.rcpt, ex.attnames, ex.body))



# -- decoding helpers --------------------------------------------------------------------


def codec_for(charset: str | None) -> str:
    """The Python codec for a MIME charset label; utf-8 for unknown labels."""
    name = (charset or "").strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    if not name:
        return "utf-8"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Decode with the declared charset; undeclared bytes try UTF-8, then GB18030."""
    if charset and charset.lower() not in ("unknown-8bit", "x-unknown", "unknown", "8bit"):
        return data.decode(codec_for(charset), errors="replace")
    return decode_8bit(data)


def _unsurrogate(text: str) -> str:
    """compat32 keeps raw 8-bit header bytes as surrogates; decode them properly."""
    if text.isascii() or SURROGATE.search(text) is None:
        return text
    return decode_bytes(text.encode("utf-8", errors="surrogateescape"))


_FOLD = re.compile(r"\r?\n(?=[ \t])")


def decode_header(value: object) -> str:
    """An RFC 2047 header (or raw 8-bit UTF-8/GBK) as text; never raises."""
    if value is None:
        return ""
    try:
        if isinstance(value, email.header.Header):
            chunks = email.header.decode_header(value)
        else:
            text = _unsurrogate(str(value))[:HEADER_LIMIT]
            if "=?" not in text:
                return _clean(text)
            # Unfolded first: decode_header reads line by line and drops the white space that
            # starts a continuation line ("=?utf-8?b?…?=\r\n 2000 套" came out as "…2000 套").
            chunks = email.header.decode_header(_FOLD.sub("", text))
        out = []
        for chunk, charset in chunks:
            if isinstance(chunk, bytes):
                # unencoded runs come back as raw-unicode-escape bytes of the original text
                out.append(decode_bytes(chunk, charset) if charset else chunk.decode("raw-unicode-escape", "replace"))
            else:
                out.append(chunk)
        return _clean("".join(out))
    except Exception:  # noqa: BLE001 - a header we cannot decode is indexed as is
        return _clean(_unsurrogate(str(value))[:HEADER_LIMIT])


def _clean(text: str) -> str:
    return " ".join(text.replace("\x00", " ").split())


class _HTMLText(HTMLParser):
    """Visible text of an HTML part: no script/style, block tags become line breaks."""

    _SKIP = {"script", "style", "head", "title", "noscript", "template"}
    _BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "hr"}

    def __init__(self, limit: int) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self.skip:
            self.skip -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip and self.size < self.limit:
            self.parts.append(data)
            self.size += len(data)


def html_to_text(markup: str, limit: int = BODY_LIMIT) -> str:
    parser = _HTMLText(limit)
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # noqa: BLE001 - broken HTML: strip tags crudely
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))[:limit]
    return "".join(parser.parts)[:limit]


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    payload = payload[:PART_LIMIT]
    charset = part.get_content_charset() or part.get_param("charset")
    return decode_bytes(payload, charset if isinstance(charset, str) else None)


def _filename(part: email.message.Message) -> str:
    """An attachment's file name (Content-Disposition filename, else Content-Type name), decoded."""
    # Parameter names are matched case-insensitively and read from the first header of each
    # kind, so without the letters "name" there neither has one (the text part of nearly every
    # message): the email package's parameter parsing is skipped.
    # (``str`` of a raw 8-bit value, an ``email.header.Header``, still shows the ASCII "name".)
    for header in ("content-disposition", "content-type"):
        value = part.get(header)
        if value is not None and "name" in str(value).lower():
            return _filename_params(part)
    return ""


def _filename_params(part: email.message.Message) -> str:
    name = filename(part)  # raw 8-bit (UTF-8/GBK) names decoded too: gateway/mimeparts.py
    return decode_header(name) if name else ""


def _addresses(msg: email.message.Message, headers: Iterable[str]) -> tuple[list[str], list[str]]:
    """([display strings], [lower-case addresses]) of the headers."""
    values = []
    for h in headers:
        for v in msg.get_all(h) or []:
            values.append(decode_header(v))
    shown, addrs = [], []
    try:
        pairs = getaddresses(tuple(values))
    except Exception:  # noqa: BLE001
        pairs = [("", v) for v in values]
    for name, addr in pairs[:MAX_ADDRESSES]:
        addr = addr.strip().lower()
        name = name.strip()
        shown.append(f"{name} <{addr}>" if name and addr else (name or addr))
        if "@" in addr and len(addr) <= 320:
            addrs.append(addr)
    return shown, addrs


def _cut_base64(raw: bytes) -> bytes:
    """``raw`` with long base64 bodies shortened (see BASE64_KEEP_LINES); all else as is."""
    out: list[bytes] = []
    pos = 0
    m = _BASE64_START.search(raw)
    while m is not None:
        start = m.end()
        end_match = _RUN_END.search(raw, start)
        end = end_match.start() if end_match else len(raw)
        if start >= pos:
            part_start = raw.rfind(b"\n--", pos, m.start())
            headers = raw[part_start + 1 if part_start >= 0 else pos:m.start()].lower()
            binary = (b"filename" in headers or b"name=" in headers or b"attachment" in headers
                      or (_ANY_TYPE.search(headers) is not None and _TEXT_TYPE.search(headers) is None))
            line = raw.find(b"\n", start) + 1 - start
            keep = start + line * (1 if binary else BASE64_KEEP_LINES)
            if keep < end:
                out.append(raw[pos:keep])
                pos = end
        # A run holds no blank line before ``end`` (that is how its end was found), so the next
        # start is searched from there: the run's bytes are scanned once, not twice.
        m = _BASE64_START.search(raw, end)
    if not out:
        return raw
    out.append(raw[pos:])
    return b"".join(out)


CUT_ABOVE = 64 * 1024  # bytes: larger messages have their base64 bodies cut before parsing


def indexable(raw: bytes) -> bytes:
    """The part of a message ``extract`` reads: long base64 bodies cut (see BASE64_KEEP_LINES);
    ``extract(indexable(raw)) == extract(raw)``."""
    return _cut_base64(raw) if len(raw) > CUT_ABOVE else raw


def parse_message(raw: bytes) -> email.message.Message:
    """``email.message_from_bytes(raw)``: the same tree, by ``mime_walk`` where it knows the
    message's shape (≈ 5x faster), else by the email package."""
    msg = mime_walk.parse(raw)
    return msg if msg is not None else parse_bytes(raw)


def extract(raw: bytes, headers: bool = True) -> Extracted:
    """The searchable text of a raw message.  Never raises.  ``headers``: also the record's
    header fields (``Extracted.headers``, for a batch that creates the records); the
    background indexer's records exist already, so it skips them (a quarter of the work)."""
    return _extract(raw, headers, parse_message)


def extract_reference(raw: bytes, headers: bool = True) -> Extracted:
    """``extract`` with the email package's parser alone: the reference ``mime_walk`` is
    tested against (tests/unit/archive/test_mime_walk.py)."""
    return _extract(raw, headers, parse_bytes)


def _extract(raw: bytes, headers: bool, parse: Callable[[bytes], email.message.Message]) -> Extracted:
    out = Extracted()
    try:
        raw = indexable(raw)
        msg = parse(raw)
    except Exception:  # noqa: BLE001
        out.body = decode_bytes(raw[:BODY_LIMIT])[:BODY_LIMIT]
        return out
    if headers:
        from gateway.archive import headers_of_parsed

        out.headers = headers_of_parsed(raw, msg)
    try:
        out.subject = decode_header(msg.get("Subject"))[:2000]
    except Exception:  # noqa: BLE001
        pass
    try:
        shown, out.from_addrs = _addresses(msg, ("From", "Sender", "Reply-To"))
        out.sender = "\n".join(shown)
        shown, out.to_addrs = _addresses(msg, ("To", "Cc", "Bcc", "Delivered-To"))
        out.rcpt = "\n".join(shown)
    except Exception:  # noqa: BLE001
        pass
    try:
        date = email.utils.parsedate_to_datetime(str(msg.get("Date", "")))
        if date is not None and date.tzinfo is not None:
            date = date.astimezone(dt.UTC).replace(tzinfo=None)
        out.date = date
    except Exception:  # noqa: BLE001
        pass
    bodies: list[str] = []
    size = 0
    names: list[str] = []
    try:
        for n, part in enumerate(msg.walk()):
            if n > 1000:
                break
            if part.is_multipart():
                continue
            ctype = part.get_content_type()
            name = _filename(part)
            if name or disposition(part) == "attachment":
                out.has_attachment = True
                if name and len(names) < MAX_ATTACHMENTS:
                    names.append(name[:500])
                continue
            if ctype == "message/rfc822" or size >= BODY_LIMIT:
                continue
            if ctype == "text/plain":
                text = _part_text(part)
            elif ctype == "text/html":
                text = html_to_text(_part_text(part), BODY_LIMIT - size)
            else:
                continue
            text = text[: BODY_LIMIT - size]
            bodies.append(text)
            size += len(text)
    except Exception:  # noqa: BLE001 - keep what was read
        pass
    out.body = "\n".join(bodies).replace("\x00", " ")
    out.attnames = "\n".join(names)
    return out
