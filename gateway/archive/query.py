"""The auditor's search syntax, parsed into a ``Query``.

    报价单 "price list" from:hans@hamburg.de to:alice subject:样品 after:2026-01-01
    before:2026-07-01 has:attachment direction:in employee:alice@acme.test customer:Hamburg

* free terms and "quoted phrases" match anywhere (subject, addresses, names, body,
  attachment names), case-insensitively, as substrings; all of them must match;
* ``from:`` / ``to:`` (To, Cc, Bcc) / ``subject:`` match inside that field;
* ``after:`` (inclusive) / ``before:`` (exclusive) take YYYY-MM-DD (UTC days);
* ``has:attachment``; ``direction:in|out``; ``employee:<email or id>``;
  ``customer:<name or id>`` (mail to or from the customer's contacts and company domains).

Field names are case-insensitive; a value may be quoted (``from:"Hans Müller"``).
``parse`` raises ``QueryError`` with a one-line message for anything else; it never
raises anything else (hypothesis-tested).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

MAX_QUERY = 1000  # characters
MAX_TERMS = 20
TEXT_FIELDS = ("from", "to", "subject")
FIELDS = (*TEXT_FIELDS, "after", "before", "has", "direction", "employee", "customer")
_DIRECTIONS = {"in": "in", "inbound": "in", "out": "out", "outbound": "out"}


class QueryError(ValueError):
    """A query that cannot be run, with a message fit to show the auditor."""


@dataclass
class Query:
    terms: list[str] = field(default_factory=list)  # free terms and phrases
    fields: list[tuple[str, str]] = field(default_factory=list)  # (from|to|subject, text)
    after: dt.date | None = None
    before: dt.date | None = None
    has_attachment: bool = False
    direction: str = ""
    employee: str = ""
    customer: str = ""

    @property
    def is_empty(self) -> bool:
        return not (self.terms or self.fields or self.after or self.before or self.has_attachment
                    or self.direction or self.employee or self.customer)


def _tokens(text: str) -> list[tuple[str | None, str, bool]]:
    """Split into (field or None, value, quoted)."""
    out: list[tuple[str | None, str, bool]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        name = None
        j = i
        while j < n and (text[j].isascii() and text[j].isalpha()):
            j += 1
        if j > i and j < n and text[j] == ":":
            name = text[i:j].lower()
            i = j + 1
            if i >= n or text[i].isspace():
                raise QueryError(f"{name}: needs a value (write {name}:VALUE without a space)")
        if text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise QueryError("a quote is not closed: add the closing \"")
            value = text[i + 1:end]
            i = end + 1
            out.append((name, value, True))
        else:
            j = i
            while j < n and not text[j].isspace():
                if text[j] == '"':
                    raise QueryError("a quote inside a word: put the whole phrase in quotes")
                j += 1
            out.append((name, text[i:j], False))
            i = j
    return out


def _date(name: str, value: str) -> dt.date:
    try:
        if len(value) != 10:
            raise ValueError
        return dt.date.fromisoformat(value)
    except ValueError:
        raise QueryError(f"{name}: takes a date as YYYY-MM-DD, not {value!r}") from None


def parse(text: str) -> Query:
    """Parse the search syntax; raises QueryError with a clear message on bad input."""
    if not isinstance(text, str):
        raise QueryError("the query must be text")
    if len(text) > MAX_QUERY:
        raise QueryError(f"the query is too long (at most {MAX_QUERY} characters)")
    if "\x00" in text:
        raise QueryError("the query contains a NUL character")
    q = Query()
    for name, value, _quoted in _tokens(text):
        value = " ".join(value.split())
        if name is None:
            if value:
                q.terms.append(value)
            continue
        if name not in FIELDS:
            raise QueryError(f"unknown field {name}: — known fields: {', '.join(f + ':' for f in FIELDS)}"
                             f" (to search for the text itself, put it in quotes)")
        if not value:
            raise QueryError(f"{name}: needs a value")
        if name in TEXT_FIELDS:
            q.fields.append((name, value))
        elif name == "after":
            q.after = _date(name, value)
        elif name == "before":
            q.before = _date(name, value)
        elif name == "has":
            if value.lower() not in ("attachment", "attachments"):
                raise QueryError(f"has: only knows has:attachment, not {value!r}")
            q.has_attachment = True
        elif name == "direction":
            if value.lower() not in _DIRECTIONS:
                raise QueryError(f"direction: is in or out, not {value!r}")
            q.direction = _DIRECTIONS[value.lower()]
        elif name == "employee":
            q.employee = value
        elif name == "customer":
            q.customer = value
    if len(q.terms) + len(q.fields) > MAX_TERMS:
        raise QueryError(f"too many terms (at most {MAX_TERMS})")
    if q.after and q.before and q.after >= q.before:
        raise QueryError("after: must be earlier than before:")
    return q
