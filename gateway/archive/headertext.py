"""Header helpers shared by the archive's record fields (gateway/archive/__init__.py), the
search index's extraction (gateway/archive/extraction.py) and the policy's view of a message's
addresses (gateway/policy/context.py)."""

from __future__ import annotations

import email.utils
import functools


@functools.lru_cache(maxsize=4096)
def getaddresses(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``email.utils.getaddresses`` remembered: a pure function of its text, parsed by pure
    Python (the most costly step of reading a header section), and the same From and To
    values come back in message after message (a company's people and its correspondents)."""
    return tuple(email.utils.getaddresses(values))
