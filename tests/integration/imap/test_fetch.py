"""Tagging through the proxy: byte identity, sizes, partial fetches, envelopes."""

from __future__ import annotations

from tests.integration.imap.helpers import display_names, fetch_item, fetch_size, message, uid_of, via, direct


def test_untagged_message_is_byte_identical(proxy, imap_upstream):
    mid, raw = message('"Someone" <someone@unknown.test>')
    imap_upstream.deliver("alice@acme.test", raw)
    d, p = direct(imap_upstream), via(proxy)
    uid = uid_of(d, mid)
    assert uid_of(p, mid) == uid
    for item in ("BODY.PEEK[]", "BODY.PEEK[HEADER]", "RFC822.HEADER", "BODY.PEEK[]<0.20>"):
        assert fetch_item(p, uid, item) == fetch_item(d, uid, item)
    assert fetch_size(p, uid) == fetch_size(d, uid)


def test_tagged_message_size_matches_body(proxy, imap_upstream):
    mid, raw = message('"Buyer" <buyer@buyer.test>', body="x" * 5000 + "\r\n")
    imap_upstream.deliver("alice@acme.test", raw)
    d, p = direct(imap_upstream), via(proxy)
    uid = uid_of(p, mid)
    uid_of(d, mid)
    body = fetch_item(p, uid, "BODY.PEEK[]")
    original = fetch_item(d, uid, "BODY.PEEK[]")
    assert fetch_size(p, uid) == len(body)
    assert display_names(body, "From") == ["[客户] Buyer <buyer@buyer.test>"]
    assert body.endswith(original[original.index(b"\r\n\r\n"):])
