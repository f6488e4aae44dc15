"""The header sections of MIME parts, written as Postfix's cleanup writes them.

Postfix's cleanup reads every MIME header section it finds (its mime_state machine: the parts
of a multipart, between boundary lines; the message inside a message/rfc822 part) as it reads
the message's own (gateway/rules/headerblock.py): ``name : value`` becomes ``name: value``,
a line that is neither a field nor a continuation starts the part's body after a blank line
put before it.  The email package, with which the rules read attachments and body text
(gateway/rules/content.py) and the archive indexes, ends a part's header section at
``Content-Type : …`` — the part is text to it, an attachment to the recipient.  So
``as_postfix_reads`` has this module write the parts' header sections as Postfix would,
before any rule reads them.

Boundaries are found as Postfix finds them: in a body, a line ``--`` + the boundary of any
open multipart, whatever follows it (``--`` after it closes that multipart); an outer
boundary closes the inner multiparts.

Structure that readers read differently is not made to agree: no repair would be what every
mail program shows.  The walk notes it instead (``ambiguities``), and the SMTP handler
refuses the message (docs/ARCHITECTURE.md, "One reading of the header section"):

- two Content-Type, Content-Disposition or Content-Transfer-Encoding fields that mean
  different things in one header section (the message's, a part's, an attached message's):
  the email package, and so the rules, reads the first, Postfix and some mail programs the
  last;
- a boundary line with text after it (``--b1x``, ``--b1--x``): a boundary for Postfix (a
  prefix match), not for the email package, which allows only blanks after it (RFC 2046's
  transport padding, which stays accepted);
- multiparts nested deeper than Postfix's limit (it reads no deeper; the email package does).

Duplicates that mean the same (blanks, quotes, the case of names and of the charset, the
order of parameters aside) are read alike by everyone and pass; other duplicates
(MIME-Version, which some programs write in every part) choose nothing and are not looked at.
"""

from __future__ import annotations

import re
from email.utils import collapse_rfc2231_value

from gateway.mimeparts import SafeParamsMessage

#: A field's first line (Postfix's is_header), and its obsolete form (blanks before the colon).
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_OBSOLETE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]+:")
MAX_DEPTH = 100  # Postfix's mime_nesting_limit: deeper parts are left as they are
MAX_BOUNDARY = 2048  # Postfix's mime_boundary_length_limit: a longer boundary is cut there
#: The fields whose first or last occurrence readers choose differently (RFC 2045 allows one).
UNIQUE_FIELDS = (b"content-type", b"content-disposition", b"content-transfer-encoding")
_DISPLAY = {b"content-type": "Content-Type", b"content-disposition": "Content-Disposition",
            b"content-transfer-encoding": "Content-Transfer-Encoding"}


class _Open:
    """A multipart whose close delimiter has not come yet, and what is known of where its
    boundary lines are (the walk only moves forward: every byte is searched once a boundary)."""

    def __init__(self, boundary: bytes, digest: bool, name: str, prefix: str):
        self.boundary = boundary
        self.digest = digest  # multipart/digest: a part without Content-Type is message/rfc822
        self.name = name  # what the multipart is, for a user ("MIME part 2", "the message body")
        self.prefix = prefix  # its parts' numbers (IMAP's) start so: "" at the top, "2." in part 2
        self.parts = 0  # parts begun so far
        self.needle = b"\n--" + boundary
        self.found = -1  # the start of a boundary line found, not yet passed
        self.clear = 0  # no boundary line starts before this (from where the walk is on)

    def next_line(self, data: bytes, pos: int, end: int) -> int:
        """The start of the first line in [pos, end) that begins ``--`` + the boundary, or -1
        (``pos`` > 0: a line start, after the header section)."""
        if self.found >= pos:
            return self.found if self.found < end else -1
        start = max(pos, self.clear)
        if start >= end:
            return -1
        at = data.find(self.needle, max(start - 1, 0), end - 1 + len(self.needle))
        if at < 0:
            self.clear = end
            return -1
        self.found = at + 1
        return at + 1


def differing_field(fields: list[bytes]) -> str | None:
    """The name of a field in ``UNIQUE_FIELDS`` that ``fields`` (one header section's, raw)
    hold twice with values that mean different things, or None.  The same meaning written
    otherwise is no disagreement: git-send-email writes ``charset=UTF-8`` and
    ``charset="utf-8"`` in two Content-Type fields of one message."""
    seen: dict[bytes, list[str]] = {}
    for raw in fields:
        name, _, value = raw.partition(b":")
        name = name.strip().lower()
        if name in UNIQUE_FIELDS:
            seen.setdefault(name, []).append(" ".join(value.decode("latin-1").split()))
    for name, values in seen.items():
        if len(values) > 1 and len({_meaning(name, v) for v in values}) > 1:
            return _DISPLAY[name]
    return None


def _meaning(name: bytes, value: str) -> tuple:
    """What a MIME field's value says, as a reader takes it: the type (or disposition,
    encoding) in lower case, the parameters by lower-case name, unquoted, the charset's
    value in lower case (a charset name is case-insensitive), their order aside."""
    if name == b"content-transfer-encoding":
        return (value.lower(),)
    msg = SafeParamsMessage()  # the policy's parser's class: a mixed RFC 2231 list does not raise
    msg[name.decode()] = value
    try:
        params = msg.get_params(header=name.decode(), unquote=True) or []
    except Exception:  # noqa: BLE001 - unreadable parameters: the text itself is all there is
        return (value,)
    items = []
    for key, val in params[1:]:
        key = key.lower()
        val = collapse_rfc2231_value(val)
        items.append((key, val.lower() if key == "charset" else val))
    return (value.partition(";")[0].strip().lower(), tuple(sorted(items)))


def _boundary_tail(data: bytes, after: int) -> bool:
    """Whether the boundary line whose boundary ends at ``after`` has text after it (or after
    the ``--`` of a close delimiter) other than blanks: a boundary line for Postfix, body text
    for the email package."""
    tail = data[after:_line_end(data, after)]
    if tail.startswith(b"--"):
        tail = tail[2:]
    return bool(tail.strip(b" \t\r\n"))


def _content_type(fields: list[bytes], default: str) -> tuple[str, bytes | None, bool]:
    """(type/subtype, multipart boundary, whether a Content-* field comes twice) from a header
    section's fields: the last Content-Type's type (Postfix reads each as it comes), read as
    the email package's get_content_type reads it; ``default`` without one."""
    ctype, boundary, twice = default, None, False
    mime: set[bytes] = set()
    for raw in fields:
        name, _, value = raw.partition(b":")
        name = name.strip().lower()
        if name[:8] == b"content-":
            twice = twice or name in mime
            mime.add(name)
        if name != b"content-type":
            continue
        text = " ".join(value.decode("latin-1").split())
        ctype = text.partition(";")[0].strip().lower()
        if ctype.count("/") != 1:
            ctype = "text/plain"
        elif ctype.startswith("multipart/"):
            found = _boundary(text)
            boundary = found.encode("latin-1", "replace")[:MAX_BOUNDARY] if found else None
    return ctype, boundary, twice


#: ``; boundary=token`` or ``; boundary="quoted"`` and nothing unusual (no backslash, no
#: RFC 2231, no <>): the email package's get_boundary answers the same, faster.
_SIMPLE_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"\\]*)"|([^\s;"<\\][^\s;"\\]*))\s*(?:;|$)', re.I)


def _boundary(text: str) -> str | None:
    """The boundary of a multipart Content-Type value, as the email package reads it."""
    if text.lower().count("boundary") == 1 and "*" not in text:
        m = _SIMPLE_BOUNDARY.search(text)
        if m is not None:
            return (m.group(1) if m.group(1) is not None else m.group(2)).rstrip()
    msg = SafeParamsMessage()  # the policy's parser's class: a mixed RFC 2231 list does not raise
    msg["Content-Type"] = text
    try:
        return msg.get_boundary()
    except Exception:  # noqa: BLE001 - a value the email package cannot read has no boundary for it
        return None


def _line_end(data: bytes, pos: int) -> int:
    eol = data.find(b"\n", pos)
    return len(data) if eol < 0 else eol + 1


class _Writer:
    """The message's bytes with the parts' header sections repaired (chunks, and whether any
    byte changed)."""

    def __init__(self, data: bytes):
        self.data = data
        self.chunks: list[bytes] = []
        self.copied = 0  # data[:copied] is in chunks
        self.changed = False

    def replace(self, start: int, end: int, new: bytes) -> None:
        self.chunks.append(self.data[self.copied:start])
        self.chunks.append(new)
        self.copied = end
        self.changed = True

    def result(self) -> bytes:
        if not self.changed:
            return self.data
        self.chunks.append(self.data[self.copied:])
        return b"".join(self.chunks)


def _header_section(w: _Writer, pos: int) -> tuple[int, list[bytes]]:
    """Read a part's header section at ``pos``: its fields (repaired), and where what follows
    it starts — after its blank line, or at the line that ended it (a blank line written
    before that one)."""
    data = w.data
    fields: list[bytes] = []
    while pos < len(data):
        end = _line_end(data, pos)
        line = data[pos:end]
        if line in (b"\r\n", b"\n"):
            return end, fields
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD.match(line):
            m = _OBSOLETE.match(line)
            if m is not None:
                line = m.group(1) + b":" + line[m.end():]
                w.replace(pos, end, line)
            fields.append(line)
        else:  # not a field: the body starts here, after a blank line
            w.replace(pos, pos, b"\n" if line.endswith(b"\n") and not line.endswith(b"\r\n") else b"\r\n")
            return pos, fields
        pos = end
    return pos, fields


def _next_boundary(data: bytes, pos: int, stack: list[_Open]) -> tuple[int, int, int] | None:
    """The next line at or after ``pos`` (a line start) that starts ``--`` + an open boundary:
    (its start, the index of that multipart in ``stack``, the index after the boundary).  On a
    line that starts with more than one, the innermost's (Postfix looks at it first)."""
    best, best_i = len(data), -1
    for i, open_ in enumerate(stack):  # the outermost first: its next line bounds the others' search
        at = open_.next_line(data, pos, best + 1)
        if at >= 0:
            best, best_i = at, i
    if best_i < 0:
        return None
    return best, best_i, best + 2 + len(stack[best_i].boundary)


def rewrite_parts(data: bytes, body_at: int, top_fields: list[bytes],
                  ambiguities: list[str] | None = None) -> bytes:
    """``data`` with the header sections of its MIME parts written as Postfix writes them
    (``data`` itself when nothing changes).  ``body_at``: where the message's body starts;
    ``top_fields``: its header fields (raw).  Structure that readers read differently is
    appended to ``ambiguities`` (when given), described for a user: what, and where."""
    ctype, boundary, _ = _content_type(top_fields, "text/plain")
    if not (ctype.startswith("multipart/") and boundary) and ctype != "message/rfc822":
        return data
    w = _Writer(data)
    stack: list[_Open] = []
    pos = body_at
    label, name = "", "the message body"  # the part being read: its number, what it is called
    while True:
        depth = 0
        while ctype == "message/rfc822" and depth < MAX_DEPTH:  # a message's header section follows
            depth += 1
            label = label or "1"
            name = f"the message attached as MIME part {label}"
            pos, fields = _header_section(w, pos)
            ctype, boundary, twice = _content_type(fields, "text/plain")
            if twice and ambiguities is not None and (field := differing_field(fields)):
                ambiguities.append(f"two different {field} fields in the header of {name}")
        if ctype.startswith("multipart/") and boundary:
            if len(stack) < MAX_DEPTH:
                stack.append(_Open(boundary, ctype == "multipart/digest", name, f"{label}." if label else ""))
            elif ambiguities is not None:
                ambiguities.append(f"MIME parts nested deeper than {MAX_DEPTH} levels in {name}")
        found = _next_boundary(data, pos, stack) if stack else None
        if found is None:
            return w.result()
        at, i, after = found
        if ambiguities is not None and _boundary_tail(data, after):
            ambiguities.append(f"a boundary line with text after it in {stack[i].name}")
        del stack[i + 1:]  # an outer boundary closes the inner multiparts
        if data.startswith(b"--", after):  # the close delimiter
            stack.pop()
            pos, ctype, boundary = _line_end(data, at), "", None
            continue
        open_ = stack[i]
        open_.parts += 1
        label = f"{open_.prefix}{open_.parts}"
        name = f"MIME part {label}"
        pos, fields = _header_section(w, _line_end(data, at))
        ctype, boundary, twice = _content_type(fields, "message/rfc822" if open_.digest else "text/plain")
        if twice and ambiguities is not None and (field := differing_field(fields)):
            ambiguities.append(f"two different {field} fields in {name}")
