"""What the policy sees and what it answers (docs/ARCHITECTURE.md §2).

A submitted message becomes one ``Context``; rules read it and append to its
trace; the outcome is one ``Verdict``: accept, reject(reason) or
hold(approvers), plus the mutations to apply afterwards.

``headers`` and ``raw`` are one reading of the message: the SMTP handler first writes the
header section, and the MIME parts' ones, as Postfix reads them (gateway/rules/headerblock.py
``as_postfix_reads``), so the fields the compat32 parser gives the rules and the spoof check
(and the parts the attachment conditions find) are the ones the mutations edit, the archive
keeps and the upstream relays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from email.header import Header, decode_header, make_header
from email.message import Message

from gateway.archive.headertext import getaddresses
from gateway.directory import EmployeeInfo

ACCEPT = "accept"
REJECT = "reject"
HOLD = "hold"


def header_text(value: object) -> str:
    """A header value from the compat32 parser as text (never raises), without NULs (a raw NUL or
    one an encoded-word decodes to: PostgreSQL refuses them in the archive record, the hold
    and the queue row, and the message would get 451 on every try)."""
    if value is None:
        return ""
    if isinstance(value, Header):  # a raw non-ASCII value: chunks of surrogate-escaped bytes
        value = "".join(str(chunk) for chunk, _ in value._chunks)  # noqa: SLF001
    text = str(value)
    if any("\udc80" <= c <= "\udcff" for c in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except Exception:  # noqa: BLE001 - a malformed encoded-word stays as written
            pass
    return " ".join(text.replace("\x00", " ").split())


@dataclass
class Session:
    """Facts about the SMTP session the message came in on."""

    peer_ip: str = ""
    helo: str = ""
    tls: bool = False
    authenticated: bool = False
    trusted_network: bool = False


@dataclass
class TraceStep:
    rule: str
    hit: bool
    why: str
    mode: str = "enforce"

    def as_dict(self) -> dict:
        return {"rule": self.rule, "hit": self.hit, "why": self.why, "mode": self.mode}


@dataclass
class Verdict:
    action: str = ACCEPT
    reason: str = ""
    smtp_code: int = 250
    enhanced: str = "2.0.0"
    approvers: list[str] = field(default_factory=list)
    mutations: list = field(default_factory=list)
    rule: str = ""

    @classmethod
    def reject(cls, rule: str, reason: str, code: int = 550, enhanced: str = "5.7.1") -> Verdict:
        return cls(action=REJECT, reason=reason, smtp_code=code, enhanced=enhanced, rule=rule)


#: The trace's name for the refusal of MIME structure that readers read differently.
AMBIGUOUS_MIME = "ambiguous-mime"


def ambiguous_mime_refusal(ctx: Context, what: str) -> Verdict:
    """The verdict on a message whose MIME structure readers read differently (``what``: which
    structure, where — field names and part numbers, nothing of the content; found by
    ``as_postfix_reads``): refused, the rules not asked — they would read it one way, the
    recipient's program perhaps the other.  RFC 3463 X.6.0 (other or undefined media error),
    as Postfix answers a MIME error it rejects.  Recorded in ``ctx``'s trace."""
    ctx.record(AMBIGUOUS_MIME, True, what)
    return Verdict.reject(AMBIGUOUS_MIME, f"Ambiguous MIME structure: {what}; refused", 550, "5.6.0")


@dataclass
class Context:
    mail_from: str
    rcpt_tos: list[str]
    headers: Message  # parsed header block only; the body stays in ``raw``
    raw: bytes
    employee: EmployeeInfo | None
    # The client's bytes as submitted (trace fields on top) when ``raw`` is what the gateway made
    # of them on arrival (gateway/rules/headerblock.py as_postfix_reads: the header section as
    # Postfix reads it, which ``headers`` and ``raw`` both are); None when they are ``raw``.
    submitted: bytes | None = None
    # MIME structure that readers read differently, found on arrival (``as_postfix_reads``): the
    # first, described for a user; "" when there is none.  Such a message is refused
    # (``ambiguous_mime_refusal``), never decided on by the rules.
    ambiguous_mime: str = ""
    session: Session = field(default_factory=Session)
    trace: list[TraceStep] = field(default_factory=list)
    approved: bool = False
    language: str = "zh-CN"
    # When set, the recipients rules look at (instead of envelope + To/Cc/Bcc): a part
    # of a message split between recipients who need approval and those who do not.
    recipient_scope: list[str] | None = None

    def narrowed(self, recipients: list[str]) -> Context:
        """The same message for some envelope recipients only: a fresh trace, no cached facts."""
        return dataclasses.replace(self, rcpt_tos=list(recipients), trace=[],
                                   recipient_scope=[r.strip().lower() for r in recipients])

    def header_addresses(self, *names: str) -> list[str]:
        values = []
        for name in names:
            values.extend(str(v) for v in self.headers.get_all(name, []))
        return [addr for _, addr in getaddresses(tuple(values)) if addr]  # remembered: the same values recur

    def all_recipients(self) -> list[str]:
        """Envelope recipients plus To/Cc/Bcc, lower-cased, de-duplicated, in order."""
        if self.recipient_scope is not None:
            return list(dict.fromkeys(self.recipient_scope))
        seen: dict[str, None] = {}
        for addr in [*self.rcpt_tos, *self.header_addresses("To", "Cc", "Bcc")]:
            seen.setdefault(addr.strip().lower(), None)
        return list(seen)

    @property
    def subject(self) -> str:
        """The Subject as a reader sees it: RFC 2047 words decoded (Outlook and Foxmail encode
        every Chinese subject), raw 8-bit bytes read as UTF-8, folding removed."""
        return header_text(self.headers.get("Subject"))

    def record(self, rule: str, hit: bool, why: str, mode: str = "enforce") -> None:
        self.trace.append(TraceStep(rule, hit, why, mode))
