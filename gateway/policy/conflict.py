"""send-conflict: refuse mail to a colleague's customer (发信防冲突).

If any recipient (envelope, To, Cc, Bcc) is a customer owned only by other
employees, the whole message is refused with 550 5.7.1, naming each such
recipient and its owners.  Own, co-owned, unowned, public-pool, internal and
unknown addresses pass.
"""

from __future__ import annotations

from gateway.directory import COLLEAGUE, Directory
from gateway.i18n import t
from gateway.policy.context import Context, Verdict


class SendConflict:
    name = "send-conflict"
    priority = 10
    mode = "enforce"

    def evaluate(self, ctx: Context, directory: Directory) -> Verdict | None:
        if ctx.employee is None:
            ctx.record(self.name, False, "no authenticated employee")
            return None
        conflicts = []
        for address in ctx.all_recipients():
            if directory.relationship(address, ctx.employee.id) != COLLEAGUE:
                continue
            match = directory.lookup(address)
            owners = [directory.employee(eid) for eid in sorted(match.customer.owners)]
            owner_text = "、".join(f"{o.name} <{o.email}>" for o in owners if o) if ctx.language == "zh-CN" \
                else ", ".join(f"{o.name} <{o.email}>" for o in owners if o)
            conflicts.append(
                t("conflict.one", ctx.language, recipient=address, owners=owner_text, customer=match.customer.name)
            )
        if not conflicts:
            ctx.record(self.name, False, "no recipient is a colleague's customer")
            return None
        ctx.record(self.name, True, "; ".join(conflicts), self.mode)
        if self.mode != "enforce":
            return None
        return Verdict.reject(self.name, "\n".join(conflicts))
