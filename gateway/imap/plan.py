"""What to ask upstream for one tagged message, and how to rewrite each answer item.

The rewritten message is H' + B where the upstream message is H + B.  Partial
fetches of the whole message are translated: a slice inside H' is cut from the
rewritten header (``BODY[HEADER]``), a slice in B is ``BODY[TEXT]<o - len(H')>``,
and a slice across the boundary is the tail of H' plus ``BODY[TEXT]<0.n>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.imap.decisions import Decision
from gateway.imap.fetchitems import ENVELOPE, HEADER, OTHER, SIZE, WHOLE, FetchCommand, Item
from gateway.imap.rewrite import Envelope, Handler, HeaderBlock, SizeDelta, TextAsWhole, Whole

Key = tuple[bytes, bytes, int | None]


Handlers = dict[Key, "Handler | tuple[Handler, ...]"]


@dataclass
class MessagePlan:
    items: bytes  # the parenthesized item list to send upstream
    # Several client items may be fetched as the same upstream item (BODY[HEADER] for
    # BODY[HEADER], BODY[HEADER]<o.n>, BODY[]<0.n>, BINARY[HEADER]): the upstream answers
    # each request once, and the n-th answer goes to the n-th handler.
    handlers: Handlers


def _add(handlers: Handlers, key: Key, handler: Handler) -> None:
    old = handlers.get(key)
    if old is None:
        handlers[key] = handler
    else:
        handlers[key] = (old if isinstance(old, tuple) else (old,)) + (handler,)


def needs_new_header(fc: FetchCommand, d: Decision) -> bool:
    """True when a partial fetch straddles the end of the rewritten header (needs H' itself)."""
    hn = d.new_header_len
    for it in fc.items:
        if it.kind == WHOLE and it.base == b"BODY" and it.partial is not None:
            o, n = it.partial
            if o < hn and (n is None or o + n > hn):
                return True
    return False


def _section_text(item: Item) -> bytes:
    raw = item.raw
    return raw[raw.index(b"[") + 1 : raw.index(b"]")]


def _body(item: Item, section: bytes, partial: bytes = b"") -> bytes:
    att = b"BODY.PEEK" if item.peek else b"BODY"
    return att + b"[" + section + b"]" + partial


def plan_message(fc: FetchCommand, d: Decision, fields: tuple[str, ...], new_header: bytes | None) -> MessagePlan:
    items: list[bytes] = []
    handlers: Handlers = {}
    hn = d.new_header_len
    for it in fc.items:
        if it.kind == OTHER:
            items.append(it.raw)
            if it.base:  # a section (BODY[TEXT] …): passed as it is, even if another item shares its key
                _add(handlers, it.key, Handler())
        elif it.kind == ENVELOPE:
            items.append(it.raw)
            _add(handlers, it.key, Envelope(d, fields))
        elif it.kind == SIZE:
            items.append(it.raw)
            _add(handlers, it.key, SizeDelta(d.delta))
        elif it.kind == HEADER:
            partial = it.partial
            if it.base == b"RFC822.HEADER":
                items.append(it.raw)
            else:
                items.append(_body(it, _section_text(it)))
            # BINARY[HEADER…] is fetched as BODY[HEADER…] and served under the client's name.
            binary = it.base == b"BINARY"
            out = None
            if partial is not None:
                out = (b"BINARY[" if binary else b"BODY[") + _section_text(it) + b"]<%d>" % partial[0]
            elif binary:
                out = b"BINARY[" + _section_text(it) + b"]"
            key = (b"BODY" if binary else it.base, it.section, None)
            _add(handlers, key, HeaderBlock(d, out, partial, full=it.section == b"HEADER"))
        elif it.kind == WHOLE and it.partial is None:
            items.append(it.raw)
            _add(handlers, it.key, Whole(d, binary=it.base == b"BINARY"))
        elif it.kind == WHOLE and it.base == b"BINARY":
            o = it.partial[0]
            att = b"BINARY.PEEK[]" if it.peek else b"BINARY[]"
            items.append(att)
            _add(handlers, (b"BINARY", b"", None), Whole(d, True, b"BINARY[]<%d>" % o, it.partial))
        else:  # BODY[]<o.n>
            o, n = it.partial
            out = b"BODY[]<%d>" % o
            if n is not None and o + n <= hn:
                items.append(_body(it, b"HEADER"))
                _add(handlers, (b"BODY", b"HEADER", None), HeaderBlock(d, out, (o, n), full=True))
            elif o >= hn:
                part = b"<%d.%d>" % (o - hn, n) if n is not None else b"<%d>" % (o - hn)
                items.append(_body(it, b"TEXT", part))
                _add(handlers, (b"BODY", b"TEXT", o - hn), TextAsWhole(out, b""))
            else:
                if new_header is None:
                    raise ValueError("rewritten header needed for a straddling partial fetch")
                prefix = new_header[o:]
                if n is None:
                    items.append(_body(it, b"TEXT"))
                    _add(handlers, (b"BODY", b"TEXT", None), TextAsWhole(out, prefix))
                else:
                    items.append(_body(it, b"TEXT", b"<0.%d>" % (o + n - hn)))
                    _add(handlers, (b"BODY", b"TEXT", 0), TextAsWhole(out, prefix))
    return MessagePlan(b"(" + b" ".join(items) + b")", handlers)
