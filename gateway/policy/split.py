"""Splitting a held message (审核, ``approval.split_recipients``).

A rule that holds a message usually holds it because of some recipients (a
country, a customer stage, a domain).  With splitting on, the recipients who
would not be held on their own receive the message at once; the others wait
for approval.  Each envelope recipient is decided alone; the free ones are then
decided together, and the split happens only if that group is plainly
accepted.  Content conditions (subject, body, attachments) hold every
recipient alike, so such a message is never split.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.policy import Policy
from gateway.policy.context import ACCEPT, HOLD, Context, Verdict


@dataclass
class Part:
    ctx: Context
    verdict: Verdict


def split_hold(policy: Policy, ctx: Context, verdict: Verdict) -> tuple[Part, Part] | None:
    """(free part, held part), or None when the whole message stays held."""
    if verdict.action != HOLD or len(ctx.rcpt_tos) < 2:
        return None
    held, free = [], []
    for rcpt in ctx.rcpt_tos:
        alone = policy.decide(ctx.narrowed([rcpt]))
        (free if alone.action == ACCEPT else held).append(rcpt)
    if not free or not held:
        return None
    free_ctx = ctx.narrowed(free)
    free_verdict = policy.decide(free_ctx)
    if free_verdict.action != ACCEPT:
        return None
    held_ctx = ctx.narrowed(held)
    held_verdict = policy.decide(held_ctx)
    if held_verdict.action != HOLD:
        return None
    return Part(free_ctx, free_verdict), Part(held_ctx, held_verdict)
