"""Rule actions: what a matching rule does.

``reject`` and ``hold_for_approval`` shape the verdict; the others add
mutations, each carrying the ``stage`` it runs in (gateway.mutate.STAGES):
prepend_subject -> tag, rewrite_sender -> rewrite_sender, add_header /
add_bcc / notify -> headers.  The order of stages is fixed in code; a rule
file only says *what*, never *when*.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.mutate import Outgoing
from gateway.policy.context import HOLD, REJECT, Context, Verdict
from gateway.rewrite import RewriteSender, check_template
from gateway.rules.headerblock import HeaderBlock
from gateway.rules.parties import check_party

log = logging.getLogger("mailgate.rules")

ACTIONS: dict[str, type[Action]] = {}

#: Fields a rule may not add or replace: structure, identity, trace and signatures.
PROTECTED_HEADERS = frozenset(
    "from sender to cc bcc reply-to subject date message-id in-reply-to references received "
    "return-path dkim-signature arc-seal arc-message-signature arc-authentication-results "
    "authentication-results mime-version content-type content-transfer-encoding".split()
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")
_ADDRESS = re.compile(r"^[^@\s<>]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
_ENHANCED = re.compile(r"^[45]\.\d{1,3}\.\d{1,3}$")
NOTICE_FIELDS = ("sender", "sender_name", "subject", "recipients", "rule")

#: Set by the service (see gateway.rules.notices.SpoolNotifier); None: notices are only logged.
NOTIFIER: Callable[[list[str], str, str, Context], None] | None = None


def register(cls: type[Action]) -> type[Action]:
    ACTIONS[cls.name] = cls
    return cls


def _mapping(value: Any, keys: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with {', '.join(sorted(keys))}")
    unknown = set(value) - keys
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(keys))}")
    missing = required - set(value)
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    return value


def _address_list(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if not isinstance(v, str) or not _ADDRESS.match(v.strip())]
    if bad or not values:
        raise ValueError(f"not an e-mail address: {bad[0] if bad else '(empty)'!r}")
    return [v.strip().lower() for v in values]


class TemplateValues(dict):
    """Values for notice templates; unknown fields stay as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def template_values(ctx: Context, rule: str) -> TemplateValues:
    emp = ctx.employee
    return TemplateValues(
        sender=emp.email if emp else ctx.mail_from,
        sender_name=emp.name if emp else ctx.mail_from,
        subject=ctx.subject,
        recipients=", ".join(ctx.rcpt_tos),
        rule=rule,
    )


class Action:
    name: ClassVar[str] = ""
    #: "reject" / "hold" for actions that stop a message; used by the
    #: "a rule that rejects or holds everything needs applies_to_all" check.
    blocks: ClassVar[str | None] = None

    def __init__(self, value: Any, env: Any = None):
        self.env = env

    def contribute(self, verdict: Verdict, ctx: Context, rule: str) -> str:
        """Add to the rule's verdict; return a short note for the trace."""
        raise NotImplementedError  # pragma: no cover

    def describe(self) -> str:
        return self.name


# -- verdict actions ---------------------------------------------------------------


@register
class Reject(Action):
    """``reject: "reason"`` or ``reject: {reason: ..., code: 550, enhanced: 5.7.1}``."""

    name = "reject"
    blocks = "reject"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        if isinstance(value, bool):
            raise ValueError("YAML read the reason as yes/no/true/false: put the text in quotes")
        if isinstance(value, str):
            value = {"reason": value}
        data = _mapping(value, {"reason", "code", "enhanced"}, {"reason"})
        self.reason = str(data["reason"]).strip()
        self.code = data.get("code", 550)
        self.enhanced = str(data.get("enhanced", f"{str(self.code)[:1]}.7.1"))
        if not self.reason:
            raise ValueError("reason must not be empty")
        if not isinstance(self.code, int) or not (400 <= self.code < 600):
            raise ValueError(f"code {self.code!r}: a 4xx or 5xx SMTP code")
        if not _ENHANCED.match(self.enhanced) or self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced {self.enhanced!r}: like 5.7.1, same class as the code")

    def contribute(self, verdict: Verdict, ctx: Context, rule: str) -> str:
        verdict.action = REJECT
        verdict.reason = self.reason
        verdict.smtp_code = self.code
        verdict.enhanced = self.enhanced
        verdict.rule = rule
        return f"reject {self.code} {self.enhanced}"

    def describe(self) -> str:
        return f"reject {self.code} {self.enhanced} {self.reason}"


@register
class HoldForApproval(Action):
    """``hold_for_approval: {approvers: [manager, department_head, role:X, a@b], reason: ...}``
    (or just the list of approvers).  Skipped for a message already approved."""

    name = "hold_for_approval"
    blocks = "hold"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        if isinstance(value, (list, str)):
            value = {"approvers": value}
        data = _mapping(value, {"approvers", "reason"}, {"approvers"})
        approvers = data["approvers"] if isinstance(data["approvers"], list) else [data["approvers"]]
        if not approvers:
            raise ValueError("approvers: at least one")
        self.approvers = [check_party(a) for a in approvers]
        self.reason = str(data.get("reason", "")).strip()

    def contribute(self, verdict: Verdict, ctx: Context, rule: str) -> str:
        if ctx.approved:
            return "hold skipped: already approved"
        if verdict.action != REJECT:
            verdict.action = HOLD
            verdict.rule = rule
            verdict.reason = self.reason or rule
            verdict.smtp_code, verdict.enhanced = 250, "2.0.0"
            for a in self.approvers:
                if a not in verdict.approvers:
                    verdict.approvers.append(a)
        return f"hold for {', '.join(self.approvers)}"

    def describe(self) -> str:
        return f"hold for approval by {', '.join(self.approvers)}"


# -- mutations ---------------------------------------------------------------------


@dataclass
class PrependSubjectMutation:
    prefix: str
    stage: str = "tag"

    def apply(self, out: Outgoing, ctx: Context) -> None:
        hb = HeaderBlock(out.data)
        subject = hb.get("Subject") or ""
        if subject.startswith(self.prefix.strip()):
            return
        hb.set("Subject", f"{self.prefix}{subject}")
        out.data = hb.to_bytes()

    def describe(self) -> str:
        return f"prepend {self.prefix!r} to the subject"


@dataclass
class AddHeaderMutation:
    name: str
    value: str
    stage: str = "headers"

    def apply(self, out: Outgoing, ctx: Context) -> None:
        hb = HeaderBlock(out.data)
        hb.add(self.name, self.value)
        out.data = hb.to_bytes()

    def describe(self) -> str:
        return f"add header {self.name}: {self.value}"


@dataclass
class AddBccMutation:
    addresses: list[str]
    stage: str = "headers"

    def apply(self, out: Outgoing, ctx: Context) -> None:
        have = {r.lower() for r in out.recipients}
        out.recipients.extend(a for a in self.addresses if a not in have)

    def describe(self) -> str:
        return f"add Bcc (envelope only) {', '.join(self.addresses)}"


@dataclass
class NotifyMutation:
    to: list[str]
    subject: str
    text: str
    rule: str = ""
    stage: str = "headers"

    def apply(self, out: Outgoing, ctx: Context) -> None:
        values = template_values(ctx, self.rule)
        subject = self.subject.format_map(values)
        text = self.text.format_map(values)
        if NOTIFIER is None:
            log.warning("notify (no notifier configured) to %s: %s", ", ".join(self.to), subject)
            return
        try:
            NOTIFIER(self.to, subject, text, ctx)
        except Exception:
            log.exception("notify to %s failed", ", ".join(self.to))
        out.notes.append(f"notified {', '.join(self.to)}")

    def describe(self) -> str:
        return f"notify {', '.join(self.to)}: {self.subject}"


class _MutationAction(Action):
    mutation: Any = None

    def contribute(self, verdict: Verdict, ctx: Context, rule: str) -> str:
        verdict.mutations.append(self.mutation)
        return self.mutation.describe()

    def describe(self) -> str:
        return self.mutation.describe()


@register
class PrependSubject(_MutationAction):
    """``prepend_subject: "[Export] "`` — not added twice (replies keep it)."""

    name = "prepend_subject"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        if not isinstance(value, str) or not value.strip():
            raise ValueError("prepend_subject takes the text to put before the subject")
        self.mutation = PrependSubjectMutation(value)


@register
class AddHeader(_MutationAction):
    """``add_header: {name: X-Mailgate-Policy, value: export}``."""

    name = "add_header"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        data = _mapping(value, {"name", "value"}, {"name", "value"})
        name, text = str(data["name"]).strip(), str(data["value"])
        if not _HEADER_NAME.match(name):
            raise ValueError(f"header name {name!r} is not valid")
        if name.lower() in PROTECTED_HEADERS:
            raise ValueError(f"header {name} may not be added by a rule (use rewrite_sender/prepend_subject)")
        if "\n" in text or "\r" in text:
            raise ValueError("header value must be one line")
        self.mutation = AddHeaderMutation(name, text)


@register
class AddBcc(_MutationAction):
    """``add_bcc: archive@acme.test`` or a list: extra envelope recipients (no header)."""

    name = "add_bcc"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        self.mutation = AddBccMutation(_address_list(value))


@register
class Notify(_MutationAction):
    """``notify: {to: [manager, it@acme.test], subject: ..., text: ...}`` with the
    fields {sender} {sender_name} {subject} {recipients} {rule}; sent when the
    message is accepted or held (never in a dry run)."""

    name = "notify"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        data = _mapping(value, {"to", "subject", "text"}, {"to"})
        to = data["to"] if isinstance(data["to"], list) else [data["to"]]
        if not to:
            raise ValueError("to: at least one")
        subject = str(data.get("subject", "Mailgate: rule {rule} matched a message from {sender}"))
        text = str(data.get("text", "From: {sender}\nTo: {recipients}\nSubject: {subject}\nRule: {rule}\n"))
        check_template(subject, NOTICE_FIELDS)
        check_template(text, NOTICE_FIELDS)
        self.mutation = NotifyMutation([check_party(t, allow_sender=True) for t in to], subject, text)

    def contribute(self, verdict: Verdict, ctx: Context, rule: str) -> str:
        self.mutation.rule = rule
        return super().contribute(verdict, ctx, rule)


@register
class RewriteSenderAction(_MutationAction):
    """``rewrite_sender: {address: "sales@acme.test", display_name: "{name} | ACME Trading",
    reply_to: keep|company|employee, sender: remove|employee}``."""

    name = "rewrite_sender"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        data = _mapping(value, {"address", "display_name", "reply_to", "sender"}, {"address"})
        company = getattr(env, "company", "") if env is not None else ""
        domains = getattr(env, "company_domains", ()) if env is not None else ()
        self.mutation = RewriteSender(
            address=str(data["address"]).strip(),
            display_name=str(data.get("display_name", "{name}")),
            reply_to=str(data.get("reply_to", "keep")),
            sender=str(data.get("sender", "remove")),
            company=company,
            company_domain=domains[0] if domains else "",
        )
