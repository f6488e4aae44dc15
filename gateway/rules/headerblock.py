"""Edit the top-level header block of a message held as bytes.

Mutations (prepend_subject, add_header, rewrite_sender) change a few header
fields and must leave every other byte alone, so that the body, the MIME
structure and untouched fields reach the DKIM signer exactly as sent.
Fields are kept as raw bytes (folding preserved); new values that are not
ASCII are written as RFC 2047 encoded-words.
"""

from __future__ import annotations

from email.header import Header, decode_header, make_header

_SEP = b"\r\n\r\n"


class HeaderBlock:
    """The header fields of ``data`` plus the untouched rest (blank line + body)."""

    def __init__(self, data: bytes):
        end = data.find(_SEP)
        if end < 0:
            head, self.rest = data, b""
        else:
            head, self.rest = data[: end + 2], data[end + 2:]
        self.fields: list[tuple[str, bytes]] = []  # (lower-case name, full raw field incl. CRLF)
        for line in head.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t") and self.fields:
                name, raw = self.fields[-1]
                self.fields[-1] = (name, raw + line)
            elif b":" in line:
                self.fields.append((line.split(b":", 1)[0].strip().lower().decode("latin-1"), line))

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
