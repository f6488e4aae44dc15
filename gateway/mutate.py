"""Step 2 of the pipeline (docs/ARCHITECTURE.md §2): apply the verdict's mutations.

The order is fixed here, never in rule files: tag headers -> rewrite sender
(envelope + From, Reply-To policy) -> other header edits -> DKIM sign (last,
so the signature covers the final bytes).  Archive and spool follow in the
SMTP handler.  Each mutation is an object with a ``stage`` (one of STAGES)
and ``apply(outgoing, ctx)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config import Config
from gateway.policy.context import Context, Verdict

STAGES = ("tag", "rewrite_sender", "headers", "sign")


@dataclass
class Outgoing:
    mail_from: str
    recipients: list[str]
    data: bytes
    notes: list[str] = field(default_factory=list)


def apply_mutations(ctx: Context, verdict: Verdict, cfg: Config) -> Outgoing:
    out = Outgoing(ctx.mail_from, list(ctx.rcpt_tos), ctx.raw)
    for stage in STAGES:
        for mutation in verdict.mutations:
            if getattr(mutation, "stage", None) == stage:
                mutation.apply(out, ctx)
    return out
