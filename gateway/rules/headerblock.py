"""Edit the top-level header block of a message held as bytes.

Mutations (prepend_subject, add_header, rewrite_sender) change a few header
fields and must leave every other byte alone, so that the body, the MIME
structure and untouched fields reach the DKIM signer exactly as sent.
Fields are kept as raw bytes (folding preserved); new values that are not
ASCII are written as RFC 2047 encoded-words.

Where the header section ends is read as Postfix's cleanup reads it: at the
blank line, or at the first line that is neither a field (``name:``, the name
printable ASCII) nor the continuation of one.  Such a line is the first line of
the body, never dropped: the blank line Postfix would insert before it is
written out here, so that the DKIM signer, the archive and the upstream MTA all
read the relayed message the same way.  The email package (and so the Context
the rules saw) ends the section at the same line, except at an obsolete
``name :`` field (a blank before the colon), which Postfix and this class read
as a field.
"""

from __future__ import annotations

import re
from email.header import Header, decode_header, make_header

#: A header field's first line (Postfix's is_header): a name of printable ASCII other than
#: the colon, optional blanks (RFC 5322 §4.5.3 obsolete syntax), then the colon.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


class HeaderBlock:
    """The header fields of ``data`` plus the untouched rest (blank line + body)."""

    def __init__(self, data: bytes):
        self.fields: list[tuple[str, bytes]] = []  # (lower-case name, full raw field incl. CRLF)
        #: True when a line that is not a field ended the header section without the blank
        #: line: ``rest`` then starts with the blank line put in before it (as Postfix does).
        self.separator_added = False
        self.rest = b""
        pos = 0
        while pos < len(data):
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


def encode_field(name: str, value: str) -> bytes:
    """``Name: value\\r\\n``, RFC 2047-encoded if needed, folded, no bare CR/LF."""
    value = value.replace("\r", " ").replace("\n", " ")
    if value.isascii():
        text = Header(value, header_name=name, maxlinelen=998).encode(linesep="\r\n")
    else:
        text = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {text}\r\n".encode("ascii")
