"""The archive search syntax."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.archive.query import FIELDS, QueryError, parse


def test_everything_at_once():
    q = parse('报价单 "price list" FROM:hans@hamburg.de to:alice subject:"样品 二" after:2026-01-01 '
              "before:2026-07-01 has:attachment direction:inbound employee:alice@acme.test customer:Hamburg")
    assert q.terms == ["报价单", "price list"]
    assert q.fields == [("from", "hans@hamburg.de"), ("to", "alice"), ("subject", "样品 二")]
    assert q.after == dt.date(2026, 1, 1) and q.before == dt.date(2026, 7, 1)
    assert q.has_attachment and q.direction == "in"
    assert q.employee == "alice@acme.test" and q.customer == "Hamburg"


def test_free_text_with_colons_that_are_not_fields():
    assert parse("10:30 会议").terms == ["10:30", "会议"]
    assert parse('"re: offer"').terms == ["re: offer"]
    assert parse("").is_empty


@pytest.mark.parametrize("text, message", [
    ('"open phrase', "quote is not closed"),
    ("form:hans", "unknown field form:"),
    ("from: hans", "from: needs a value"),
    ("after:2026-13-01", "YYYY-MM-DD"),
    ("before:yesterday", "YYYY-MM-DD"),
    ("has:pdf", "has:attachment"),
    ("direction:sideways", "in or out"),
    ("after:2026-02-01 before:2026-01-01", "earlier"),
    ("a" * 1001, "too long"),
    ('ab"cd', "quote inside"),
])
def test_clear_errors(text, message):
    with pytest.raises(QueryError, match=message):
        parse(text)


_alphabet = st.sampled_from(list('abc报价 :"-\t') + [f + ":" for f in FIELDS] + ["2026-01-01", "attachment", "in"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_alphabet, max_size=30).map("".join))
def test_parse_never_crashes_on_syntax_soup(text):
    try:
        parse(text)
    except QueryError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_crashes_on_any_text(text):
    try:
        parse(text)
    except QueryError:
        pass
