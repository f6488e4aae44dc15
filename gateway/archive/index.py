"""Full-text index of archived messages: index rows (text extraction: ``extraction``; the
short grams and other derived terms: ``terms``).

``index_record(record, raw)`` writes one document (see ``search_schema`` for the
tables): metadata in ``archivesearchdoc``, addresses in ``archivesearchaddr`` and the
text in the backend's text index.  It runs inside the caller's transaction.

Document ids (``docid``) are time ordered — ``created_at`` in microseconds × 1024 plus
the record id mod 1024 — so "newest first" is a walk down the primary key and, on
SQLite, down the FTS5 rowids (no sort of the match set).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from peewee import fn

from gateway.archive.extraction import Extracted, all_text, extract, indexable
from gateway.archive.terms import doc_pairs, latin_text, short_grams
from gateway.archive.unread import (
    Failure,
    _due_for_retry,
    _Listed,
    _note_unread,
    _write_failure,
    data_error,
    given_up,  # noqa: F401 - a hook (gateway/archive/cli.py)
)
from gateway.db import is_postgres
from gateway.db.models import database, utcnow

log = logging.getLogger("mailgate.archive.index")

_EPOCH = dt.datetime(1970, 1, 1)


Grams = list[str] | str | None  # short grams: a list, or joined by spaces (workers), or None: not computed yet


# -- writing ------------------------------------------------------------------------------


def docid_for(created_at: dt.datetime, record_id: int) -> int:
    """Time-ordered document id: microseconds since 1970 × 1024 + record id mod 1024."""
    if created_at.tzinfo is not None:
        created_at = created_at.astimezone(dt.UTC).replace(tzinfo=None)
    micros = (created_at - _EPOCH) // dt.timedelta(microseconds=1)
    return micros * 1024 + (int(record_id) % 1024)


def _field(record: object, *names: str, default: object = None) -> object:
    for name in names:
        value = getattr(record, name, None)
        if value is not None:
            return value
    return default


def index_record(record: object, raw: bytes) -> None:
    """Index one archived record (call once per new record, inside its transaction)."""
    _add_record(record, extract(raw))


def _add_record(record: object, ex: Extracted) -> None:
    created = _field(record, "created_at", "first_seen_at", default=None) or dt.datetime.now(dt.UTC)
    employee = _field(record, "employee_id", default=None)
    if employee is None:
        emp = getattr(record, "employee", None)
        employee = getattr(emp, "id", emp) if emp is not None else None
    add_document(
        record_id=int(record.id),
        created_at=created,
        direction=str(_field(record, "direction", default="") or ""),
        employee_id=int(employee) if employee is not None else None,
        ex=ex,
    )


def add_documents(entries: list[tuple[object, Extracted, Grams]],
                  written: dict[int, tuple[int, int | None, str]] | None = None) -> int:
    """Index many new records at once (batch ingest, the background indexer): ``(record,
    extracted text, short grams or None)`` each; one look-up for docid collisions and one
    bulk insert.  Call inside a write transaction; returns how many documents were written.
    ``written``: filled with record id → (docid, employee id, direction) of each document
    (``index_sightings``' ``known``)."""
    if not entries:
        return 0
    rows, taken = [], _taken_docids([docid_for(_created(r), int(r.id)) for r, _, _ in entries])
    for rec, ex, grams in entries:
        created = _created(rec)
        docid = docid_for(created, int(rec.id))
        while docid in taken:  # the same microsecond and id mod 1024: the next free slot
            docid += 1024
            if _docid_taken(docid):
                taken.add(docid)
        taken.add(docid)
        rows.append((docid, int(rec.id), created, _direction(str(_field(rec, "direction", default="") or "")),
                     _employee_of(rec), ex, grams))
    write_rows(rows)
    if written is not None:
        written.update((row[1], (row[0], row[4], row[3])) for row in rows)
    return len(rows)


def _created(record: object) -> dt.datetime:
    created = _field(record, "created_at", "first_seen_at", default=None) or dt.datetime.now(dt.UTC)
    if created.tzinfo is not None:
        created = created.astimezone(dt.UTC).replace(tzinfo=None)
    return created


def _employee_of(record: object) -> int | None:
    employee = _field(record, "employee_id", default=None)
    if employee is None:
        emp = getattr(record, "employee", None)
        employee = getattr(emp, "id", emp) if emp is not None else None
    return int(employee) if employee is not None else None


def _docid_taken(docid: int) -> bool:
    taken = f"SELECT 1 FROM archivesearchdoc WHERE docid = {'%s' if is_postgres() else '?'}"
    return database.obj.execute_sql(taken, (docid,)).fetchone() is not None


def _taken_docids(docids: list[int]) -> set[int]:
    if not docids:
        return set()
    marks = ", ".join(["%s" if is_postgres() else "?"] * len(docids))
    rows = database.obj.execute_sql(f"SELECT docid FROM archivesearchdoc WHERE docid IN ({marks})", docids)
    return {r[0] for r in rows.fetchall()}


def add_document(*, record_id: int, created_at: dt.datetime, direction: str, employee_id: int | None,
                 ex: Extracted) -> int:
    """Insert one document; returns its docid."""
    docid = docid_for(created_at, record_id)
    taken = f"SELECT 1 FROM archivesearchdoc WHERE docid = {'%s' if is_postgres() else '?'}"
    while database.obj.execute_sql(taken, (docid,)).fetchone() is not None:
        docid += 1024  # the same microsecond and id mod 1024: the next free slot
    if created_at.tzinfo is not None:
        created_at = created_at.astimezone(dt.UTC).replace(tzinfo=None)
    row = doc_row(docid, record_id, created_at, direction, employee_id, ex)
    write_rows([row])
    return docid


def doc_row(docid: int, record_id: int, created_at: dt.datetime, direction: str, employee_id: int | None,
            ex: Extracted, *, with_grams: bool = False) -> tuple:
    """A row for ``write_rows``; ``with_grams`` computes the short grams now (e.g. in another process)."""
    grams = short_grams(all_text(ex)) if with_grams else None
    return (docid, record_id, created_at, _direction(direction), employee_id, ex, grams)


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
    records the other half did index (``_insert_documents``).  The second connection is opened
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


def _direction(value: str) -> str:
    return {"outbound": "out", "inbound": "in"}.get(value, value)[:10]


def index_sighting(sighting: object) -> None:
    """Note another employee/direction an indexed message was seen with (call for every
    new sighting; a pair already noted is ignored)."""
    from gateway.archive.search_schema import SearchDoc, SearchSeen

    record_id = _field(sighting, "record_id", default=None)
    if record_id is None:
        return
    doc = SearchDoc.select(SearchDoc.docid).where(SearchDoc.record_id == int(record_id)).first()
    if doc is None:
        return
    employee = _field(sighting, "employee_id", default=None)
    direction = _direction(str(_field(sighting, "direction", default="") or ""))
    q = SearchSeen.select().where((SearchSeen.docid == doc.docid) & (SearchSeen.direction == direction))
    q = q.where(SearchSeen.employee_id.is_null() if employee is None else SearchSeen.employee_id == int(employee))
    if not q.exists():
        SearchSeen.insert(docid=doc.docid, employee_id=employee, direction=direction).execute()


def index_sightings(sightings: list, known: dict[int, tuple[int, int | None, str]] | None = None) -> None:
    """``index_sighting`` for many sightings with a few statements instead of two per
    sighting (the background indexer sees a relay:sent sighting for nearly every outbound
    message, nearly always a pair already noted).  ``known``: record id → (docid, employee id,
    direction) of documents written in this transaction (their docid and their one seen row
    need no look-up: a node's smtp:submitted sighting is nearly always exactly that row).
    One savepoint; if it fails, each sighting is tried on its own so one bad row does not
    stop the others."""
    wanted = [(int(r), _field(s, "employee_id", default=None),
               _direction(str(_field(s, "direction", default="") or "")))
              for s in sightings if (r := _field(s, "record_id", default=None)) is not None]
    if not wanted:
        return
    known = known or {}
    try:
        with database.atomic():
            docs = {record_id: doc[0] for record_id, doc in known.items()}
            seen: set[tuple] = {doc for doc in known.values()}
            ask = sorted({r for r, _, _ in wanted if r not in docs})
            docs.update(_select_in("SELECT record_id, docid FROM archivesearchdoc WHERE record_id IN", ask))
            ask_docs = sorted({docid for r, _, _ in wanted if (docid := docs.get(r)) is not None and r not in known})
            seen.update(_select_in("SELECT docid, employee_id, direction FROM archivesearchseen WHERE docid IN",
                                   ask_docs))
            new = []
            for record_id, employee, direction in wanted:
                docid = docs.get(record_id)
                key = (docid, None if employee is None else int(employee), direction)
                if docid is not None and key not in seen:
                    seen.add(key)
                    new.append(key)
            if new:
                mark = "%s" if is_postgres() else "?"
                database.obj.cursor().executemany(
                    f"INSERT INTO archivesearchseen (docid, employee_id, direction) VALUES ({mark}, {mark}, {mark})",
                    new)
        return
    except Exception:
        log.exception("archive sightings: batched search index update failed; one at a time")
    for s in sightings:
        try:
            with database.atomic():
                index_sighting(s)
        except Exception:
            log.exception("archive sighting %s: search index update failed", s.id)


IN_CHUNK = 500  # ids per "IN (...)" list


def _select_in(sql: str, ids: list) -> list[tuple]:
    """Rows of ``sql`` + " (ids…)" for every id (in chunks of ``IN_CHUNK``), as tuples: the
    indexer's look-ups by id, as plain SQL (peewee built a node per id — a tenth of the
    drain's Python)."""
    out: list[tuple] = []
    mark = "%s" if is_postgres() else "?"
    for i in range(0, len(ids), IN_CHUNK):
        chunk = ids[i:i + IN_CHUNK]
        out.extend(database.obj.execute_sql(f"{sql} ({', '.join([mark] * len(chunk))})", chunk).fetchall())
    return out


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


# -- background indexing (records written by a node: gateway.archive.service) ------------------

INDEX_BATCH = 200  # records per pass of the background indexer while records keep arriving
DRAIN_BATCH = 600  # records per pass once none arrive (a backlog: one transaction each, see index_batch)
INDEX_CHUNK = 16  # documents per write transaction of the background indexer (see index_batch)


def index_pending(archive: object, limit: int = INDEX_BATCH) -> int:
    """Index up to ``limit`` records that have no document yet, oldest first, and note up to
    4 × ``limit`` sightings written since the last call; returns how many records were indexed."""
    return index_batch(archive, limit)[0]


def index_batch(archive: object, limit: int | None = None, lag: float = 0.0) -> tuple[int, bool]:
    """``index_pending``, also telling whether a batch was full (more work waits).  ``limit``
    None: ``INDEX_BATCH`` records while records keep arriving, ``DRAIN_BATCH`` once none
    came since the previous pass (a backlog drains in fewer, larger transactions: each one
    flushes an FTS5 segment, and each pass has its own queries and hand-offs).

    ``lag`` > 0 (``[archive] index_lag``, the node's background indexer): while records keep
    arriving, wait until the oldest unindexed one is ``lag`` seconds old — the index yields
    to the mail path during a burst and catches up, in large transactions, once it ends (or
    keeps ``lag`` behind under sustained load).  Returns ``(0, False)`` for a pass it skipped.

    Blocking (call in a thread).  The blobs are read and their text extracted outside any
    transaction; the rows go in short write transactions of ``INDEX_CHUNK`` documents while
    records keep arriving (one transaction when none came since the previous pass) that
    re-check which records are still unindexed (an inline indexer may have been faster), so
    nothing is indexed twice.  Watermarks (``archivesearchstate``) make a restart resume where
    it stopped; every archive writer appends under the chain lock, so ids become visible in order and a
    watermark never skips a row committed later.  A record the watermark moves past without a
    document — its blob unreadable, or its document write failed — is listed in
    ``archivesearchunread`` in the same transaction and tried again later (``RETRY_DELAYS``),
    unless its document was refused for its data ``GIVE_UP_AFTER`` times (given up)."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.archive.search_schema import SearchState
    from gateway.db.writerlock import handoff
    from gateway.groupcommit import write_transaction

    state = {s.name: s.value for s in SearchState.select()}
    rec_mark, seen_mark = state.get("records", 0), state.get("sightings", 0)
    # Read first: every record up to ``top`` is committed, so the look-up below sees them all.
    top = max(rec_mark, int(ArchiveRecord.select(fn.MAX(ArchiveRecord.id)).scalar() or 0))
    arriving = _records_arriving(archive, top)
    if limit is None:
        limit = INDEX_BATCH if arriving else DRAIN_BATCH
    if lag > 0 and arriving:  # only the oldest one's age first: during a burst this runs every BURST_POLL
        oldest = _unindexed((ArchiveRecord.created_at,), rec_mark, top).limit(1).tuples().first()
        if oldest is not None and _age(oldest[0]) < lag:
            _waiting(archive, True)
            return 0, False  # a burst: the index waits (see the docstring)
    _waiting(archive, False)
    # Only the columns a document and a blob read need (a full row per record cost more in
    # peewee than the look-up in SQLite); sightings as plain named tuples.
    fields = (ArchiveRecord.id, ArchiveRecord.sha256, ArchiveRecord.blob_path, ArchiveRecord.created_at,
              ArchiveRecord.direction, ArchiveRecord.employee, ArchiveRecord.purged_at)
    recs = list(_unindexed(fields, rec_mark, top).limit(limit).namedtuples())
    tried = _due_for_retry(archive, limit)  # record id -> failed attempts so far, of listed records due again
    retry = list(ArchiveRecord.select(*fields).where(
        ArchiveRecord.id.in_(list(tried)), ArchiveRecord.purged_at.is_null()).namedtuples()) if tried else []
    mark = "%s" if is_postgres() else "?"
    sightings = [_Sighting(*row) for row in database.obj.execute_sql(
        f"SELECT {_SIGHTING_COLUMNS} FROM archivesighting WHERE id > {mark} ORDER BY id LIMIT {mark}",
        (seen_mark, limit * 4)).fetchall()]
    if not recs and not sightings and not tried and top == rec_mark:
        return 0, False
    # record id -> why its blob could not be read or its document written
    failed: dict[int, Failure] = {}
    rows = _read_and_extract(archive, recs + retry, failed)
    if not arriving and len(recs) == limit:  # a backlog drains: the next batch is extracted while this one is written
        _extract_ahead(archive, list(_unindexed(fields, recs[-1].id, top).limit(limit).namedtuples()))
    # A full batch: handled up to its last record; otherwise every record up to ``top``.
    # (A sighting of a record not indexed yet is noted when that record is.)
    new_rec_mark = recs[-1].id if len(recs) == limit else top
    done = 0
    # Short write transactions, a few documents each, taking the writers' hand-off lock: the
    # SMTP group commit waits for this lock before every 250, and one transaction for the
    # whole batch held it 40-220 ms at a time (bench_smtp) while every session waited.  A
    # crash between chunks loses nothing: records without a document stay "unindexed" and
    # the watermarks move only in the last chunk.  But only while records keep coming: each
    # transaction flushes a small FTS5 segment that is merged again later (16 documents a
    # transaction cost the indexer ~0.5 ms more CPU a document than 200), so a backlog left
    # once the mail stopped (no new record since the previous pass) goes in one transaction.
    # PostgreSQL has no database-wide write lock (the group commit never waits for the
    # indexer's transaction): one transaction always, its documents split over two
    # connections (``write_rows``) instead of 16-document COPYs on one.
    size = INDEX_CHUNK if arriving and not is_postgres() else max(1, len(rows))
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)] or [[]]
    noted: set[int] = set()
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        with handoff(), write_transaction():
            ids = [rec.id for rec, _, _ in chunk]
            taken = {r for r, in _select_in("SELECT record_id FROM archivesearchdoc WHERE record_id IN", ids)}
            written: dict[int, tuple[int, int | None, str]] = {}
            # a document that cannot be written is noted in ``failed``: listed with the
            # unreadable records (``_note_unread``, below) and written again on their schedule
            done += _insert_documents([(rec, ex, grams) for rec, ex, grams in chunk if rec.id not in taken],
                                      written, failed)
            # Every sighting of the records just indexed (later ones may have come first) and,
            # with the last chunk, the sightings since the last call — mostly the same rows: each once.
            later = [_Sighting(*row) for row in _select_in(
                f"SELECT {_SIGHTING_COLUMNS} FROM archivesighting WHERE record_id IN", ids)]
            todo = {s.id: s for s in [*later, *(sightings if last else [])] if s.id not in noted}
            index_sightings(list(todo.values()), written)
            noted.update(todo)
            if not last:
                continue
            marks = {"records": new_rec_mark,
                     "sightings": sightings[-1].id if sightings else seen_mark}
            for name, value in marks.items():
                if value != state.get(name):
                    SearchState.insert(name=name, value=value).on_conflict(
                        conflict_target=[SearchState.name], update={SearchState.value: value}).execute()
            _note_unread(archive, tried, failed)
    return done, len(recs) == limit or len(sightings) == limit * 4


class _Sighting(NamedTuple):
    """What the indexer reads of a sighting."""

    id: int
    record_id: int
    employee_id: int | None
    direction: str


_SIGHTING_COLUMNS = "id, record_id, employee_id, direction"

BACKLOG_CAP = 10_000


def backlog() -> int:
    """Records the search cannot find yet: committed without a document, after the indexer's
    watermark (the node's background indexer waits out a burst, ``[archive] index_lag``), and
    those whose blob it could not read or whose document it could not write
    (``archivesearchunread``, tried again later or given up).  Counted
    up to ``BACKLOG_CAP`` (the panel asks on every search page)."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.archive.search_schema import SearchState
    from gateway.archive.unread import UnreadRecord

    mark = SearchState.select(SearchState.value).where(SearchState.name == "records").scalar() or 0
    unread = UnreadRecord.select().limit(BACKLOG_CAP).count()
    return min(BACKLOG_CAP, unread + _unindexed((ArchiveRecord.id,), mark).limit(BACKLOG_CAP).count())


class Retried(NamedTuple):
    """What ``retry_failed`` did: records indexed (or found indexed, or purged meanwhile:
    forgotten), still refused for their data (left given up, with the new reason), and back on
    the indexer's schedule (a passing failure)."""

    indexed: list[int]
    refused: list[tuple[int, str]]
    rescheduled: list[tuple[int, str]]


RETRY_BATCH = 200  # given-up records per transaction of ``retry_failed``


def retry_failed(archive: object, record_ids: Iterable[int] | None = None, *,
                 progress: Callable[[int, int], None] | None = None, batch: int | None = None) -> Retried:
    """The administrator's retry (``mailgate archive reindex --failed``) of the records the
    indexer gave up on (all, or those of ``record_ids``), in record id order, ``RETRY_BATCH``
    at a time: each batch's blobs read and its documents written in one transaction, like a
    pass of ``index_batch`` (their sightings noted with them; a document another writer wrote
    meanwhile is not written twice).  Indexed: its row goes.  Refused for its data again: stays
    given up, with the new reason (one attempt: the software or the data has to change first).
    A passing failure (the database busy, an unreadable blob): back on the indexer's schedule.

    Resumable: each batch commits on its own, and a record's state changes only in its batch's
    commit, so a crash (or ^C) mid-way leaves the records of the unfinished batches given up,
    as they were, for the next run; one run never takes a record twice (it goes on after the
    last id it took).  ``progress(done, total)`` after each batch, ``total`` counted first
    (the records given up when the run began)."""
    from gateway.archive.unread import FAILED, UnreadRecord

    u = UnreadRecord
    size = batch or RETRY_BATCH
    wanted = None if record_ids is None else sorted(set(record_ids))
    where = u.state == FAILED
    if wanted is not None:
        where &= u.record_id.in_(wanted)
    total = u.select().where(where).count()
    result = Retried([], [], [])
    done, after = 0, None
    while True:
        query = u.select(u.record_id, u.attempts, u.data_errors).where(where)
        if after is not None:
            query = query.where(u.record_id > after)
        tried = {r.record_id: _Listed(r.attempts, r.data_errors)
                 for r in query.order_by(u.record_id).limit(size)}
        if not tried:
            return result
        part = _retry_batch(archive, tried)
        result.indexed.extend(part.indexed)
        result.refused.extend(part.refused)
        result.rescheduled.extend(part.rescheduled)
        after = max(tried)
        done += len(tried)
        if progress is not None:
            progress(done, max(total, done))


def _retry_batch(archive: object, tried: dict[int, _Listed]) -> Retried:
    """One transaction of ``retry_failed``: the given-up records ``tried``."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.db.writerlock import handoff
    from gateway.groupcommit import write_transaction

    fields = (ArchiveRecord.id, ArchiveRecord.sha256, ArchiveRecord.blob_path, ArchiveRecord.created_at,
              ArchiveRecord.direction, ArchiveRecord.employee, ArchiveRecord.purged_at)
    recs = list(ArchiveRecord.select(*fields).where(
        ArchiveRecord.id.in_(list(tried)), ArchiveRecord.purged_at.is_null()).namedtuples())
    failed: dict[int, Failure] = {}
    rows = _read_and_extract(archive, recs, failed)
    with handoff(), write_transaction():
        ids = [rec.id for rec, _, _ in rows]
        taken = {r for r, in _select_in("SELECT record_id FROM archivesearchdoc WHERE record_id IN", ids)}
        written: dict[int, tuple[int, int | None, str]] = {}
        _insert_documents([(rec, ex, grams) for rec, ex, grams in rows if rec.id not in taken], written, failed)
        later = [_Sighting(*row) for row in _select_in(
            f"SELECT {_SIGHTING_COLUMNS} FROM archivesighting WHERE record_id IN", list(written))]
        index_sightings(later, written)
        _note_unread(archive, tried, failed, by_hand=True)
    return Retried([rid for rid in tried if rid not in failed],
                   [(rid, f.reason) for rid, f in failed.items() if f.data],
                   [(rid, f.reason) for rid, f in failed.items() if not f.data])


def _unindexed(fields: tuple, after: int, top: int | None = None):  # noqa: ANN202 - a peewee query
    """Records after id ``after`` (up to ``top``), not purged and without a document, oldest first."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.archive.search_schema import SearchDoc

    r = ArchiveRecord
    where = (r.id > after) & r.purged_at.is_null() & ~fn.EXISTS(
        SearchDoc.select(SearchDoc.docid).where(SearchDoc.record_id == r.id))
    if top is not None:
        where &= r.id <= top
    return r.select(*fields).where(where).order_by(r.id)


def _age(created_at: dt.datetime) -> float:
    """Seconds since ``created_at`` (naive UTC, as the records keep it)."""
    return (utcnow() - created_at).total_seconds()


_LAST_TOP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # archive -> newest record id seen
_WAITING: weakref.WeakSet = weakref.WeakSet()  # archives whose last pass waited out a burst


def waiting(archive: object) -> bool:
    """Whether ``index_batch``'s last pass for ``archive`` was skipped to wait out a burst
    (``lag``): the background indexer then looks again sooner, to start the drain as soon as
    the burst ends."""
    try:
        return archive in _WAITING
    except TypeError:
        return False


def _waiting(archive: object, value: bool) -> None:
    try:
        if value:
            _WAITING.add(archive)
        else:
            _WAITING.discard(archive)
    except TypeError:  # not weakly referable: never counts as waiting
        pass


def _records_arriving(archive: object, top: int) -> bool:
    """Whether a record came since this archive's previous indexer pass (or this is the first)."""
    try:
        before = _LAST_TOP.get(archive)
        _LAST_TOP[archive] = top
    except TypeError:  # not weakly referable: assume mail is flowing (short transactions)
        return True
    return before is None or top != before


def index_new(entries: list[tuple[object, Extracted, Grams]]) -> int:
    """Documents for records just committed (``Archive.ingest_many``), skipping any that an
    indexer wrote meanwhile.  Call inside a write transaction; returns how many were written.
    A document that cannot be written is logged and left out, not listed: the background
    indexer moves its watermark past a record only in a pass that found it with a document or
    wrote one itself (or, failing, listed it in ``archivesearchunread``), so the record is
    after the watermark — counted by ``backlog()`` — and the next pass writes it."""
    from gateway.archive.search_schema import SearchDoc

    if not entries:
        return 0
    ids = [int(rec.id) for rec, _, _ in entries]
    taken = {d.record_id for d in SearchDoc.select(SearchDoc.record_id).where(SearchDoc.record_id.in_(ids))}
    return _insert_documents([e for e in entries if int(e[0].id) not in taken])


def _insert_documents(entries: list[tuple[object, Extracted, Grams]],
                      written: dict[int, tuple[int, int | None, str]] | None = None,
                      failed: dict[int, Failure] | None = None) -> int:
    """All documents in one bulk insert (a savepoint) or, if one is bad, one at a time (the
    bad one logged and skipped: its savepoint rolled back, so no part of it stays — no
    ``archivesearchdoc`` row that would pass it for indexed).  ``written``: see
    ``add_documents``.  ``failed`` (the background indexer): filled with record id → ``Failure``
    (why its document could not be written; whether for its data, ``data_error``) of each one
    skipped, for
    ``_note_unread`` to list (``archivesearchunread``) and ``index_batch`` to write again
    later; without it (``index_new``) a skipped record stays without a document after the
    indexer's watermark, and the background indexer writes it."""
    try:
        with database.atomic():
            wrote: dict[int, tuple[int, int | None, str]] = {}
            done = add_documents(entries, wrote)
        if written is not None:
            written.update(wrote)
        return done
    except Exception:
        log.warning("archive: bulk indexing failed, indexing one by one", exc_info=True)
    # a split write (PostgreSQL, ``_write_split``) may have committed one half: those are done
    have = {r for r, in _select_in("SELECT record_id FROM archivesearchdoc WHERE record_id IN",
                                   [int(rec.id) for rec, _, _ in entries])}
    done = 0
    for rec, ex, grams in entries:
        if int(rec.id) in have:
            done += 1
            continue
        try:
            with database.atomic():
                wrote = {}
                add_documents([(rec, ex, grams)], wrote)
            if written is not None:
                written.update(wrote)
            done += 1
        except Exception as exc:
            if failed is None:
                log.exception("archive record %s: full-text indexing failed (left to the background indexer)",
                              rec.id)
            else:
                log.exception("archive record %s: full-text indexing failed (listed, written again later)",
                              rec.id)
                failed[int(rec.id)] = Failure(_write_failure(exc), data=data_error(exc))
    return done


class _Extraction(NamedTuple):
    """Text extraction under way (``workers.Pending``) for the records whose bytes were read."""

    recs: list
    pending: object


_AHEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # archive -> _Extraction of its next batch


def _extract_ahead(archive: object, recs: list) -> None:
    """Start extracting the next batch of a backlog while this one is written (``index_batch``):
    the worker processes and the write transaction overlap instead of waiting for each other.
    Extraction depends on a record's content only (immutable under its hash), so the next
    pass uses these results for the same records and extracts any others itself."""
    try:
        _AHEAD[archive] = _start_extraction(archive, recs)
    except TypeError:  # not weakly referable: no look-ahead
        pass


def _read_and_extract(archive: object, recs: list,
                      failed: dict[int, Failure] | None = None) -> list[tuple[object, Extracted, Grams]]:
    """Text of ``recs``: taken from the extraction the previous pass started ahead where it
    covers them, else started now (``_start_extraction``); unreadable blobs are skipped (and
    noted in ``failed``: a record unreadable ahead is read once more here)."""
    try:
        ahead = _AHEAD.pop(archive, None)
    except TypeError:
        ahead = None
    got: dict[tuple[int, str], tuple[Extracted, Grams]] = {}
    if ahead is not None:
        got.update(zip([(r.id, r.sha256) for r in ahead.recs], ahead.pending.result(), strict=True))
    rest = [rec for rec in recs if (rec.id, rec.sha256) not in got]
    if rest:
        now = _start_extraction(archive, rest, failed)
        got.update(zip([(r.id, r.sha256) for r in now.recs], now.pending.result(), strict=True))
    return [(rec, *got[(rec.id, rec.sha256)]) for rec in recs if (rec.id, rec.sha256) in got]


def _start_extraction(archive: object, recs: list, failed: dict[int, Failure] | None = None) -> _Extraction:
    """Fresh messages from the archive's memory (``take_recent``, here: a dict look-up is
    cheaper than a thread hand-off), the others' blobs read on threads (decryption and zstd
    release the GIL); text extraction started in the worker processes (gateway.archive.workers);
    unreadable blobs are logged, noted in ``failed`` (record id -> (error, permanent: the blob
    missing or altered)) and left out."""
    from gateway.archive import _pool
    from gateway.archive.store import BlobError
    from gateway.archive.workers import extract_async

    take = getattr(archive, "take_recent", None)

    def recent(rec: object) -> bytes | None:
        return take(rec.sha256) if take is not None and getattr(rec, "purged_at", None) is None else None

    def read(rec: object) -> bytes | None:
        try:
            # only what extract reads (attachment bodies cut): less to hold and to send to a worker
            return indexable(archive.read(rec))  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - an unreadable blob (verify reports it) must not stop the indexer
            permanent = isinstance(exc, BlobError | FileNotFoundError)
            log.warning("archive record %s: cannot read the blob to index it (skipped, read again later): %s",
                        rec.id, exc, exc_info=not permanent)
            if failed is not None:
                failed[rec.id] = Failure(f"{type(exc).__name__}: {exc}", permanent)
            return None

    raws = [recent(rec) for rec in recs]
    missing = [i for i, raw in enumerate(raws) if raw is None]
    if missing:
        got = list(_pool().map(read, [recs[i] for i in missing])) if len(missing) > 1 else [read(recs[missing[0]])]
        for i, raw in zip(missing, got, strict=True):
            raws[i] = raw
    readable = [(rec, raw) for rec, raw in zip(recs, raws, strict=True) if raw is not None]
    return _Extraction([rec for rec, _ in readable],
                       extract_async([raw for _, raw in readable], headers=False))  # the records exist
