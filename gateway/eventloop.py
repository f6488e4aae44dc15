"""The event loop every long-running process of a node runs on (``[node] event_loop``).

uvloop (libuv) handles a connection's transport, reads and timers in C: measured on the SMTP
path it cut the acceptors' CPU per message by 10-20 % (BENCHMARKS.md, SMTP).  Twisted's
asyncio reactor (the IMAP proxy) and aiosmtpd's STARTTLS run on it unchanged; "asyncio"
keeps the standard library's loop.
"""

from __future__ import annotations

import asyncio


def new_event_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind`` ("uvloop" or "asyncio")."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    if kind == "asyncio":
        return asyncio.new_event_loop()
    raise ValueError(f"unknown event loop {kind!r} (uvloop or asyncio)")
