"""Capabilities: what the proxy announces before login and relays after it."""

from __future__ import annotations

_DROP_CAPS = (b"COMPRESS=", b"STARTTLS", b"LOGINDISABLED", b"AUTH=", b"SASL-IR", b"LOGIN-REFERRALS")


def filter_capabilities(caps: list[bytes], max_literal: int) -> list[bytes]:
    """The upstream's capabilities minus what the proxy cannot relay (never more)."""
    out = []
    for c in caps:
        u = c.upper()
        if any(u.startswith(p) for p in _DROP_CAPS):
            continue
        if u.startswith(b"APPENDLIMIT="):
            try:
                c = b"APPENDLIMIT=%d" % min(int(u[12:]), max_literal)
            except ValueError:
                continue
        out.append(c)
    return out


def rewrite_caps_in(line: bytes, max_literal: int) -> bytes:
    """Filter ``* CAPABILITY ...`` lines and ``[CAPABILITY ...]`` response codes."""
    if line[:13].upper() == b"* CAPABILITY ":
        caps = line[13:].rstrip(b"\r\n").split()
        return b"* CAPABILITY " + b" ".join(filter_capabilities(caps, max_literal)) + b"\r\n"
    i = line.upper().find(b"[CAPABILITY ")
    if i >= 0:
        j = line.find(b"]", i)
        if j > 0:
            caps = line[i + 12 : j].split()
            return line[: i + 12] + b" ".join(filter_capabilities(caps, max_literal)) + line[j:]
    return line
