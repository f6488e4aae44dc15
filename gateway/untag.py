"""Outgoing mail loses the IMAP proxy's reading tags (docs/ARCHITECTURE.md §2, stage "tag").

The proxy shows a customer as ``[客户] Klaus Becker``; a client that replies writes that name
into To/Cc, and without this step the customer would receive ``To: [客户] Klaus Becker``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.imap import headers
from gateway.mutate import Outgoing
from gateway.policy.context import Context, header_text

FIELDS = ("to", "cc")


@dataclass(frozen=True)
class StripReadingTags:
    tags: tuple[str, ...]
    stage: str = "tag"

    def needed(self, ctx: Context) -> bool:
        """Whether a To/Cc name carries a tag (decoded header text: cheap, and no mutation
        — so no second copy of the header in the archive — for the other messages)."""
        for name in FIELDS:
            for value in ctx.headers.get_all(name, []):
                text = header_text(value)
                if any(tag and tag in text for tag in self.tags):
                    return True
        return False

    def apply(self, out: Outgoing, ctx: Context) -> None:
        end = headers.header_length(out.data)
        if end is None:
            return
        head = out.data[:end]
        splices = headers.untag(head, FIELDS, self.tags)
        if splices:
            out.data = headers.apply(head, splices) + out.data[end:]

    def describe(self) -> str:
        return "take the reading tags (" + " ".join(self.tags) + ") off the To/Cc names"
