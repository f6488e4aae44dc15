"""Syntax checks on what a client sends, before anything goes upstream."""

from __future__ import annotations

import email.utils
import re
from email.message import Message

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


def foreign_header_senders(headers: Message, own: set[str]) -> list[str]:
    """The addresses in the From and Sender fields (every occurrence) that are not in ``own``
    (lower-case addresses), in order; a field that names no address a reader could parse
    (getaddresses finds none, yet it has an "@") is returned as its text.  Sender spoofing in
    the header: MAIL FROM is checked at MAIL; recipients' mail programs show these fields.
    ``headers``: the policy's Context.headers, parsed from the header section the SMTP handler
    wrote as Postfix reads it (gateway/rules/headerblock.py ``as_postfix_reads``), so every
    From and Sender field that is relayed is here — none hidden behind a line another reader
    takes for the end of the header section."""
    foreign: list[str] = []
    for name in SENDER_FIELDS:
        for value in headers.get_all(name) or ():
            text = str(value)
            addresses = [addr.strip() for _, addr in email.utils.getaddresses([text]) if addr.strip()]
            if not addresses and "@" in text:
                addresses = [" ".join(text.split())[:200]]
            foreign += [a for a in addresses if a.lower() not in own and a not in foreign]
    return foreign
