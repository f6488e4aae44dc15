"""Search over the archive index on SQLite: Chinese and English, short terms, fields, scope."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from gateway import customers
from gateway.archive import doctables, documents, index
from gateway.archive.query import QueryError
from gateway.archive.search import record_ids, search
from tests.unit.archive.mailfactory import message


def add(record_id, raw, *, day, direction="outbound", employee=None):
    rec = SimpleNamespace(id=record_id, created_at=dt.datetime(2026, 1, day, 12), direction=direction,
                          employee_id=employee)
    documents.index_record(rec, raw)


@pytest.fixture
def corpus(db):
    alice = customers.create_employee("alice@acme.test", "Alice")
    bob = customers.create_employee("bob@acme.test", "Bob")
    hamburg = customers.create_customer("Hamburg Trading GmbH", domains=["hamburg.de"], owners=[alice])
    customers.create_customer("Lagos Imports", contacts=["buyer@gmail.com"], owners=[bob])
    add(1, message("报价单 LED灯具", "您好，附件是最新报价，请查收。", sender=("王小明", "alice@acme.test"),
                   to=("Hans", "hans@hamburg.de"), charset="gb2312", attachments=("形式发票.pdf",)),
        day=1, employee=alice.id)
    add(2, message("Quotation for LED lamps", "Dear Hans, the price list is attached. Best, Alice",
                   sender=("Alice", "alice@acme.test"), to=("Hans Müller", "hans@hamburg.de")),
        day=2, employee=alice.id)
    add(3, message("Re: Quotation for LED lamps", "Thanks, we order 500 pcs. 单价 OK.",
                   sender=("Hans Müller", "hans@hamburg.de"), to=("Alice", "alice@acme.test")),
        day=3, direction="inbound", employee=alice.id)
    add(4, message("样品寄送", "样品已经寄出，PI 稍后发送。", sender=("Bob", "bob@acme.test"),
                   to=("", "buyer@gmail.com"), html="<p>样品<script>x</script></p>"),
        day=4, employee=bob.id)
    add(5, message("Lunch", "Team lunch on friday", sender=("Bob", "bob@acme.test"),
                   to=("Alice", "alice@acme.test")), day=5, employee=bob.id)
    return SimpleNamespace(alice=alice, bob=bob, hamburg=hamburg)


def ids(text, **kw):
    return [h.record_id for h in search(text, **kw).hits]


def test_chinese_terms_of_every_length(corpus):
    assert ids("报价单") == [1]
    assert ids("报价") == [1]  # two characters: short-gram index
    assert ids("单") == [3, 1]  # one character, newest first
    assert ids("样品") == [4]
    assert ids("查收") == [1]
    assert ids("形式发票") == [1]  # attachment name
    assert ids("王小明") == [1]  # decoded sender name


def test_long_and_short_terms_together(corpus):
    assert ids("quotation 单") == [3]
    assert ids("报价单 报价") == [1]
    assert ids("subject:quotation PI") == []
    assert ids("subject:样品 PI") == [4]


def test_english_substrings_case_insensitive_newest_first(corpus):
    assert ids("quotation") == [3, 2]
    assert ids("QUOTATION lamps") == [3, 2]
    assert ids('"price list"') == [2]
    assert ids("müller") == [3, 2]
    assert ids("PI") == [4]  # a two-letter word
    assert ids("nothing-like-this") == []


def test_fielded(corpus):
    assert ids("from:hans") == [3]
    assert ids("to:hans@hamburg.de") == [2, 1]
    assert ids("subject:样品") == [4]
    assert ids("subject:lunch") == [5]
    assert ids("subject:hans") == []
    assert ids("has:attachment") == [1]
    assert ids("direction:in") == [3]
    assert ids("direction:out quotation") == [2]
    assert ids("after:2026-01-03") == [5, 4, 3]
    assert ids("before:2026-01-03") == [2, 1]
    assert ids("after:2026-01-02 before:2026-01-04 LED") == [3, 2]
    assert ids("employee:bob@acme.test") == [5, 4]


def test_customer_and_correspondence(corpus):
    assert ids("customer:Hamburg") == [3, 2, 1]
    assert ids(f"customer:{corpus.hamburg.id} 报价") == [1]
    assert ids("customer:lagos") == [4]
    with pytest.raises(QueryError, match="no such customer"):
        search("customer:Nobody")


def test_scope_and_pagination(corpus):
    assert ids("", user_scope=[corpus.bob.id]) == [5, 4]
    assert ids("quotation", user_scope=[corpus.bob.id]) == []
    assert ids("", user_scope=[]) == []
    first = search("", per_page=2)
    assert [h.record_id for h in first.hits] == [5, 4] and first.has_more
    last = search("", per_page=2, page=3)
    assert [h.record_id for h in last.hits] == [1] and not last.has_more
    assert first.hits[0].subject == "Lunch" and "bob@acme.test" in first.hits[0].sender
    assert record_ids("LED") == [3, 2, 1]


def test_later_sightings_count_for_employee_and_direction(corpus):
    documents.index_sighting(SimpleNamespace(record_id=5, employee_id=corpus.alice.id, direction="inbound"))
    documents.index_sighting(SimpleNamespace(record_id=5, employee_id=corpus.alice.id, direction="inbound"))
    assert ids("lunch direction:in employee:alice@acme.test") == [5]


def test_removed_records_are_gone(corpus):
    assert doctables.remove_records([2, 3]) == 2
    assert ids("quotation") == []
    assert ids("LED") == [1]
    assert ids("单") == [1]  # the short-gram tokens went too
    index.forget_record(1)  # the retention purge's hook
    assert ids("LED") == [] and ids("单") == [] and ids("") == [5, 4]


def test_bad_queries_give_clear_errors(corpus):
    with pytest.raises(QueryError, match="no such employee"):
        search("employee:nobody@acme.test")
    with pytest.raises(QueryError, match="letter, digit"):
        search("!!")


def test_hostile_terms_are_data_not_syntax(corpus):
    assert ids('"a"" OR *"') == []
    assert ids("NEAR(x y)") == []
    assert ids("%_\\") == []


def test_cli_search_and_export(tmp_path, capsys):
    from gateway.archive import Archive
    from gateway.archive.export import read_mbox
    from gateway.cli import main
    from gateway.config import load
    from gateway.db import connect
    from gateway.db.models import AuditLog
    from tests.harness.gateway import write_config

    path = tmp_path / "mailgate.toml"
    write_config(path, {"node": {"name": "t", "data_dir": "var"}, "database": {"url": "sqlite:///var/m.db"},
                        "company": {"name": "ACME", "domains": ["acme.test"]},
                        "relay": {"mode": "relay_account", "username": "relay@acme.test", "password": "pw"}})
    assert main(["-c", str(path), "init"]) == 0
    db = connect(load(path).database.url)
    raws = [message("报价单 A", "第一封"), message("Lunch", "nothing"), message("报价单 B", "From here on\n")]
    archive = Archive.from_config(load(path))
    for raw in raws:
        archive.record(raw, direction="outbound", verdict="accepted", subject=None, message_id=None)
    db.close()
    capsys.readouterr()
    assert main(["-c", str(path), "archive", "search", "报价单", "--json", "--actor", "tester"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json_subject(line) for line in lines] == ["报价单 B", "报价单 A"]
    assert main(["-c", str(path), "archive", "search", "nothing-here"]) == 1
    assert main(["-c", str(path), "archive", "search", "colour:red"]) == 2
    out = tmp_path / "x.mbox"
    assert main(["-c", str(path), "archive", "export", "报价单", "-o", str(out), "--actor", "tester"]) == 0
    assert read_mbox(out.read_bytes()) == [raws[2].replace(b"\r\n", b"\n"), raws[0].replace(b"\r\n", b"\n")]
    capsys.readouterr()
    assert main(["-c", str(path), "archive", "export", "报价单", "-o", str(out), "--limit", "1",
                 "--actor", "tester"]) == 1  # incomplete: said, not silent
    assert "INCOMPLETE" in capsys.readouterr().err and len(read_mbox(out.read_bytes())) == 1
    db = connect(load(path).database.url, migrate=False)
    assert [r.action for r in AuditLog.select().where(AuditLog.actor == "tester").order_by(AuditLog.id)] == [
        "archive.search", "archive.export", "archive.export"]
    db.close()


def json_subject(line: str) -> str:
    import json

    return json.loads(line)["subject"]


def test_every_sighting_of_a_message_counts(db, archive):
    alice = customers.create_employee("alice@acme.test", "Alice")
    bob = customers.create_employee("bob@acme.test", "Bob")
    raw = message("共享报价", "同一封邮件", sender=("Hans", "hans@hamburg.de"), to=("", "alice@acme.test"))
    archive.record(raw, direction="outbound", verdict="accepted", employee_id=alice.id, subject=None,
                   message_id=None)
    assert ids("共享报价 employee:bob@acme.test") == []
    archive.record(raw, direction="inbound", verdict="seen", employee_id=bob.id, place="imap:bob@acme.test/INBOX",
                   ref="1:7", subject=None, message_id=None)
    (rid,) = ids("共享报价")
    assert ids("共享报价 employee:bob@acme.test direction:in") == [rid]
    assert ids("共享报价 employee:alice@acme.test direction:in") == []
    assert ids("共享报价", user_scope=[bob.id]) == [rid]


def test_big_customer_walks_the_text_matches(corpus, monkeypatch):
    from gateway.archive import search as search_mod

    monkeypatch.setattr(search_mod, "FTS_PROBE_LIMIT", 0)  # every customer counts as big
    assert ids("customer:Hamburg LED") == [3, 2, 1]
    assert ids(f"customer:{corpus.hamburg.id} 报价") == [1]
    assert ids("customer:lagos 样品") == [4]


def test_sighting_lookups_go_by_record_without_statistics(corpus, db):
    """SQLite without ANALYZE (the gateway never runs it) once chose the employee_id or
    direction index for the correlated sighting look-up: one scan of every such sighting per
    candidate document (seconds at 100k).  The plan must probe by record_id."""
    from gateway.archive.query import parse
    from gateway.archive.search import _build, _Sql

    assert db.execute_sql("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone()[0] == 0
    for text in ("employee:alice@acme.test quotation", "direction:in 报价单", "quotation"):
        sql = _Sql()
        base = _build(sql, parse(text), [corpus.alice.id] if text == "quotation" else None)
        plan = [r[3] for r in db.execute_sql("EXPLAIN QUERY PLAN " + base, sql.params).fetchall()]
        probes = [p for p in plan if p.startswith("SEARCH g ")]
        assert probes and all("(record_id=?)" in p for p in probes), plan
