"""Edit the top-level header block of a message held as bytes; and read it, once, the way
Postfix does (``as_postfix_reads``).

Mutations (prepend_subject, add_header, rewrite_sender) change a few header
fields and must leave every other byte alone, so that the body, the MIME
structure and untouched fields reach the DKIM signer exactly as sent.
Fields are kept as raw bytes (folding preserved); new values that are not
ASCII are written as RFC 2047 encoded-words.

Where the header section ends is read as Postfix's cleanup reads it: at the
blank line, or at the first line that is neither a field (``name:``, the name
printable ASCII, blanks allowed before the colon) nor the continuation of one.
Such a line is the first line of the body, never dropped: the blank line Postfix
would insert before it is written out here.

One reading for every decision (docs/ARCHITECTURE.md, "One reading of the header
section"): readers disagree on a header section that is not plain ``name:`` fields
and continuation lines up to a blank line — the email package (the policy's
Context, the rules' MIME parse, the archive's index) ends it at an obsolete
``name : value`` field, and reads on past a ``From `` line or a ``: value`` line
that Postfix takes as the first body line.  A field that only some readers see is a
field a rule can miss while the recipient's mail program shows it (a spoofed From,
a colleague's customer in Cc).  So the SMTP handler puts every submitted message
through ``as_postfix_reads`` on arrival, before anything reads it: what the policy,
the spoof check, the mutations, the archive and the upstream see is then one header
section that all of them read alike; the client's bytes as submitted are kept
beside it by the archive.  The header sections of MIME parts are written the same way
(gateway/rules/partheaders.py), so attachment rules see the parts the recipient sees.
"""

from __future__ import annotations

import re
from email.header import Header, decode_header, make_header

from gateway.rules.partheaders import UNIQUE_FIELDS, differing_field, rewrite_parts

#: A header field's first line (Postfix's is_header): a name of printable ASCII other than
#: the colon, optional blanks (RFC 5322 §4.5.3 obsolete syntax), then the colon.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
#: The obsolete form of a field's first line: blanks between the name and the colon.
_OBSOLETE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]+:")
#: A header section every reader reads alike: fields whose colon follows the name at once,
#: each with its continuation lines, then the blank line.  (Each line matches one way only:
#: no backtracking to speak of, whatever the input.)
_PLAIN_SECTION = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\n]*\n(?:[ \t][^\n]*\n)*)*\r?\n")
#: An mbox envelope line at the very start, which Postfix's smtpd turns into a field.
_MBOX_LINE = re.compile(rb">*From ")


class HeaderBlock:
    """The header fields of ``data`` plus the untouched rest (blank line + body)."""

    def __init__(self, data: bytes, limit: int | None = None):
        """``limit``: raise HeaderSectionTooLarge when the section goes on past that offset."""
        self.fields: list[tuple[str, bytes]] = []  # (lower-case name, full raw field incl. CRLF)
        #: True when a line that is not a field ended the header section without the blank
        #: line: ``rest`` then starts with the blank line put in before it (as Postfix does).
        self.separator_added = False
        self.rest = b""
        pos = 0
        while pos < len(data):
            if limit is not None and pos > limit:
                raise HeaderSectionTooLarge(f"the header section goes on past {limit} bytes")
            eol = data.find(b"\n", pos)
            end = len(data) if eol < 0 else eol + 1
            line = data[pos:end]
            if line in (b"\r\n", b"\n"):  # the blank line: the body follows
                self.rest = data[pos:]
                return
            if line[:1] in (b" ", b"\t") and self.fields:
                name, raw = self.fields[-1]
                self.fields[-1] = (name, raw + line)
            elif _FIELD.match(line):
                self.fields.append((line.split(b":", 1)[0].strip().lower().decode("latin-1"), line))
            else:  # not a field: the body starts here, without the blank line
                self.separator_added = True
                self.rest = (b"\n" if line.endswith(b"\n") and not line.endswith(b"\r\n") else b"\r\n") + data[pos:]
                return
            pos = end

    # -- reading ---------------------------------------------------------------
    def get_raw(self, name: str) -> bytes | None:
        name = name.lower()
        for field_name, raw in self.fields:
            if field_name == name:
                return raw.split(b":", 1)[1].strip(b" \t\r\n")
        return None

    def get(self, name: str) -> str | None:
        """The decoded (RFC 2047) unfolded value of the first field ``name``."""
        raw = self.get_raw(name)
        if raw is None:
            return None
        text = b" ".join(part.strip() for part in raw.splitlines()).decode("utf-8", "replace")
        try:
            return str(make_header(decode_header(text)))
        except Exception:
            return text

    def has(self, name: str) -> bool:
        return self.get_raw(name) is not None

    # -- editing ---------------------------------------------------------------
    def remove(self, name: str) -> int:
        name = name.lower()
        before = len(self.fields)
        self.fields = [(n, raw) for n, raw in self.fields if n != name]
        return before - len(self.fields)

    def set(self, name: str, value: str) -> None:
        """Replace the first field ``name`` in place (or append), removing duplicates."""
        new = (name.lower(), encode_field(name, value))
        for i, (field_name, _) in enumerate(self.fields):
            if field_name == name.lower():
                self.fields[i] = new
                self.fields = self.fields[: i + 1] + [f for f in self.fields[i + 1:] if f[0] != name.lower()]
                return
        self.fields.append(new)

    def add(self, name: str, value: str, *, top: bool = False) -> None:
        new = (name.lower(), encode_field(name, value))
        if top:
            self.fields.insert(0, new)
        else:
            self.fields.append(new)

    def to_bytes(self) -> bytes:
        return b"".join(raw for _, raw in self.fields) + self.rest


class HeaderSectionTooLarge(ValueError):
    """The header section does not end within the limit given."""


def as_postfix_reads(data: bytes, limit: int, ambiguities: list[str] | None = None) -> tuple[bytes, int]:
    """``data`` (a message with CRLF line ends) with its header section, and the header
    sections of its MIME parts (gateway/rules/partheaders.py), written the way Postfix's
    smtpd and cleanup write them; and the offset where its body starts (after the blank
    line; ``len`` when there is none).  ``data`` itself when nothing is to change, as for
    every well-formed message.  Raises HeaderSectionTooLarge when the message's header
    section goes on past ``limit`` bytes.  ``as_postfix_reads`` of the result is itself.

    MIME structure that readers read differently, which no rewriting makes agree (two
    different Content-Type fields, a boundary line with text after it: partheaders.py), is
    appended to ``ambiguities`` when given, described for a user (the SMTP handler refuses
    such a message)."""
    out, body_at = _top_section(data, limit)
    head = out[:body_at].lower()
    if ambiguities is not None and head.count(b"content-") > 1:
        top = [f for name in UNIQUE_FIELDS if head.count(name + b":") > 1 for f in _fields_named(out, head, name)]
        if top and (field := differing_field(top)):
            ambiguities.append(f"two different {field} fields in the message header")
    if b"multipart/" in head or b"message/" in head:  # a body of MIME parts, perhaps
        out = rewrite_parts(out, body_at, _fields_named(out, head, b"content-type"), ambiguities)
    return out, body_at


def _fields_named(data: bytes, head: bytes, name: bytes) -> list[bytes]:
    """The fields ``name`` (lower case; with their continuation lines) of the plain header
    section ``head`` (lower case) at the start of ``data``."""
    fields = []
    text = b"\n" + head  # a line starting at head[i] has its "\n" at text[i]
    needle = b"\n" + name + b":"
    at = text.find(needle)
    while at >= 0:
        end = at
        while True:
            eol = head.find(b"\n", end)
            end = len(head) if eol < 0 else eol + 1
            if head[end:end + 1] not in (b" ", b"\t"):
                break
        fields.append(data[at:end])
        at = text.find(needle, end)
    return fields


def _top_section(data: bytes, limit: int) -> tuple[bytes, int]:
    """``as_postfix_reads`` for the message's own header section (a plain one is checked at C
    speed and given back as it is).

    What changes, as Postfix changes it: leading ``From `` (or ``>From ``) lines become
    ``X-Mailbox-Line:`` fields (smtpd); a continuation line first is the first body line,
    a blank line put before it (smtpd); the blanks of an obsolete ``name : value`` are taken
    out (cleanup's mime_state: "things would be too confusing otherwise"); a line that is
    neither a field nor a continuation starts the body, a blank line put before it
    (cleanup, ``HeaderBlock``).  The result's header section is plain ``name:`` fields and
    continuation lines up to the blank line, which the email package, dkimpy, Postfix
    and mail programs read alike; ``as_postfix_reads`` of it is itself."""
    plain = _PLAIN_SECTION.match(data, 0, limit + 2)
    if plain is not None:
        return data, plain.end()
    pos, mailbox = 0, []
    while _MBOX_LINE.match(data, pos):
        if pos > limit:
            raise HeaderSectionTooLarge(f"the header section goes on past {limit} bytes")
        eol = data.find(b"\n", pos)
        end = len(data) if eol < 0 else eol + 1
        mailbox.append(b"X-Mailbox-Line: " + data[pos:end])
        pos = end
    head = b"".join(mailbox)
    if data[pos:pos + 1] in (b" ", b"\t"):  # a continuation of nothing: all of it is body
        out = head + b"\r\n" + data[pos:]
        return out, len(head) + 2
    block = HeaderBlock(data[pos:], limit=max(0, limit - len(head)))
    fields = b"".join(_OBSOLETE.sub(rb"\1:", raw, count=1) if _OBSOLETE.match(raw) else raw
                      for _, raw in block.fields)
    head += fields
    if len(head) > limit:
        raise HeaderSectionTooLarge(f"the header section goes on past {limit} bytes")
    out = head + block.rest
    if out == data:
        return data, len(data)  # a header section without a blank line and no body
    blank = block.rest[:2] if block.rest.startswith(b"\r\n") else block.rest[:1]
    return out, len(head) + len(blank)


def encode_field(name: str, value: str) -> bytes:
    """``Name: value\\r\\n``, RFC 2047-encoded if needed, folded, no bare CR/LF."""
    value = value.replace("\r", " ").replace("\n", " ")
    if value.isascii():
        text = Header(value, header_name=name, maxlinelen=998).encode(linesep="\r\n")
    else:
        text = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {text}\r\n".encode("ascii")
