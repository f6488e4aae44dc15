"""A safe preview of a message from its raw bytes: headers, text, attachments, HTML.

Used by the approval pages (an approver must see what they release) and by any
page that shows a stored message.  Rules:

- never raises on bad input: malformed MIME, unknown or lying charsets, broken
  RFC 2047 words all end in a best-effort preview plus a note saying what was wrong;
- bounded: only the first ``max_parse_bytes`` of a message are parsed, text and
  HTML are cut at ``max_text_chars`` / ``max_html_chars``, at most
  ``max_attachments`` are listed and ``max_links`` links collected;
- the HTML is sanitized with nh3 (an allow-list): no scripts, no event handlers,
  no forms, frames, objects or ``<style>`` sheets, no ``url(...)`` in inline
  styles, no remote images (only ``data:`` images and ``cid:`` parts of the same
  message, inlined), and links lose their ``href`` (they are listed as text in
  ``links`` instead, so an approver can read where they point without
  following them);
- the sanitized HTML is meant to be served as its own document from a separate
  URL (``html_document``) with ``HTML_CSP`` as its Content-Security-Policy and
  shown in an ``<iframe sandbox>`` without ``allow-scripts`` or
  ``allow-same-origin`` — two more walls should the sanitizer ever miss something.

Chinese mail often labels GBK text as gb2312 or sends raw 8-bit headers;
``decode_text`` widens gb2312/gbk to gb18030 and big5 to big5hkscs, and falls
back to UTF-8 then GB18030 before replacing bytes it cannot read.
"""

from __future__ import annotations

import base64
import email
import html as html_lib
import re
from dataclasses import dataclass, field
from email.header import decode_header
from email.message import Message
from email.policy import compat32
from html.parser import HTMLParser
from typing import Any

import nh3

# What the iframe's own document may do: nothing but show inline styles and data: images.
HTML_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src 'none'; "
            "form-action 'none'; base-uri 'none'; frame-ancestors 'self'")

# The sandbox attribute of the iframe: empty = every restriction (no scripts, no
# same-origin, no forms, no popups, no top navigation).
IFRAME_SANDBOX = ""

MAX_PARSE_BYTES = 25 * 1024 * 1024
MAX_TEXT_CHARS = 200_000
MAX_HTML_CHARS = 1_000_000
MAX_ATTACHMENTS = 200
MAX_LINKS = 100
MAX_INLINE_IMAGE = 512 * 1024
MAX_INLINE_TOTAL = 3 * 1024 * 1024

SHOWN_HEADERS = ("From", "Sender", "Reply-To", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID")

# Charsets that are routinely used for text in a wider one.
CHARSET_UPGRADES = {
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "cp936": "gb18030", "euc-cn": "gb18030",
    "gb_2312-80": "gb18030", "chinese": "gb18030", "csgb2312": "gb18030",
    "big5": "big5hkscs", "x-big5": "big5hkscs", "cp950": "big5hkscs", "big5-hkscs": "big5hkscs",
    "ks_c_5601-1987": "cp949", "euc-kr": "cp949",
    "iso-8859-1": "cp1252", "latin1": "cp1252", "us-ascii": "utf-8", "ascii": "utf-8",
    "shift_jis": "cp932", "sjis": "cp932", "x-sjis": "cp932",
}

_ALLOWED_TAGS = {
    "a", "abbr", "b", "bdi", "bdo", "blockquote", "br", "caption", "center", "cite", "code", "col", "colgroup",
    "dd", "del", "details", "div", "dl", "dt", "em", "figcaption", "figure", "font", "h1", "h2", "h3", "h4", "h5",
    "h6", "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s", "small", "span", "strike",
    "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u", "ul",
}
_LAYOUT = {"align", "valign", "width", "height", "bgcolor", "border", "cellpadding", "cellspacing", "colspan",
           "rowspan", "nowrap"}
_ALLOWED_ATTRIBUTES = {
    "*": {"style", "title", "dir", "lang", "align"},
    "a": {"href"},  # dropped by the filter; kept here so the filter sees it and collects the link
    "img": {"src", "alt", "width", "height", "border"},
    "font": {"color", "face", "size"},
    "table": _LAYOUT, "td": _LAYOUT, "th": _LAYOUT, "tr": _LAYOUT, "tbody": _LAYOUT, "thead": _LAYOUT,
    "tfoot": _LAYOUT, "col": _LAYOUT, "colgroup": _LAYOUT,
    "ol": {"start", "type"}, "ul": {"type"}, "li": {"value"}, "hr": {"width", "size", "noshade"},
}
# Inline style properties that cannot carry a URL.
_STYLE_PROPERTIES = {
    "color", "background-color", "font", "font-family", "font-size", "font-style", "font-weight",
    "font-variant", "text-align", "text-decoration", "text-indent", "text-transform", "letter-spacing",
    "word-spacing", "line-height", "vertical-align", "white-space", "word-break", "word-wrap", "direction",
    "margin", "margin-top", "margin-right", "margin-bottom", "margin-left", "padding", "padding-top",
    "padding-right", "padding-bottom", "padding-left", "border", "border-top", "border-right", "border-bottom",
    "border-left", "border-color", "border-style", "border-width", "border-collapse", "border-spacing",
    "border-radius", "width", "height", "max-width", "min-width", "max-height", "min-height", "display",
    "table-layout", "list-style-type", "text-overflow", "overflow",
}
_STYLE_DANGER = re.compile(r"url\s*\(|expression\s*\(|@import|\\|javascript:|image-set|-moz-binding|behavior",
                           re.IGNORECASE)
_DATA_IMAGE = re.compile(r"^data:image/(png|gif|jpeg|jpg|webp|bmp);base64,[A-Za-z0-9+/=\s]*$", re.IGNORECASE)
_INLINE_TYPES = {"image/png", "image/gif", "image/jpeg", "image/webp", "image/bmp"}  # never SVG


@dataclass
class Attachment:
    name: str
    content_type: str
    size: int  # decoded bytes
    inline: bool = False


@dataclass
class Preview:
    headers: list[tuple[str, str]] = field(default_factory=list)
    subject: str = ""
    text: str = ""  # the text/plain part (or text taken from the HTML part when there is none)
    text_from_html: bool = False
    html: str | None = None  # sanitized HTML fragment, None when the message has no HTML part
    attachments: list[Attachment] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # link targets found in the HTML (text only)
    blocked_images: int = 0  # remote or unusable images removed from the HTML
    notes: list[str] = field(default_factory=list)  # codes: see NOTE_TEXTS
    size: int = 0

    @property
    def has_html(self) -> bool:
        return self.html is not None


# Default wording of the note codes; the panel translates them through its i18n.
NOTE_TEXTS = {
    "malformed": "The message structure is damaged; the preview may be incomplete.",
    "defects": "The message has MIME defects; the preview may be incomplete.",
    "too_large": "The message is very large; only its beginning was read.",
    "text_truncated": "The text is long; only its beginning is shown.",
    "html_truncated": "The HTML is long; only its beginning is shown.",
    "too_many_attachments": "More attachments than listed.",
    "charset": "Some text was in an unknown or wrong character set; unreadable bytes are shown as �.",
    "remote_images": "Remote images were blocked.",
    "empty": "The message has no readable text.",
}


# -- decoding ----------------------------------------------------------------------------------


def _codec(charset: str | None) -> str | None:
    if not charset:
        return None
    name = charset.strip().strip('"').lower()
    name = CHARSET_UPGRADES.get(name, name)
    try:
        import codecs

        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_text(data: bytes, charset: str | None, notes: list[str] | None = None) -> str:
    """Bytes to text: the declared charset (widened), else UTF-8, else GB18030, else replace."""
    codec = _codec(charset)
    for candidate in (codec, "utf-8", "gb18030"):
        if candidate is None:
            continue
        try:
            return data.decode(candidate)
        except (UnicodeDecodeError, LookupError):
            continue
    if notes is not None and "charset" not in notes:
        notes.append("charset")
    return data.decode(codec or "utf-8", errors="replace")


def decode_header_value(value: Any, notes: list[str] | None = None) -> str:
    """A header as text: RFC 2047 words decoded (charsets widened); raw 8-bit bytes read as
    UTF-8 or GB18030; folding removed.  Never raises."""
    if value is None:
        return ""
    try:
        text = str(value)
        if _SURROGATE.search(text):  # compat32 keeps raw 8-bit header bytes as surrogates
            return _unfold(decode_text(text.encode("utf-8", "surrogateescape"), None, notes))
        if not text.isascii():  # already text (an RFC 2231 parameter decoded by the email package)
            return _unfold(text)
        parts = []
        # Unfolded first: decode_header drops the white space that starts a continuation line.
        for chunk, charset in decode_header(re.sub(r"\r?\n(?=[ \t])", "", text)):
            if isinstance(chunk, bytes):
                parts.append(decode_text(chunk, charset, notes) if charset else chunk.decode("ascii", "replace"))
            else:
                parts.append(chunk)
        return _unfold("".join(parts))
    except Exception:
        if notes is not None and "charset" not in notes:
            notes.append("charset")
        return _unfold(str(value).encode("utf-8", "replace").decode("utf-8", "replace"))


_SURROGATE = re.compile("[\udc80-\udcff]")


def _unfold(text: str) -> str:
    return re.sub(r"\r?\n[ \t]*", " ", text).strip()


def _filename(part: Message, notes: list[str]) -> str:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if name is None:
        return ""
    if isinstance(name, tuple):  # an RFC 2231 value in an unknown charset
        charset, _, value = name
        return decode_text(value.encode("latin-1", "replace"), charset, notes)
    return decode_header_value(name, notes)


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    if isinstance(raw, str):
        return raw.encode("ascii", "surrogateescape")
    return b""


# -- HTML --------------------------------------------------------------------------------------


class _Sanitizer:
    """One nh3 pass with an attribute filter that inlines cid: images, drops remote ones
    and collects link targets."""

    def __init__(self, inline_images: dict[str, str], max_links: int):
        self.inline_images = inline_images
        self.links: list[str] = []
        self.max_links = max_links
        self.blocked_images = 0

    def attribute(self, tag: str, attr: str, value: str) -> str | None:
        if attr == "style":
            return None if _STYLE_DANGER.search(value) else value
        if tag == "a" and attr == "href":
            target = value.strip()
            if target and not target.startswith("#") and len(self.links) < self.max_links \
                    and target[:2000] not in self.links:
                self.links.append(target[:2000])
            return None
        if tag == "img" and attr == "src":
            src = value.strip()
            if src.lower().startswith("cid:"):
                found = self.inline_images.get(_cid_key(src[4:]))
                if found is None:
                    self.blocked_images += 1
                return found
            if _DATA_IMAGE.match(src):
                return src
            self.blocked_images += 1
            return None
        return value

    def clean(self, html: str) -> str:
        return nh3.clean(
            html, tags=_ALLOWED_TAGS, clean_content_tags={"script", "style", "title", "head", "noscript",
                                                          "template", "iframe", "object", "embed", "svg",
                                                          "math", "textarea", "select", "xml"},
            attributes=_ALLOWED_ATTRIBUTES, attribute_filter=self.attribute,
            url_schemes={"cid", "data", "http", "https", "mailto", "ftp", "tel"},  # the filter decides
            link_rel=None, filter_style_properties=_STYLE_PROPERTIES, strip_comments=True,
        )


def sanitize_html(html: str, inline_images: dict[str, str] | None = None,
                  max_links: int = MAX_LINKS) -> tuple[str, list[str], int]:
    """Sanitized fragment, link targets found, number of images removed."""
    s = _Sanitizer(inline_images or {}, max_links)
    return s.clean(html), s.links, s.blocked_images


def _cid_key(cid: str) -> str:
    return cid.strip().strip("<>").strip().lower()


class _TextFromHTML(HTMLParser):
    """Visible text of an HTML part (for messages that have no text/plain part)."""

    SKIP = {"script", "style", "head", "title", "noscript", "template"}
    BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.out.append(data)


def text_from_html(html: str) -> str:
    parser = _TextFromHTML()
    try:
        parser.feed(html)
        parser.close()
    except Exception:
        return ""
    text = "".join(parser.out)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def html_document(preview: Preview, title: str = "") -> str:
    """The iframe's document: the sanitized fragment in a minimal page (serve it with
    ``Content-Security-Policy: HTML_CSP``; the meta tag repeats it)."""
    body = preview.html or ""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{html_lib.escape(HTML_CSP)}\">"
            "<meta name=\"referrer\" content=\"no-referrer\">"
            f"<title>{html_lib.escape(title)}</title>"
            "<style>body{font-family:sans-serif;font-size:14px;margin:8px;word-wrap:break-word}"
            "img{max-width:100%;height:auto}</style></head>"
            f"<body>{body}</body></html>\n")


# -- the preview -------------------------------------------------------------------------------


def build_preview(raw: bytes, *, max_parse_bytes: int = MAX_PARSE_BYTES, max_text_chars: int = MAX_TEXT_CHARS,
                  max_html_chars: int = MAX_HTML_CHARS, max_attachments: int = MAX_ATTACHMENTS) -> Preview:
    """Everything a reviewer needs to see, from the raw message.  Never raises."""
    p = Preview(size=len(raw))
    if len(raw) > max_parse_bytes:
        raw = raw[:max_parse_bytes]
        p.notes.append("too_large")
    try:
        msg = email.message_from_bytes(raw, policy=compat32)
    except Exception:
        p.notes.append("malformed")
        p.text = decode_text(raw[:max_text_chars], None, p.notes)
        return p
    try:
        _fill(p, msg, max_text_chars, max_html_chars, max_attachments)
    except Exception:
        if "malformed" not in p.notes:
            p.notes.append("malformed")
    if not p.text.strip() and p.html is None and not p.attachments:
        body = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else raw.partition(b"\n\n")[2]
        if body.strip() and ("defects" in p.notes or "malformed" in p.notes):  # show what is there, as text
            p.text = decode_text(body[:max_text_chars], None, p.notes)
        else:
            p.notes.append("empty")
    return p


def _fill(p: Preview, msg: Message, max_text: int, max_html: int, max_attachments: int) -> None:
    wanted = {h.lower(): h for h in SHOWN_HEADERS}
    for name, value in msg.raw_items():  # raw values: 8-bit bytes intact, decoded below
        if name.lower() in wanted:
            p.headers.append((wanted[name.lower()], decode_header_value(value, p.notes)[:2000]))
    p.headers.sort(key=lambda kv: SHOWN_HEADERS.index(kv[0]))
    p.subject = next((v for k, v in p.headers if k == "Subject"), "")
    if _has_defects(msg):
        p.notes.append("defects")

    text_parts: list[Message] = []
    html_parts: list[Message] = []
    inline_images: dict[str, str] = {}
    inline_total = 0
    extra_attachments = 0
    for part in _leaves(msg):
        ctype = (part.get_content_type() or "text/plain").lower()
        disposition = (part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
        name = _filename(part, p.notes)
        is_attachment = disposition == "attachment" or (bool(name) and ctype not in ("text/plain", "text/html")) \
            or ctype == "message/rfc822"
        if not is_attachment and ctype == "text/plain" and not name:
            text_parts.append(part)
            continue
        if not is_attachment and ctype == "text/html" and not name:
            html_parts.append(part)
            continue
        if ctype.startswith("multipart/"):
            continue
        data = _payload(part) if ctype != "message/rfc822" else _rfc822_bytes(part)
        cid = part.get("Content-ID")
        inline = disposition == "inline" or (cid is not None and disposition != "attachment")
        if cid and ctype in _INLINE_TYPES and len(data) <= MAX_INLINE_IMAGE \
                and inline_total + len(data) <= MAX_INLINE_TOTAL:
            inline_images[_cid_key(str(cid))] = f"data:{ctype};base64," + base64.b64encode(data).decode()
            inline_total += len(data)
        if not name and ctype == "message/rfc822":
            name = decode_header_value(part.get_payload(0).get("Subject"), p.notes) + ".eml" \
                if isinstance(part.get_payload(), list) and part.get_payload() else "message.eml"
        if len(p.attachments) >= max_attachments:
            extra_attachments += 1
            continue
        p.attachments.append(Attachment(name=name[:500] or "(" + ctype + ")", content_type=ctype, size=len(data),
                                        inline=inline))
    if extra_attachments:
        p.notes.append("too_many_attachments")

    if text_parts:
        text = "\n\n".join(_part_text(part, p.notes) for part in text_parts[:5])
        p.text = _cut(text, max_text, p, "text_truncated")
    if html_parts:
        html = _part_text(html_parts[0], p.notes)
        if len(html) > max_html:
            html = html[:max_html]
            p.notes.append("html_truncated")
        p.html, p.links, p.blocked_images = sanitize_html(html, inline_images)
        if p.blocked_images:
            p.notes.append("remote_images")
        if not text_parts:
            p.text = _cut(text_from_html(html), max_text, p, "text_truncated")
            p.text_from_html = True


def _cut(text: str, limit: int, p: Preview, note: str) -> str:
    if len(text) > limit:
        p.notes.append(note)
        return text[:limit]
    return text


def _part_text(part: Message, notes: list[str]) -> str:
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return decode_text(_payload(part), charset, notes).replace("\r\n", "\n")


def _rfc822_bytes(part: Message) -> bytes:
    try:
        inner = part.get_payload()
        if isinstance(inner, list) and inner:
            return inner[0].as_bytes()
    except Exception:
        pass
    return b""


def _leaves(msg: Message, depth: int = 0) -> list[Message]:
    """Leaf parts in order; an attached message (message/rfc822) is one leaf; nesting bounded."""
    if depth > 20:
        return []
    ctype = (msg.get_content_type() or "").lower()
    if msg.is_multipart() and ctype != "message/rfc822":
        out = []
        payload = msg.get_payload()
        for sub in payload if isinstance(payload, list) else []:
            if isinstance(sub, Message):
                out.extend(_leaves(sub, depth + 1))
        return out
    return [msg]


def _has_defects(msg: Message) -> bool:
    for part in msg.walk():
        if getattr(part, "defects", None):
            return True
    return False
