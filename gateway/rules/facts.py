"""Per-message facts shared by every rule: computed lazily, at most once.

A message's ``Facts`` live on its Context (``facts_for``), so 50 rules asking
"how does this recipient relate to the sender?" cost one directory lookup per
recipient, and the MIME tree is parsed only if some rule looks at content.
"""

from __future__ import annotations

from functools import cached_property

from gateway.directory import INTERNAL, Directory, Match, domain_of
from gateway.policy.context import Context
from gateway.rules.content import Attachment, Content, may_have_attachments, parse_content
from gateway.rules.env import RuleEnv

_ATTR = "_mailgate_rule_facts"


class Facts:
    def __init__(self, ctx: Context, directory: Directory, env: RuleEnv):
        self.ctx = ctx
        self.directory = directory
        self.env = env
        self.stopped_by: str | None = None

    @cached_property
    def recipients(self) -> list[str]:
        return self.ctx.all_recipients()

    @cached_property
    def relationships(self) -> dict[str, str]:
        eid = self.ctx.employee.id if self.ctx.employee else None
        return {r: self.directory.relationship(r, eid) for r in self.recipients}

    @cached_property
    def customers(self) -> dict[str, Match]:
        out = {}
        for r in self.recipients:
            if self.relationships[r] == INTERNAL:
                continue
            match = self.directory.lookup(r)
            if match is not None:
                out[r] = match
        return out

    @cached_property
    def external_keys(self) -> dict[str, str]:
        """Recipient -> history key: its domain, or the address on public mail domains."""
        out = {}
        for r in self.recipients:
            if self.relationships[r] == INTERNAL:
                continue
            domain = domain_of(r)
            out[r] = r if domain in self.directory.public_domains else domain
        return out

    @cached_property
    def content(self) -> Content:
        return parse_content(self.ctx.raw)

    @cached_property
    def attachments(self) -> list[Attachment]:
        """The attachments, without parsing the MIME tree when the header section already
        shows a single-part message that is no attachment (most plain-text mail)."""
        if "content" not in self.__dict__ and not may_have_attachments(self.ctx.headers):
            return []
        return self.content.attachments

    @cached_property
    def sender_department_ids(self) -> frozenset[int]:
        emp = self.ctx.employee
        return frozenset([emp.department_id]) if emp and emp.department_id is not None else frozenset()


def facts_for(ctx: Context, directory: Directory, env: RuleEnv) -> Facts:
    facts = ctx.__dict__.get(_ATTR)
    if facts is None or facts.directory is not directory:
        facts = Facts(ctx, directory, env)
        ctx.__dict__[_ATTR] = facts
    facts.env = env
    return facts
