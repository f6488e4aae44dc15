"""Syntax checks on what a client sends, before anything goes upstream."""

from __future__ import annotations

import binascii
import email.quoprimime
import email.utils
import re
import unicodedata
from email.message import Message
from typing import NamedTuple

# A plain mailbox: local@domain, no source routes, no %-hacks, no bang paths,
# no quoted local part, no control characters.
_LOCAL_UTF8 = r"(?:[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]|[^\x00-\x7f])+"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}|\[[0-9.:A-Fa-f]+\]"
_U = r"[^\x00-\x7f]"  # any non-ASCII character (internationalised names, RFC 6531)
_DOMAIN_UTF8 = (
    rf"(?:(?:[A-Za-z0-9]|{_U})(?:(?:[A-Za-z0-9-]|{_U}){{0,61}}(?:[A-Za-z0-9]|{_U}))?\.)+(?:[A-Za-z]|{_U}){{2,63}}"
)
ADDRESS = re.compile(rf"^{_LOCAL_UTF8}@(?:{_DOMAIN}|{_DOMAIN_UTF8})$")
HELO = re.compile(r"^[A-Za-z0-9.\-_:\[\]]{1,255}$")


def address_problem(address: str) -> str | None:
    """Why an envelope address is unacceptable for relaying, or None."""
    if any(c in address for c in "\r\n\x00"):
        return "control characters in address"
    if len(address) > 320:
        return "address too long"
    local, _, domain = address.rpartition("@")
    if not local or not domain:
        return "address must be local@domain"
    if local.startswith('"') or "%" in local or "!" in local or "@" in local:
        return "source routes, %-hacks, bang paths and quoted local parts are not relayed"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "malformed local part"
    if not ADDRESS.match(address):
        return "malformed address"
    return None


def helo_problem(name: str) -> str | None:
    if not HELO.match(name or ""):
        return "HELO/EHLO name must be a host name or address literal"
    return None


def has_bare_cr(data: bytes) -> bool:
    """True if ``data`` has a CR that is not followed by LF.

    Such bytes let the next hop end the message early (SMTP smuggling,
    CVE-2023-51764 family); no legitimate client sends them, so the message
    is refused.
    """
    return data.count(b"\r") != data.count(b"\r\n")


def normalize_bare_lf(data: bytes) -> bytes:
    """Turn every LF not preceded by CR into CRLF (Postfix's
    ``smtpd_forbid_bare_newline = normalize``).

    Some scripts and old clients end lines with a bare LF.  aiosmtpd ends DATA
    only at CRLF.CRLF, so a fake end-of-data written with bare LFs stays inside
    this message; normalising it here, and dot-stuffing on relay, keeps it
    there at the next hop too.
    """
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


SENDER_FIELDS = ("From", "Sender")


class ForeignSender(NamedTuple):
    """An address in a From or Sender field that is not the user's: the field's address itself
    (``display_name`` empty), or an address a reader sees in the display name (or comment) of
    one of the field's mailboxes, ``display_name`` then being that name, decoded."""

    address: str
    display_name: str = ""


MAX_SENDER_FIELD = 8192  # characters of one From or Sender field the check parses (see below)


def foreign_header_senders(headers: Message, own: set[str]) -> list[ForeignSender]:
    """The addresses in the From and Sender fields (every occurrence) that are not in ``own``
    (lower-case addresses), in order; a field that names no address a reader could parse
    (getaddresses finds none, yet it has an "@") is returned as its text.  Then the addresses
    shown in those fields' display names that are not in ``own`` (``display_name_addresses``:
    many mail programs, on phones above all, show only the name, so ``"bob@acme.test"
    <alice@acme.test>`` would pass for Bob's mail).  Sender spoofing in the header: MAIL FROM
    is checked at MAIL; recipients' mail programs show these fields.
    ``headers``: the policy's Context.headers, parsed from the header section the SMTP handler
    wrote as Postfix reads it (gateway/rules/headerblock.py ``as_postfix_reads``), so every
    From and Sender field that is relayed is here — none hidden behind a line another reader
    takes for the end of the header section.  A field's raw bytes are read as UTF-8 (RFC 6532),
    as mail programs show them."""
    foreign: list[ForeignSender] = []
    named: list[ForeignSender] = []
    for text in _sender_fields(headers):
        if len(text) > MAX_SENDER_FIELD:
            # No mail program writes such a From; parsing it would hold the event loop
            # (getaddresses: ~5 s for 1 MB of "a@a@…").  Refused, as a field naming no
            # address it could be checked for.
            foreign.append(ForeignSender(" ".join(text[:200].split())))
            continue
        pairs = email.utils.getaddresses([text])
        addresses = [addr.strip() for _, addr in pairs if addr.strip()]
        if not addresses and "@" in text:
            addresses = [" ".join(text.split())[:200]]
        for address in addresses:
            if address.lower() not in own and address not in (f.address for f in foreign):
                foreign.append(ForeignSender(address))
        for name, _ in pairs:
            shown = decode_encoded_words(name)
            for address in display_name_addresses(shown):
                if address not in own and address not in (f.address for f in named):
                    named.append(ForeignSender(address, shown))
    return foreign + named


def _sender_fields(headers: Message) -> list[str]:
    """The values of every From and Sender field in ``headers``, unfolded, raw 8-bit bytes
    read as UTF-8 (compat32's ``get_all`` would turn those into U+FFFD)."""
    wanted = {name.lower() for name in SENDER_FIELDS}
    return [value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            for name, value in headers.raw_items() if name.lower() in wanted]


# An RFC 2047 encoded word, found wherever it stands (mail programs decode it there too).
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")


def decode_encoded_words(text: str) -> str:
    """``text`` with its RFC 2047 encoded words decoded, as a mail program shows it: the
    white space between two encoded words dropped, an unknown charset read as UTF-8, an
    undecodable word left as it is."""
    out: list[str] = []
    pos = 0
    after_word = False
    for m in _ENCODED_WORD.finditer(text):
        between = text[pos:m.start()]
        if not (after_word and not between.strip()):
            out.append(between)
        word = _decoded_word(m)
        out.append(m.group(0) if word is None else word)
        after_word = word is not None
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def _decoded_word(m: re.Match[str]) -> str | None:
    charset, encoding, payload = m.group(1).split("*")[0], m.group(2).upper(), m.group(3)
    try:
        if encoding == "Q":
            raw = email.quoprimime.header_decode(payload).encode("latin-1")
        else:
            raw = binascii.a2b_base64(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, UnicodeEncodeError):
        return None
    try:
        return raw.decode(charset, "replace")
    except LookupError:
        return raw.decode("utf-8", "replace")


# Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties): shown as nothing, so
# "bob\u200b@acme.test" reads as bob@acme.test.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
# Full stops NFKC leaves alone that IDNA (and so a reader) takes for the dot of a domain.
_DOTS = str.maketrans({"\u3002": "."})
SHOWN_CHARS = 1000  # of a display name, searched for addresses
_LOCAL_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$&'*+/=?^_`{|}~.-")
_DOMAIN_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


def _word_char(c: str, ascii_set: frozenset[str]) -> bool:
    if c < "\x80":
        return c in ascii_set
    return unicodedata.category(c)[0] in "LMN"  # a letter, mark or digit of any script


def display_name_addresses(name: str) -> list[str]:
    """The e-mail addresses a reader sees in the display name ``name`` (decoded already),
    lower-case, in order: NFKC folds full-width and other compatibility forms (＠ ﹫ ．), the
    ideographic full stop reads as a dot, invisible characters are dropped; then every
    local@domain with a dotted domain, written without spaces, counts.  "Sales @ ACME" or
    "Team@ACME" names no address.  Only the first ``SHOWN_CHARS`` characters count (white space
    runs read as one space), as no mail program shows more of a name."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", name)).translate(_DOTS)
    text = " ".join(text.split())[:SHOWN_CHARS].lower()
    found: list[str] = []
    at = text.find("@")
    while at >= 0:
        start = at
        while start > 0 and _word_char(text[start - 1], _LOCAL_ASCII):
            start -= 1
        end = at + 1
        while end < len(text) and _word_char(text[end], _DOMAIN_ASCII):
            end += 1
        candidate = text[start:at].strip(".") + "@" + text[at + 1:end].strip(".")
        if ADDRESS.match(candidate) and candidate not in found:
            found.append(candidate)
        at = text.find("@", at + 1)
    return found
