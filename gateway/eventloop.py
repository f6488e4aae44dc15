"""The event loop every long-running process of a node runs on (``[node] event_loop``).

"asyncio" (the default) is the standard library's loop.  "uvloop" (libuv) handles a
connection's transport, reads and timers in C: with 5 parallel SMTP sessions it cut the SMTP
processes' CPU per message by ~10 %, with 20 it made no difference (BENCHMARKS.md, SMTP).
Twisted's asyncio reactor (the IMAP proxy) and aiosmtpd's STARTTLS run on either.
"""

from __future__ import annotations

import asyncio


def new_event_loop(kind: str = "asyncio") -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind`` ("uvloop" or "asyncio")."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    if kind == "asyncio":
        return asyncio.new_event_loop()
    raise ValueError(f"unknown event loop {kind!r} (uvloop or asyncio)")
