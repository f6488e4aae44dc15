"""Rule conditions: one small class each, registered by kebab-case name.

A condition is built from its YAML values (a scalar or a list; any value may
match) and answers ``test(facts) -> (hit, why)``; ``why`` goes into the trace.
Recipient conditions match when *any* recipient (envelope, To, Cc, Bcc)
matches; ``why`` names it.  Bad values raise ``ValueError`` with a message the
loader turns into ``file:line: message``.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import re
from collections.abc import Callable
from typing import Any, ClassVar

from gateway.directory import RELATIONSHIPS, domain_of
from gateway.rules.content import BODY_SCAN_LIMIT
from gateway.rules.facts import Facts

try:  # `regex` runs a match with a timeout; plain `re` relies on the bounded input alone
    import regex as _regex
except ImportError:  # pragma: no cover - regex is installed with mailgate
    _regex = None

log = logging.getLogger("mailgate.rules")

REGEX_TIMEOUT = 0.05  # seconds per regex search
MAX_PATTERN = 1000
SUBJECT_LIMIT = 2000

CONDITIONS: dict[str, type[Condition]] = {}


def register(cls: type[Condition]) -> type[Condition]:
    CONDITIONS[cls.name] = cls
    return cls


def as_list(value: Any) -> list:
    if value is None or value == []:
        raise ValueError("needs at least one value")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, (dict, list)):
            raise ValueError(f"values must be plain strings or numbers, not {type(v).__name__}")
    return values


def _strings(value: Any) -> list[str]:
    return [str(v).strip() for v in as_list(value)]


class Condition:
    name: ClassVar[str] = ""

    def __init__(self, value: Any, env: Any = None):
        self.values = _strings(value)
        self.env = env

    def test(self, facts: Facts) -> tuple[bool, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def matches_everything(self) -> bool:
        """True if no message can fail this condition (e.g. every relationship listed)."""
        return False

    def describe(self) -> str:
        return f"{self.name}: {', '.join(map(str, self.values))}"


def _glob_any(patterns: list[str], text: str) -> str | None:
    text = text.lower()
    for p in patterns:
        if fnmatch.fnmatchcase(text, p.lower()):
            return p
    return None


# -- sender ------------------------------------------------------------------------


@register
class Sender(Condition):
    """The sending employee's address (or the envelope sender), glob patterns."""

    name = "sender"

    def test(self, facts: Facts) -> tuple[bool, str]:
        emp = facts.ctx.employee
        addresses = [a for a in (emp.email if emp else "", facts.ctx.mail_from) if a]
        for a in addresses:
            if (p := _glob_any(self.values, a)) is not None:
                return True, f"sender {a} matches {p}"
        return False, f"sender {addresses[0] if addresses else '(none)'} matches none of {', '.join(self.values)}"

    def matches_everything(self) -> bool:
        return "*" in self.values


@register
class SenderDepartment(Condition):
    """Department names (or ids); a department includes its sub-departments."""

    name = "sender-department"

    def test(self, facts: Facts) -> tuple[bool, str]:
        ids = facts.sender_department_ids
        if not ids:
            return False, "sender has no department"
        for v in self.values:
            if ids & self.env.departments.ids(v):
                return True, f"sender is in department {v}"
        return False, f"sender's department is not {', '.join(self.values)}"


@register
class SenderRole(Condition):
    name = "sender-role"

    def test(self, facts: Facts) -> tuple[bool, str]:
        emp = facts.ctx.employee
        roles = emp.roles if emp else frozenset()
        for v in self.values:
            if v in roles:
                return True, f"sender has role {v}"
        return False, f"sender roles {sorted(roles) or '(none)'} include none of {', '.join(self.values)}"


@register
class SenderGroup(Condition):
    """Groups are defined in rule files under ``groups:`` (name: [addresses])."""

    name = "sender-group"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        unknown = [v for v in self.values if v not in env.groups]
        if unknown:
            raise ValueError(f"unknown group {', '.join(unknown)} (define it under `groups:`)")

    def test(self, facts: Facts) -> tuple[bool, str]:
        emp = facts.ctx.employee
        addresses = {a.lower() for a in (emp.email if emp else "", facts.ctx.mail_from) if a}
        for v in self.values:
            if addresses & self.env.groups[v]:
                return True, f"sender is in group {v}"
        return False, f"sender is in none of the groups {', '.join(self.values)}"


# -- recipients ----------------------------------------------------------------------

_REL_ALIASES = {r: r for r in RELATIONSHIPS} | {
    "own": "own_customer",
    "colleague": "colleague_customer",
    "unowned": "unowned_customer",
    "public-pool": "public_pool_customer",
    "public_pool": "public_pool_customer",
    "unknown": "unknown_external",
}


@register
class RecipientRelationship(Condition):
    """own_customer, colleague_customer, unowned_customer, public_pool_customer,
    unknown_external, internal (short forms: own, colleague, unowned, public-pool, unknown)."""

    name = "recipient-relationship"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        bad = [v for v in self.values if v.lower() not in _REL_ALIASES]
        if bad:
            raise ValueError(f"unknown relationship {', '.join(bad)}; use one of {', '.join(RELATIONSHIPS)}")
        self.wanted = {_REL_ALIASES[v.lower()] for v in self.values}

    def test(self, facts: Facts) -> tuple[bool, str]:
        for r, rel in facts.relationships.items():
            if rel in self.wanted:
                return True, f"{r} is {rel}"
        seen = ", ".join(f"{r}: {rel}" for r, rel in facts.relationships.items()) or "no recipients"
        return False, f"no recipient is {' or '.join(sorted(self.wanted))} ({seen})"

    def matches_everything(self) -> bool:
        return self.wanted == set(RELATIONSHIPS)


class _CustomerAttribute(Condition):
    attribute: ClassVar[str] = ""

    def values_of(self, customer: Any) -> set[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def test(self, facts: Facts) -> tuple[bool, str]:
        wanted = {v.lower() for v in self.values}
        for r, match in facts.customers.items():
            have = {v.lower() for v in self.values_of(match.customer)}
            if hit := have & wanted:
                return True, f"{r}: customer {match.customer.name} has {self.attribute} {sorted(hit)[0]}"
        if not facts.customers:
            return False, "no recipient is a known customer"
        return False, f"no recipient's customer has {self.attribute} {', '.join(self.values)}"


@register
class RecipientStage(_CustomerAttribute):
    name = "recipient-stage"
    attribute = "stage"

    def values_of(self, customer: Any) -> set[str]:
        return {customer.stage}


@register
class RecipientTag(_CustomerAttribute):
    name = "recipient-tag"
    attribute = "tag"

    def values_of(self, customer: Any) -> set[str]:
        return set(customer.tags)


@register
class RecipientCountry(_CustomerAttribute):
    name = "recipient-country"
    attribute = "country"

    def values_of(self, customer: Any) -> set[str]:
        return {customer.country} if customer.country else set()


@register
class RecipientDomain(Condition):
    """Domains; ``example.com`` also covers its subdomains; globs like ``*.de`` work."""

    name = "recipient-domain"

    def _match(self, domain: str) -> str | None:
        for v in self.values:
            v = v.lower().lstrip("@")
            if domain == v or domain.endswith("." + v) or fnmatch.fnmatchcase(domain, v):
                return v
        return None

    def test(self, facts: Facts) -> tuple[bool, str]:
        for r in facts.recipients:
            if (v := self._match(domain_of(r))) is not None:
                return True, f"{r} is in domain {v}"
        return False, f"no recipient in {', '.join(self.values)}"

    def matches_everything(self) -> bool:
        return "*" in self.values


@register
class Recipient(Condition):
    """Recipient addresses, glob patterns (``*@competitor.com``)."""

    name = "recipient"

    def test(self, facts: Facts) -> tuple[bool, str]:
        for r in facts.recipients:
            if (p := _glob_any(self.values, r)) is not None:
                return True, f"{r} matches {p}"
        return False, f"no recipient matches {', '.join(self.values)}"

    def matches_everything(self) -> bool:
        return "*" in self.values


@register
class FirstContact(Condition):
    """``true``: some external recipient domain (on public mail domains: the exact
    address) has never been written to by anyone in the company; ``false``: none is new."""

    name = "first-contact"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        if len(self.values) != 1 or self.values[0].lower() not in ("true", "false"):
            raise ValueError("first-contact takes true or false")
        self.wanted = self.values[0].lower() == "true"

    def test(self, facts: Facts) -> tuple[bool, str]:
        new = [r for r, key in facts.external_keys.items() if not self.env.history.seen(key)]
        if self.wanted:
            if new:
                return True, f"first contact with {new[0]}"
            return False, "every external recipient was written to before"
        return (False, f"first contact with {new[0]}") if new else (True, "no first contact")


# -- content ---------------------------------------------------------------------------


class _Contains(Condition):
    def text(self, facts: Facts) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def test(self, facts: Facts) -> tuple[bool, str]:
        text = self.text(facts).casefold()
        for v in self.values:
            if v.casefold() in text:
                return True, f"{self.name.split('-')[0]} contains {v!r}"
        return False, f"{self.name.split('-')[0]} contains none of {', '.join(map(repr, self.values))}"


@register
class SubjectContains(_Contains):
    name = "subject-contains"

    def text(self, facts: Facts) -> str:
        return facts.ctx.subject[:SUBJECT_LIMIT]


@register
class BodyContains(_Contains):
    name = "body-contains"

    def text(self, facts: Facts) -> str:
        return facts.content.body_text


def _compile(pattern: str) -> Any:
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"pattern longer than {MAX_PATTERN} characters")
    try:
        if _regex is not None:
            return _regex.compile(pattern, _regex.IGNORECASE | _regex.VERSION0)
        return re.compile(pattern, re.IGNORECASE)
    except Exception as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None


def search(compiled: Any, text: str) -> tuple[bool, bool]:
    """(matched, timed_out): the search runs on bounded text with a time budget."""
    text = text[:BODY_SCAN_LIMIT]
    if _regex is not None:
        try:
            return compiled.search(text, timeout=REGEX_TIMEOUT) is not None, False
        except TimeoutError:
            return False, True
    return compiled.search(text) is not None, False


class _Regex(Condition):
    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        self.compiled = [(v, _compile(v)) for v in self.values]

    def text(self, facts: Facts) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def test(self, facts: Facts) -> tuple[bool, str]:
        text = self.text(facts)
        where = self.name.split("-")[0]
        timeouts = []
        for v, compiled in self.compiled:
            matched, timed_out = search(compiled, text)
            if matched:
                return True, f"{where} matches /{v}/"
            if timed_out:
                log.warning("rule regex /%s/ ran out of its %.0f ms budget", v, REGEX_TIMEOUT * 1000)
                timeouts.append(v)
        if timeouts:
            return False, f"{where}: /{timeouts[0]}/ ran out of time (counted as no match)"
        return False, f"{where} matches none of {', '.join('/' + v + '/' for v, _ in self.compiled)}"


@register
class SubjectRegex(_Regex):
    name = "subject-regex"

    def text(self, facts: Facts) -> str:
        return facts.ctx.subject[:SUBJECT_LIMIT]


@register
class BodyRegex(_Regex):
    name = "body-regex"

    def text(self, facts: Facts) -> str:
        return facts.content.body_text


# -- attachments and size ----------------------------------------------------------------

_TYPE_SHORTCUTS = {
    "executable": ["application/x-dosexec", "application/x-executable", "application/x-mach-binary",
                   "application/x-sharedlib", "application/x-pie-executable",
                   "application/vnd.microsoft.portable-executable"],
    "archive": ["application/zip", "application/x-rar", "application/x-7z-compressed", "application/gzip",
                "application/x-tar", "application/x-bzip2", "application/x-xz", "application/vnd.rar"],
    "image": ["image/*"],
    "pdf": ["application/pdf"],
}


@register
class AttachmentType(Condition):
    """Attachment content type as sniffed by libmagic (not the declared type):
    MIME globs (``application/pdf``, ``image/*``) or executable / archive / image / pdf."""

    name = "attachment-type"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        self.patterns = [p for v in self.values for p in _TYPE_SHORTCUTS.get(v.lower(), [v])]
        bad = [v for v in self.values if v.lower() not in _TYPE_SHORTCUTS and "/" not in v]
        if bad:
            raise ValueError(f"{', '.join(bad)}: use a MIME type like application/pdf or one of "
                             f"{', '.join(_TYPE_SHORTCUTS)}")

    def test(self, facts: Facts) -> tuple[bool, str]:
        for a in facts.attachments:
            if _glob_any(self.patterns, a.content_type) is not None:
                return True, f"attachment {a.name or '(unnamed)'} is {a.content_type}"
        if not facts.attachments:
            return False, "no attachments"
        kinds = ", ".join(f"{a.name or '(unnamed)'}: {a.content_type}" for a in facts.attachments)
        return False, f"no attachment of type {', '.join(self.values)} ({kinds})"


@register
class AttachmentName(Condition):
    """Attachment file names, case-insensitive globs (``*.exe``, ``报价*.xlsx``)."""

    name = "attachment-name"

    def test(self, facts: Facts) -> tuple[bool, str]:
        for a in facts.attachments:
            if (p := _glob_any(self.values, a.name)) is not None:
                return True, f"attachment {a.name} matches {p}"
        return False, "no attachments" if not facts.attachments else \
            f"no attachment name matches {', '.join(self.values)}"


_CMP = re.compile(r"^\s*(<=|>=|==|=|<|>)?\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_OPS: dict[str, Callable[[int, int], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "=": lambda a, b: a == b, "==": lambda a, b: a == b,
}


def parse_comparison(text: str, sizes: bool) -> tuple[str, int]:
    m = _CMP.match(str(text))
    if not m or (m.group(3) and not sizes):
        unit = " with an optional unit KB/MB/GB" if sizes else ""
        raise ValueError(f"{text!r}: write a comparison like '> 10'{unit}")
    op = m.group(1) or "="
    unit = (m.group(3) or "").lower()[:1]
    return op, int(float(m.group(2)) * _UNIT[unit])


class _Compare(Condition):
    sizes: ClassVar[bool] = True
    what: ClassVar[str] = ""

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        self.comparisons = [(v, *parse_comparison(v, self.sizes)) for v in self.values]

    def numbers(self, facts: Facts) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def test(self, facts: Facts) -> tuple[bool, str]:
        numbers = self.numbers(facts)
        for text, op, limit in self.comparisons:
            for n in numbers:
                if _OPS[op](n, limit):
                    return True, f"{self.what} {n} {text.strip()}"
        shown = ", ".join(map(str, numbers)) if numbers else "none"
        return False, f"{self.what} {shown} is not {' or '.join(t.strip() for t, _, _ in self.comparisons)}"

    def matches_everything(self) -> bool:
        return any(_OPS[op](0, limit) and _OPS[op](10**15, limit) for _, op, limit in self.comparisons)


@register
class AttachmentCount(_Compare):
    name = "attachment-count"
    sizes = False
    what = "attachment count"

    def numbers(self, facts: Facts) -> list[int]:
        return [len(facts.attachments)]


@register
class AttachmentSize(_Compare):
    """Size of any one attachment (decoded bytes)."""

    name = "attachment-size"
    what = "attachment size"

    def numbers(self, facts: Facts) -> list[int]:
        return [a.size for a in facts.attachments]


@register
class MessageSize(_Compare):
    name = "message-size"
    what = "message size"

    def numbers(self, facts: Facts) -> list[int]:
        return [len(facts.ctx.raw)]


# -- time ------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@register
class TimeOfDay(Condition):
    """Local time ranges ``HH:MM-HH:MM``; a range may cross midnight (``22:00-06:00``)."""

    name = "time-of-day"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        self.ranges = []
        for v in self.values:
            m = _RANGE.match(v)
            if not m:
                raise ValueError(f"{v!r}: write a range like 09:00-18:00")
            h1, m1, h2, m2 = map(int, m.groups())
            if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59:
                raise ValueError(f"{v!r}: not a time of day")
            self.ranges.append((v, h1 * 60 + m1, h2 * 60 + m2))

    def test(self, facts: Facts) -> tuple[bool, str]:
        now = self.env.clock()
        minute = now.hour * 60 + now.minute
        for text, start, end in self.ranges:
            inside = start <= minute < end if start <= end else (minute >= start or minute < end)
            if inside:
                return True, f"{now:%H:%M} is within {text}"
        return False, f"{now:%H:%M} is outside {', '.join(t for t, _, _ in self.ranges)}"

    def matches_everything(self) -> bool:
        return any(start == 0 and end >= 24 * 60 for _, start, end in self.ranges)


_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


@register
class DayOfWeek(Condition):
    """mon … sun, ranges (mon-fri), weekday, weekend."""

    name = "day-of-week"

    def __init__(self, value: Any, env: Any = None):
        super().__init__(value, env)
        self.days: set[int] = set()
        for v in self.values:
            self.days |= self._parse(v.lower())

    @staticmethod
    def _parse(v: str) -> set[int]:
        if v == "weekday":
            return set(range(5))
        if v == "weekend":
            return {5, 6}
        parts = [p.strip()[:3] for p in v.split("-")]
        if any(p not in _DAYS for p in parts) or len(parts) > 2:
            raise ValueError(f"{v!r}: use mon … sun, a range like mon-fri, weekday or weekend")
        a, b = _DAYS.index(parts[0]), _DAYS.index(parts[-1])
        return set(range(a, b + 1)) if a <= b else set(range(a, 7)) | set(range(0, b + 1))

    def test(self, facts: Facts) -> tuple[bool, str]:
        now: dt.datetime = self.env.clock()
        day = _DAYS[now.weekday()]
        if now.weekday() in self.days:
            return True, f"today is {day}"
        return False, f"today is {day}, not {', '.join(self.values)}"

    def matches_everything(self) -> bool:
        return self.days == set(range(7))
