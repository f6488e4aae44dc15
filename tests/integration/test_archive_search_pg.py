"""The archive search on the real PostgreSQL fixture: the same queries as on SQLite."""

from __future__ import annotations

import pytest

from gateway.archive import doctables, documents, extraction, terms
from gateway.archive.search import search
from tests.harness import wait_until
from tests.harness.pgdb import pg_db
from tests.unit.archive import test_search as sqlite_cases
from tests.unit.archive.conftest import archive  # noqa: F401 - the SQLite cases' fixture, on this db

pytestmark = pytest.mark.integration


# LC_CTYPE C (pg_trgm cannot index CJK: grams must carry it) and C.UTF-8
db = pg_db("t_archsearch_", ("C", "C.UTF-8"))


corpus = sqlite_cases.corpus
ids = sqlite_cases.ids

test_chinese_terms_of_every_length = sqlite_cases.test_chinese_terms_of_every_length
test_english_substrings_case_insensitive_newest_first = (
    sqlite_cases.test_english_substrings_case_insensitive_newest_first)
test_long_and_short_terms_together = sqlite_cases.test_long_and_short_terms_together
test_fielded = sqlite_cases.test_fielded
test_customer_and_correspondence = sqlite_cases.test_customer_and_correspondence
test_scope_and_pagination = sqlite_cases.test_scope_and_pagination
test_later_sightings_count_for_employee_and_direction = (
    sqlite_cases.test_later_sightings_count_for_employee_and_direction)
test_removed_records_are_gone = sqlite_cases.test_removed_records_are_gone
test_every_sighting_of_a_message_counts = sqlite_cases.test_every_sighting_of_a_message_counts
test_hostile_terms_are_data_not_syntax = sqlite_cases.test_hostile_terms_are_data_not_syntax


def test_substring_terms_narrow_by_latin_trigrams_and_cjk_grams(db, corpus, monkeypatch):
    """Migration 163: the trigram index covers the text outside CJK; a CJK term's candidates
    come from its grams (under either LC_CTYPE), a punctuated term's from the trigram index."""
    from gateway.archive import search as search_mod

    db.execute_sql("SET enable_seqscan = off")  # five rows: make the planner show it can use the indexes
    plan = "\n".join(r[0] for r in db.execute_sql(
        "EXPLAIN SELECT docid FROM archivesearchtext WHERE latin ILIKE %s", ("%hamburg.d%",)).fetchall())
    assert "archivesearchtext_latin_trgm" in plan
    names = {r[0] for r in db.execute_sql(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'archivesearchtext'").fetchall()}
    assert "archivesearchtext_doc_trgm" not in names  # dropped: CJK no longer goes through trigrams
    db.execute_sql("SET enable_seqscan = on")
    latin = db.execute_sql("SELECT latin FROM archivesearchtext t JOIN archivesearchdoc d USING (docid)"
                           " WHERE d.record_id = 1").fetchone()[0]
    assert "报价" not in latin and "LED" in latin
    monkeypatch.setattr(search_mod, "PG_WINDOW", 1)  # the newest document only: the rest is gathered by GIN
    assert ids("报价单") == [1]
    assert ids("附件是最新") == [1]  # a CJK substring: all its pairs are among the document's grams
    assert ids("LED灯") == [1]  # mixed: "LED" from the trigrams, 灯 from the grams
    assert ids("from:hans@hamburg.d") == [3]  # a piece of an address: latin trigrams
    assert ids("报价单 LED") == ids("报价单") == [1]
    assert ids("单号不存在") == []
    for page, want in ((1, [3]), (2, [2]), (3, [1])):  # pages past the window: the same narrowing
        assert [h.record_id for h in search("hamburg.de", per_page=1, page=page).hits] == want


def test_latin_text_is_the_same_in_python_and_in_migration_163(db):
    """Rows written before 163 get ``latin`` from the migration's SQL: it must equal what the
    indexer writes, or a term could miss a document (the trigram index only narrows)."""
    from gateway.archive.search_schema import PG_CJK
    from gateway.archive.terms import latin_text

    samples = ["报价单 LED灯具 panel", "カタカナ and ひらがな", "한국어 text", "𠀀𠀁 ext-B 𪚲",
               "ｆｕｌｌ ｗｉｄｔｈ，。", "mixed报价PO-123456单", "", "no cjk at all",
               "〇〆 々 ・ ー", "\u3040\u30ff\u3400\u4dbf\u9fff\ufaff"]
    for text in samples:
        got = db.execute_sql("SELECT regexp_replace(%s, %s, ' ', 'g')", (text, PG_CJK)).fetchone()[0]
        assert got == latin_text(text), (text, got)


def test_migration_163_backfills_latin_of_existing_documents(db, corpus):
    from gateway.archive.search_schema import search_trigrams_outside_cjk

    db.execute_sql("ALTER TABLE archivesearchtext DROP CONSTRAINT archivesearchtext_latin_given")
    db.execute_sql("DROP INDEX archivesearchtext_latin_trgm")
    db.execute_sql("ALTER TABLE archivesearchtext DROP COLUMN latin")  # a database from before 163
    db.execute_sql("CREATE INDEX archivesearchtext_doc_trgm ON archivesearchtext USING gin (doc gin_trgm_ops)")
    search_trigrams_outside_cjk(db)
    assert db.execute_sql("SELECT count(*) FROM archivesearchtext WHERE latin IS NULL").fetchone()[0] == 0
    assert ids("from:hans@hamburg.d") == [3] and ids("报价单") == [1]
    search_trigrams_outside_cjk(db)  # idempotent


def test_newest_window_then_whole_index(db, corpus, monkeypatch):
    from gateway.archive import search as search_mod

    # window of 2000 newest documents: holds the page (common word path)
    assert [h.record_id for h in search("LED", per_page=1).hits] == [3]
    assert [h.record_id for h in search("LED", per_page=1, page=2).hits] == [2]
    # window of the 2 newest (5, 4): no LED there → the whole index answers
    monkeypatch.setattr(search_mod, "PG_WINDOW", 2)
    page = search("LED", per_page=1)
    assert [h.record_id for h in page.hits] == [3] and page.has_more
    assert [h.record_id for h in search("LED", per_page=1, page=3).hits] == [1]


def test_latin_words_and_phrases_use_the_word_index(db, corpus):
    from gateway.archive.search import pg_tsquery

    assert pg_tsquery("Price list") == "price <-> list" and pg_tsquery("invoice") == "invoice:*"
    assert pg_tsquery("报价单") is None and pg_tsquery("hans@hamburg.de") is None and pg_tsquery("PO-1") is None
    db.execute_sql("SET enable_seqscan = off")  # five rows: make the planner show it can use the index
    plan = "\n".join(r[0] for r in db.execute_sql(
        "EXPLAIN SELECT docid FROM archivesearchtext WHERE tsv @@ to_tsquery('simple', %s)",
        (pg_tsquery("price"),)).fetchall())
    assert "archivesearchtext_tsv" in plan
    db.execute_sql("SET enable_seqscan = on")
    assert ids('"price list"') == [2]
    assert ids('"list price"') == []  # a phrase keeps its order
    assert ids('"price lis"') == []  # ... and its whole words
    assert ids("quot") == [3, 2]  # one word: a word start
    assert ids('"the price list is attached"') == [2]
    assert ids('"dear hans the price"') == [2]  # across punctuation, as the parser splits
    assert ids("from:alice quotation") == [2]
    assert ids("subject:lamps") == [3, 2]
    # a whole address: from the address rows; a part of one: the trigram index
    assert ids("from:Hans@Hamburg.de") == [3] and ids("from:hans@hamburg.d") == [3]
    assert ids("to:hans@hamburg.de quotation") == [2]


def test_migration_152_backfills_the_word_index_of_existing_documents(db, corpus):
    from gateway.archive.search_schema import search_words

    db.execute_sql("DROP INDEX archivesearchtext_tsv")
    db.execute_sql("ALTER TABLE archivesearchtext DROP COLUMN tsv")  # a database from before 152
    search_words(db)
    empty = db.execute_sql("SELECT count(*) FROM archivesearchtext WHERE tsv IS NULL OR length(tsv) = 0").fetchone()
    assert empty[0] == 0
    assert ids('"price list"') == [2]
    search_words(db)  # idempotent


def test_plan_from_the_window_and_planner_settings_restored(db, corpus, monkeypatch):
    from gateway.archive import search as search_mod

    monkeypatch.setattr(search_mod, "PG_WINDOW", 3)  # the newest three: 5, 4, 3
    monkeypatch.setattr(search_mod, "PG_WALK_MIN", 1)
    with db.atomic():  # a caller's transaction (the panel) keeps its own settings afterwards
        assert ids("Lunch") == [5]  # only in the window
        assert ids("quotation") == [3, 2]  # one match in the window: walk newest first
        monkeypatch.setattr(search_mod, "PG_WALK_MIN", 2)
        assert ids("quotation") == [3, 2]  # too few to walk: gathered from the index
        assert ids("报价单") == [1]  # none in the window: gathered from the index
        assert ids("zzqxv") == []
        for name in ("enable_seqscan", "enable_bitmapscan"):
            assert db.execute_sql(f"SHOW {name}").fetchone()[0] == "on"
    assert [h.record_id for h in search("quotation", per_page=1, page=2).hits] == [2]


def test_word_pairs_narrow_a_phrase_and_migration_153_backfills_them(db, corpus):
    from gateway.archive.search import word_pairs
    from gateway.archive.search_schema import search_word_pairs

    assert word_pairs("Price list attached") == ["price list", "list attached"]
    pairs = db.execute_sql("SELECT archive_word_pairs(%s)", ("Dear Hans, the price-list: 样品 OK.",)).fetchone()[0]
    assert sorted(pairs) == ["dear hans", "hans the", "list ok", "price list", "the price"]
    db.execute_sql("DROP INDEX archivesearchtext_pairs")
    db.execute_sql("ALTER TABLE archivesearchtext DROP COLUMN pairs")  # a database from before 153
    search_word_pairs(db)
    assert db.execute_sql("SELECT count(*) FROM archivesearchtext WHERE cardinality(pairs) = 0").fetchone()[0] == 0
    assert ids('"price list"') == [2] and ids('"best alice"') == [2]
    search_word_pairs(db)  # idempotent


def test_the_window_probe_starts_at_the_date_range_end(db, corpus, monkeypatch):
    from gateway.archive import search as search_mod
    from gateway.db.models import database

    monkeypatch.setattr(search_mod, "PG_WINDOW", 2)
    statements: list[str] = []
    real = database.obj.execute_sql
    monkeypatch.setattr(database.obj, "execute_sql",
                        lambda sql, *a, **k: statements.append(sql) or real(sql, *a, **k))
    # the newest documents (5 and 4, Jan 5 and 4) are past the range: the probe looks at the
    # range's newest two (3 and 2, both matches), which answer the page — no fallback plan
    assert ids("quotation before:2026-01-04", per_page=1) == [3]
    assert not any("SET LOCAL" in s for s in statements), statements


PAIR_TEXTS = [
    "Dear Hans, the price-list: 样品 OK.",
    "  leading and trailing separators...  ",
    "Quotation\nfor LED lamps\tand\r\nPO-123456 / 2x 40HQ",
    "MiXeD CaSe Words, Ünïcödé wörds between ASCII words, and café au lait",
    "报价单 LED灯具 solar inverter 锂电池 lithium battery",
    "\u212aelvin sign and \u0130stanbul office; K\u0307 and i\u0307 dots",  # the two lower() outliers
    "",
    "one",
    "a b a b a b",  # repeated pairs: each once
    "x\\y \"quoted\" back\\slash tab\there",
]


def test_doc_pairs_hold_what_the_sql_function_gives(db, request):
    """The writer's word pairs (terms.doc_pairs, migration 161) against migration 153's SQL
    function in this database's LC_CTYPE: the same set, or more where a text holds İ or the
    Kelvin sign (the only characters the two lower() functions turn into a-z differently)."""
    texts = PAIR_TEXTS + [extraction.all_text(extraction.extract(m)) for m in _sample_messages()] + _random_texts()
    rows = db.execute_sql("SELECT archive_word_pairs(t) FROM unnest(%s::text[]) WITH ORDINALITY AS x(t, i)"
                          " ORDER BY i", (texts,)).fetchall()
    assert len(rows) == len(texts)
    for text, (sql_pairs,) in zip(texts, rows, strict=True):
        sql = set(sql_pairs)
        mine = terms.doc_pairs(text)
        assert mine == sorted(set(mine))
        if "\u0130" in text or "\u212a" in text:
            assert sql <= set(mine), text
        else:
            assert set(mine) == sql, text
    special = set(terms.doc_pairs(PAIR_TEXTS[5]))
    assert {"kelvin sign", "elvin sign", "istanbul office", "and stanbul"} <= special


def _sample_messages() -> list[bytes]:
    from tests.unit.archive.mailfactory import message

    return [message("Quotation for LED lamps", "Dear Hans, the price list is attached. Best, Alice",
                    sender=("Alice", "alice@acme.test"), to=("Hans Müller", "hans@hamburg.de")),
            message("报价单 LED灯具", "您好，附件是最新报价，请查收。 price list 2026",
                    sender=("王小明", "alice@acme.test"), to=("Hans", "hans@hamburg.de"), charset="gb2312",
                    attachments=("形式发票.pdf",))]


def _random_texts(n: int = 400) -> list[str]:
    """Words and separators from ASCII, digits, CJK, accented and other-script letters (Turkish
    dotted/dotless i, Kelvin sign, sharp s, Greek, fullwidth letters, combining marks)."""
    import random

    rnd = random.Random(161)
    alphabet = ("abcXYZ019", " \t\n-.,:/_@'\"\\", "报价单样品", "éÜñçØå", "\u0130\u0131\u212a\u212bß", "ΣσςΑ",
                "\uff21\uff41\uff10", "\u0307\u0301")
    return ["".join(rnd.choice(rnd.choice(alphabet)) for _ in range(rnd.randrange(0, 60))) for _ in range(n)]


def test_text_rows_keep_every_character_through_copy(db):
    """The text rows go in by COPY: tabs, newlines, CRs, backslashes and quotes come back as
    they were, in the text columns and in the grams and pairs arrays."""
    import datetime as dt

    ex = extraction.Extracted(subject="tab\there \\N back\\slash", sender='"Q, uoted" <a@b.test>', rcpt="cr\rlf\r\nend",
                         body="line1\nline2\\.\n\\.\nprice\tlist", attnames='x"y\\z.pdf', from_addrs=["a@b.test"],
                         to_addrs=["odd\\one\t@x.test"], has_attachment=True)
    grams = ["ab", 'a"', "b\\", "中"]
    when = dt.datetime(2026, 1, 9, 8, 7, 6, 543210)
    plain = extraction.Extracted(subject="plain", body="no employee")
    doctables.write_rows([(12345, 77, when, "out", None, ex, grams), (12346, 78, when, "in", 5, plain, None)])
    docs = db.execute_sql("SELECT docid, record_id, created_at, direction, employee_id, has_attachment"
                          " FROM archivesearchdoc ORDER BY docid").fetchall()
    assert docs == [(12345, 77, when, "out", None, True), (12346, 78, when, "in", 5, False)]
    assert db.execute_sql("SELECT docid, employee_id, direction FROM archivesearchseen ORDER BY docid").fetchall() == [
        (12345, None, "out"), (12346, 5, "in")]
    assert db.execute_sql("SELECT docid, role, address, domain FROM archivesearchaddr ORDER BY role").fetchall() == [
        (12345, "from", "a@b.test", "b.test"), (12345, "to", "odd\\one\t@x.test", "x.test")]
    row = db.execute_sql("SELECT subject, sender, rcpt, attnames, doc, grams, pairs FROM archivesearchtext"
                         " WHERE docid = 12345").fetchone()
    doc = "\n".join((ex.subject, ex.sender, ex.rcpt, ex.attnames, ex.body))
    assert row[:5] == (ex.subject, ex.sender, ex.rcpt, ex.attnames, doc)
    assert row[5] == grams
    assert row[6] == terms.doc_pairs(doc) and "price list" in row[6]
    assert set(row[6]) == set(db.execute_sql("SELECT archive_word_pairs(%s)", (doc,)).fetchone()[0])


def test_migrations_161_162_on_an_archive_with_documents(db, corpus):
    """An archive indexed before 161/162 (pairs a generated column, pglz): the pairs stay as
    stored, later documents bring their own, a row without pairs is refused, lz4 for new values."""
    from gateway.db.migrations import upgrade
    from gateway.db.models import SchemaVersion

    # the table as 153 and 152 left it: pairs generated by the server, default compression
    db.execute_sql("ALTER TABLE archivesearchtext DROP COLUMN pairs")
    from gateway.archive.search_schema import search_word_pairs

    search_word_pairs(db)
    for column in ("doc", "tsv", "grams"):
        db.execute_sql(f"ALTER TABLE archivesearchtext ALTER COLUMN {column} SET COMPRESSION pglz")
    SchemaVersion.delete().where(SchemaVersion.version.in_([161, 162])).execute()
    before = dict(db.execute_sql("SELECT docid, pairs FROM archivesearchtext").fetchall())
    assert len(before) == 5 and all(before.values())

    assert upgrade(db) == [161, 162]

    generated = db.execute_sql("SELECT attgenerated FROM pg_attribute WHERE attrelid = 'archivesearchtext'::regclass"
                               " AND attname = 'pairs'").fetchone()[0]
    assert generated == ""
    assert dict(db.execute_sql("SELECT docid, pairs FROM archivesearchtext").fetchall()) == before
    compression = dict(db.execute_sql("SELECT attname, attcompression FROM pg_attribute WHERE attrelid ="
                                      " 'archivesearchtext'::regclass AND attname IN ('doc', 'tsv', 'grams', 'pairs')"))
    assert compression == {"doc": "l", "tsv": "l", "grams": "l", "pairs": "l"}
    from tests.unit.archive.mailfactory import message

    sqlite_cases.add(6, message("Price list", "Best, Alice: the price list of long things. " * 200,
                                sender=("Alice", "alice@acme.test"), to=("Hans", "hans@hamburg.de")), day=6)
    assert ids('"price list"') == [6, 2] and ids('"best alice"') == [6, 2]
    assert db.execute_sql("SELECT pg_column_compression(doc) FROM archivesearchtext WHERE docid ="
                          " (SELECT max(docid) FROM archivesearchtext)").fetchone()[0] == "lz4"
    from peewee import IntegrityError

    with pytest.raises(IntegrityError, match="archivesearchtext_pairs_given"), db.atomic():
        db.execute_sql("INSERT INTO archivesearchtext (docid, subject, sender, rcpt, attnames, doc, latin, grams)"
                       " VALUES (1, '', '', '', '', 'price list', 'price list', '{}')")
    with pytest.raises(IntegrityError, match="archivesearchtext_latin_given"), db.atomic():  # migration 163
        db.execute_sql("INSERT INTO archivesearchtext (docid, subject, sender, rcpt, attnames, doc, grams, pairs)"
                       " VALUES (1, '', '', '', '', 'price list', '{}', '{\"price list\"}')")
    assert upgrade(db) == []
    from gateway.archive.search_schema import search_pairs_from_the_writer, search_text_lz4

    search_pairs_from_the_writer(db)  # idempotent
    search_text_lz4(db)


def _entries(n: int, bad: int | None = None) -> list[tuple]:
    import datetime as dt
    from types import SimpleNamespace

    out = []
    for i in range(n):
        rec = SimpleNamespace(id=1000 + i, created_at=dt.datetime(2026, 2, 1) + dt.timedelta(minutes=i),
                              direction="outbound", employee_id=None)
        ex = extraction.Extracted(subject=f"split {i}" + ("\x00" if i == bad else ""), body=f"price list number{i}",
                             from_addrs=[f"a{i}@b.test"])
        out.append((rec, ex, None))
    return out


@pytest.mark.parametrize("n, bad", [(70, None), (70, 3), (70, 60), (600, None)])
def test_a_large_write_goes_out_on_two_connections(db, n, bad, caplog, monkeypatch):
    """≥ PG_SPLIT_MIN documents: the older half on a second connection, the rest here; a bad
    document in either half (a NUL: the server refuses it) costs only itself — the one-by-one
    fallback skips what the other half already committed."""
    import threading

    from gateway.archive.search import record_ids

    apart: list[tuple[str, list[int]]] = []
    real = doctables._write_apart
    monkeypatch.setattr(doctables, "_write_apart", lambda rows, failed: apart.append(
        (threading.current_thread().name, [r[1] for r in rows])) or real(rows, failed))
    assert doctables.PG_SPLIT_MIN <= 70
    with db.atomic():
        done = documents.insert_documents(_entries(n, bad))
    expected = n - 1 if bad is not None else n
    assert done == expected
    assert [(name, len(ids), ids[0]) for name, ids in apart] == [("archive-index-copy", n // 2, 1000)]
    assert db.execute_sql("SELECT count(*) FROM archivesearchdoc d JOIN archivesearchtext t USING (docid)"
                          " WHERE d.record_id >= 1000").fetchone()[0] == expected
    assert len(record_ids('"price list"')) == expected
    failed = [r for r in caplog.records if "full-text indexing failed" in r.getMessage()]
    assert [r.args for r in failed] == ([] if bad is None else [(1000 + bad,)])
    # the second connection is closed: its backend leaves pg_stat_activity when it has exited,
    # which the server does a moment after the client's goodbye (later on a loaded machine)
    wait_until(lambda: db.execute_sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                      " AND pid <> pg_backend_pid()").fetchone()[0] == 0,
               timeout=10, what="the second connection's backend to exit")
