"""The archive search on the real PostgreSQL fixture: the same queries as on SQLite."""

from __future__ import annotations

import pytest

from gateway.archive import index
from gateway.archive.search import search
from gateway.db import connect, is_postgres
from tests.unit.archive import test_search as sqlite_cases

pytestmark = pytest.mark.integration


@pytest.fixture(params=["C", "C.UTF-8"])
def db(postgres, request):
    """A fresh database; LC_CTYPE C (pg_trgm cannot index CJK: grams must carry it) and C.UTF-8."""
    name = "t_archsearch_" + request.node.name.split("[")[0][-20:].lower() + ("_u" if "UTF" in request.param else "_c")
    postgres.drop_database(name)
    database = connect(postgres.create_database(name, lc_ctype=request.param))
    assert is_postgres()
    yield database
    database.close()


@pytest.fixture
def archive(db, tmp_path):
    from gateway.archive import Archive

    return Archive(tmp_path / "archive", tmp_path / "archive.keys")


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


def test_trigram_index_is_used_for_chinese_with_utf8_ctype(db, corpus, request):
    if "UTF" not in request.node.callspec.params["db"]:
        pytest.skip("C ctype: pg_trgm extracts no CJK trigrams (documented)")
    db.execute_sql("SET enable_seqscan = off")  # five rows: make the planner show it can use the index
    plan = "\n".join(r[0] for r in db.execute_sql(
        "EXPLAIN SELECT docid FROM archivesearchtext WHERE doc ILIKE %s", ("%报价单%",)).fetchall())
    assert "archivesearchtext_doc_trgm" in plan
    assert [h.record_id for h in search("报价单").hits] == [1]
    assert index.short_grams("报价单")  # grams are written on PostgreSQL too


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
