"""Header surgery: address parsing, encoded display names, splices."""

from __future__ import annotations

from email.header import decode_header, make_header

from gateway.imap import headers

HEADER = (
    b"Received: from x\r\n\tby y\r\n"
    b"From: \"Buyer, Inc\" <buyer@buyer.test>\r\n"
    b"To: alice@acme.test\r\n"
    b"Cc: =?GB2312?B?1cXOsA==?= <zhang@china.test>, other@unknown.test,\r\n Plain <plain@buyer.test>\r\n"
    b"Subject: hi\r\n\r\n"
)


def tag_for(address: str) -> str | None:
    return "[客户]" if address.endswith(("buyer.test", "china.test")) else None


def decoded(phrase: bytes) -> str:
    return str(make_header(decode_header(phrase.decode())))


def test_parse_addresses_handles_quotes_and_groups():
    got = headers.parse_addresses(b' "A, B" <a@x.test>, c@y.test (C), grp: d@z.test, e@z.test;')
    assert [p.address for p in got] == ["a@x.test", "c@y.test", "d@z.test", "e@z.test"]
    assert got[0].display == b'"A, B"'


def test_plan_tags_reader_fields_only():
    plan = headers.plan(HEADER, headers.READER_FIELDS, tag_for)
    assert len(plan.splices) == 1
    new = headers.apply(HEADER, plan.splices)
    line = [ln for ln in new.split(b"\r\n") if ln.startswith(b"From:")][0]
    assert decoded(line[6 : line.index(b" <")]) == "[客户] Buyer, Inc"
    assert len(new) - len(HEADER) == headers.delta(plan.splices)
    assert plan.names[0][:2] == ("from", "buyer@buyer.test")


def test_plan_sent_fields_decodes_gb2312_and_folds():
    plan = headers.plan(HEADER, headers.SENT_FIELDS, tag_for)
    new = headers.apply(HEADER, plan.splices)
    cc = [ln for ln in new.split(b"\r\n") if ln.startswith(b"Cc:")][0]
    text = decoded(cc[4:])
    assert "[客户] 张伟 <zhang@china.test>" in text and "[客户] Plain <plain@buyer.test>" in text
    assert "other@unknown.test" in text


def test_bare_address_gets_address_as_name():
    h = b"From: buyer@buyer.test\r\n\r\n"
    new = headers.apply(h, headers.plan(h, headers.READER_FIELDS, tag_for).splices)
    assert decoded(new[6 : new.index(b" <")]) == "[客户] buyer@buyer.test"


def test_ascii_tag_is_a_quoted_string():
    h = b"From: Buyer <buyer@buyer.test>\r\n\r\n"
    new = headers.apply(h, headers.plan(h, headers.READER_FIELDS, lambda a: "[Customer]").splices)
    assert new == b'From: "[Customer] Buyer" <buyer@buyer.test>\r\n\r\n'


def test_apply_by_content_on_a_subset_equals_subset_of_apply():
    plan = headers.plan(HEADER, headers.SENT_FIELDS + headers.READER_FIELDS, tag_for)
    full = headers.apply(HEADER, plan.splices)
    subset = b"From: \"Buyer, Inc\" <buyer@buyer.test>\r\nSubject: hi\r\n\r\n"
    got = headers.apply_by_content(subset, plan.splices)
    assert got.split(b"\r\n")[0] in full.split(b"\r\n")


def test_long_names_split_into_short_encoded_words():
    phrase = headers.encode_phrase("[客户] " + "很长的名字" * 10)
    assert all(len(w) <= 75 for w in phrase.split(b" "))
    assert decoded(phrase) == "[客户] " + "很长的名字" * 10


def test_header_length():
    assert headers.header_length(b"A: b\r\n\r\nbody") == 8
    assert headers.header_length(b"A: b\r\nB: c") is None


KNOWN = ("[客户]", "[同事客户]")


def test_name_stored_back_tagged_is_not_tagged_twice():
    # A reply saved to Sent, or a message a client moved by APPEND, carries the served name.
    served = headers.apply(HEADER, headers.plan(HEADER, headers.READER_FIELDS, tag_for).splices)
    again = headers.plan(served, headers.READER_FIELDS, tag_for, KNOWN)
    assert again.splices == () and again.names == ()
    # Written back by a client in its own encoding (mutt: one word for the tag, the rest plain).
    h = b"To: =?utf-8?B?W+WuouaIt10=?= Buyer <buyer@buyer.test>\r\n\r\n"
    assert headers.plan(h, headers.SENT_FIELDS, tag_for, KNOWN).splices == ()


def test_stale_tag_is_replaced_not_stacked():
    h = '=?UTF-8?B?W+WQjOS6i+WuouaIt10gQnV5ZXI=?= <buyer@buyer.test>'  # "[同事客户] Buyer"
    raw = b"From: " + h.encode() + b"\r\n\r\n"
    new = headers.apply(raw, headers.plan(raw, headers.READER_FIELDS, tag_for, KNOWN).splices)
    assert decoded(new[6 : new.index(b" <")]) == "[客户] Buyer"
    bare = b"From: \"[Customer] [Customer] buyer@buyer.test\" <buyer@buyer.test>\r\n\r\n"
    new = headers.apply(bare, headers.plan(bare, headers.READER_FIELDS, lambda a: "[客户]", ("[Customer]",)).splices)
    assert decoded(new[6 : new.index(b" <")]) == "[客户] buyer@buyer.test"


def test_untag_takes_the_tags_off_outgoing_names_only():
    h = (b"From: Alice <alice@acme.test>\r\n"
         b"To: =?utf-8?B?W+WuouaIt10=?= Klaus <k@x.test>, \"Plain, Name\" <p@y.test>\r\n"
         b"Cc: =?UTF-8?B?W+WuouaIt10gdGFuYWthQG9zYWthLmpw?=\r\n <tanaka@osaka.jp>\r\n"
         + "Subject: [客户] stays\r\n\r\n".encode())
    new = headers.apply(h, headers.untag(h, ("to", "cc"), KNOWN))
    assert new == (b"From: Alice <alice@acme.test>\r\n"
                   b"To: \"Klaus\" <k@x.test>, \"Plain, Name\" <p@y.test>\r\n"
                   b"Cc: <tanaka@osaka.jp>\r\n" + "Subject: [客户] stays\r\n\r\n".encode())
    untouched = b"To: \"Plain, Name\" <p@y.test>, bare@z.test\r\n\r\n"
    assert headers.untag(untouched, ("to", "cc"), KNOWN) == ()
