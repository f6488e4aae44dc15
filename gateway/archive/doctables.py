"""Index documents into the tables and out again: ``write_rows`` puts prepared document rows
(``documents.doc_row``) into ``archivesearchdoc``, ``archivesearchseen``, ``archivesearchaddr``
and the backend's text index — SQLite's FTS5 tables by ``executemany``, PostgreSQL's
``archivesearchtext`` by ``COPY`` (a large write split over two connections) — and
``remove_records`` takes a purged record's rows out of every one of them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from gateway.archive.extraction import all_text
from gateway.archive.terms import doc_pairs, latin_text, short_grams
from gateway.db import is_postgres
from gateway.db.models import database


def write_rows(rows: list[tuple]) -> None:
    """Bulk insert prepared document rows (also used by the benchmark's generator); a row's
    grams (``Grams``) may be a list, one space-separated text or None (computed here)."""
    # In docid order: FTS5 writes out its pending terms whenever a rowid is not above the
    # previous one, and the records of a batch are not always in time order (the SMTP handler
    # stamps them in parallel worker threads before the commit; id mod 1024 wraps): out of
    # order, a 600-document drain went out as hundreds of tiny segments, merged again —
    # three times the CPU (see BENCHMARKS, archive, 2026-11-30 evening).
    ordered = sorted(rows, key=_docid_of)
    if is_postgres() and len(ordered) >= PG_SPLIT_MIN:
        _write_split(ordered)
    else:
        _write_ordered(ordered)


def _write_ordered(ordered: list[tuple]) -> None:
    db = database.obj
    docs, addrs, texts, seen = [], [], [], []
    for docid, record_id, created_at, direction, employee_id, ex, grams in ordered:
        docs.append((docid, record_id, created_at, direction, employee_id, ex.has_attachment))
        seen.append((docid, employee_id, direction))
        for role, lst in (("from", ex.from_addrs), ("to", ex.to_addrs)):
            for a in dict.fromkeys(lst):
                addrs.append((docid, role, a, a.rsplit("@", 1)[-1]))
        if grams is None:
            grams = short_grams(all_text(ex))
        texts.append((docid, ex.subject, ex.sender, ex.rcpt, ex.body, ex.attnames, grams))
    cur = db.cursor()
    if is_postgres():
        _copy(cur, "archivesearchdoc (docid, record_id, created_at, direction, employee_id, has_attachment)",
              (f"{d}\t{r}\t{c.isoformat(' ')}\t{_copy_text(di)}\t{_copy_value(e)}\t{'t' if a else 'f'}\n"
               for d, r, c, di, e, a in docs))
        _copy(cur, "archivesearchseen (docid, employee_id, direction)",
              (f"{d}\t{_copy_value(e)}\t{_copy_text(di)}\n" for d, e, di in seen))
        if addrs:
            _copy(cur, "archivesearchaddr (docid, role, address, domain)",
                  (f"{d}\t{ro}\t{_copy_text(a)}\t{_copy_text(do)}\n" for d, ro, a, do in addrs))
        _copy(cur, "archivesearchtext (docid, subject, sender, rcpt, attnames, doc, latin, grams, pairs)",
              _text_lines(texts))
        return
    cur.executemany("INSERT INTO archivesearchdoc (docid, record_id, created_at, direction, employee_id,"
                    " has_attachment) VALUES (?, ?, ?, ?, ?, ?)", docs)
    cur.executemany("INSERT INTO archivesearchseen (docid, employee_id, direction) VALUES (?, ?, ?)", seen)
    if addrs:
        cur.executemany("INSERT INTO archivesearchaddr (docid, role, address, domain) VALUES (?, ?, ?, ?)", addrs)
    cur.executemany("INSERT INTO archivefts (rowid, subject, sender, rcpt, body, attnames) VALUES (?, ?, ?, ?, ?, ?)",
                    [t[:6] for t in texts])
    cur.executemany("INSERT INTO archivegrams (rowid, grams) VALUES (?, ?)",
                    [(t[0], t[6] if isinstance(t[6], str) else " ".join(t[6])) for t in texts])


PG_SPLIT_MIN = 64  # documents: a larger write goes out on two PostgreSQL connections at once


def _write_split(ordered: list[tuple]) -> None:
    """PostgreSQL: the older half of the documents written on a second connection, in its own
    transaction, while this one writes the newer half in the caller's.  A document's server
    CPU is nearly all GIN maintenance (trigram, words, word pairs, grams) in the one backend
    that inserts it; two backends use both cores (3 × 600 bench documents: 1.10 → 0.74 ms a
    document of wall time, the same CPU).  Only for documents of committed records (the
    indexer's drain, ``ingest_many``'s step 4), which may be indexed in any grouping: if either
    half fails, this raises once both are over, and the caller's one-by-one fallback skips the
    records the other half did index (``documents.insert_documents``).  The second connection is opened
    and closed per call (a few ms; none stays open to hold a database).  Writers order the
    documents the same way (by docid), so two calls on overlapping records wait for each other
    in one direction only."""
    half = len(ordered) // 2
    failed: list[BaseException] = []
    # A thread of its own per call (no shared pool: a call whose half waits behind another
    # call's could wait, through the database, for that very call)
    apart = threading.Thread(target=_write_apart, args=(ordered[:half], failed), name="archive-index-copy")
    apart.start()
    try:
        _write_ordered(ordered[half:])
    finally:
        apart.join()
    if failed:
        raise failed[0]


def _write_apart(rows: list[tuple], failed: list[BaseException]) -> None:
    db = database.obj
    try:
        with db.connection_context(), db.atomic():
            _write_ordered(rows)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
        failed.append(exc)


def _copy(cur: object, table: str, lines: Iterable[str]) -> None:
    """PostgreSQL: rows by ``COPY table FROM STDIN`` (text format), sent while they are made
    (``_Lines``): the server inserts the first ones while the rest are built.  No SQL text for
    the server to parse — ``execute_values`` spelled each document's short grams as
    ``ARRAY['报', '报价', …]``, a few hundred expressions a row, half of a plain insert's server
    CPU — and a few times less Python per row than ``execute_values``' quoting."""
    cur.copy_expert(f"COPY {table} FROM STDIN", _Lines(lines), size=COPY_CHUNK)  # type: ignore[attr-defined]


COPY_CHUNK = 64 * 1024  # characters handed to the connection at a time (_copy)


class _Lines:
    """A file for ``copy_expert`` whose ``read`` makes the lines as they are asked for."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self._rest = ""

    def read(self, size: int = -1) -> str:
        parts, n = [self._rest], len(self._rest)
        for line in self._lines:
            parts.append(line)
            n += len(line)
            if 0 <= size <= n:
                break
        data = "".join(parts)
        if 0 <= size < len(data):
            self._rest = data[size:]
            return data[:size]
        self._rest = ""
        return data


def _text_lines(texts: list[tuple]) -> Iterator[str]:
    """``archivesearchtext`` rows for ``_copy``, each with its text outside CJK (``latin_text``,
    migration 163) and its word pairs (``doc_pairs``: the indexer computes them since
    migration 161, not the server)."""
    for d, s, f, r, b, a, g in texts:
        doc = "\n".join((s, f, r, a, b))
        grams = g.split() if isinstance(g, str) else g
        yield (f"{d}\t{_copy_text(s)}\t{_copy_text(f)}\t{_copy_text(r)}\t{_copy_text(a)}\t{_copy_text(doc)}"
               f"\t{_copy_text(latin_text(doc))}\t{_copy_text(_array_literal(grams))}"
               f"\t{_copy_text(_array_literal(doc_pairs(doc)))}\n")


def _copy_value(value: object) -> str:
    """A nullable non-text value for ``COPY`` (None: ``\\N``)."""
    return "\\N" if value is None else str(value)


def _copy_text(value: str) -> str:
    """A value for ``COPY … FROM STDIN`` (text format): backslash, tab, newline and CR escaped."""
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    return value.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _array_literal(items: Iterable[str]) -> str:
    """A PostgreSQL text[] literal: every element double-quoted, its backslashes and quotes escaped."""
    return "{" + ",".join('"' + (x.replace("\\", "\\\\").replace('"', '\\"') if ("\\" in x or '"' in x) else x)
                          + '"' for x in items) + "}"


def _docid_of(row: tuple) -> int:
    return row[0]


def forget_record(record_id: int) -> None:
    """Retention hook (gateway/archive/retention.py): drop one purged record's document."""
    remove_records([record_id])


def remove_records(record_ids: Iterable[int]) -> int:
    """Drop the index documents of deleted records (retention); returns how many."""
    from gateway.archive.search_schema import SearchDoc
    from gateway.archive.unread import UnreadRecord

    ids = list(record_ids)
    removed = 0
    for i in range(0, len(ids), 500):
        UnreadRecord.delete().where(UnreadRecord.record_id.in_(ids[i:i + 500])).execute()
        docids = [d.docid for d in SearchDoc.select(SearchDoc.docid).where(SearchDoc.record_id.in_(ids[i:i + 500]))]
        if not docids:
            continue
        db = database.obj
        marks = ", ".join(["%s" if is_postgres() else "?"] * len(docids))
        tables = ["archivesearchaddr", "archivesearchseen", "archivesearchdoc"]
        tables += ["archivesearchtext"] if is_postgres() else []
        for table in tables:
            db.execute_sql(f"DELETE FROM {table} WHERE docid IN ({marks})", docids)
        if not is_postgres():
            rows = db.execute_sql(f"SELECT rowid, subject, sender, rcpt, attnames, body FROM archivefts"
                                  f" WHERE rowid IN ({marks})", docids).fetchall()
            for rowid, *text in rows:  # contentless: delete with the very tokens inserted
                db.execute_sql("INSERT INTO archivegrams(archivegrams, rowid, grams) VALUES('delete', ?, ?)",
                               (rowid, " ".join(short_grams("\n".join(text)))))
            db.execute_sql(f"DELETE FROM archivefts WHERE rowid IN ({marks})", docids)
        removed += len(docids)
    return removed
