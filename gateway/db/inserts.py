"""Fast inserts for the write paths that run per message (the SMTP group commit, the
relay's outcomes, the archive chain): the INSERT text built once per model and column set
(``insert_row``), and inside a write transaction the rows of a batch sent as one
statement per table (``buffered_inserts``): SQLite one ``executemany``, PostgreSQL one
multi-row ``INSERT … VALUES`` per table, every table's in one round trip."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from peewee import AutoField, Model, SqliteDatabase

from gateway.db.models import database

_INSERT_SQL: dict[tuple, str] = {}


def _insert_sql(model: type[Model], fields: list, returning: bool) -> str:
    """The INSERT text for ``fields`` of ``model`` on the bound backend, built once."""
    db = database.obj
    key = (model, tuple(f.name for f in fields), type(db), returning)
    sql = _INSERT_SQL.get(key)
    if sql is None:
        meta = model._meta
        q = db.quote  # the identifier quote characters, e.g. '""'

        def ident(name: str) -> str:
            return f"{q[0]}{name}{q[1]}"

        columns = ", ".join(ident(f.column_name) for f in fields)
        params = ", ".join([db.param] * len(fields))
        sql = f"INSERT INTO {ident(meta.table_name)} ({columns}) VALUES ({params})"
        if returning:
            sql += f" RETURNING {ident(meta.primary_key.column_name)}"
        _INSERT_SQL[key] = sql
    return sql


def insert_row(instance: Model) -> Model:
    """``instance.save(force_insert=True)`` for the hot path, without peewee building the
    statement again each time (its SQL generation costs more CPU than SQLite's insert):
    the INSERT text is cached per model, column set and backend.  The same columns and
    values as ``save()`` (the fields set on the instance, defaults included), the new id
    set on the instance.  Plain models only (no ``save()`` overrides, no signals).
    Inside ``buffered_inserts()`` the row waits for the block's end (its id is set at once,
    on both backends)."""
    model = type(instance)
    meta = model._meta
    data = instance.__data__
    pk = meta.primary_key
    buffer = getattr(_buffer, "rows", None)
    if buffer is not None and not isinstance(pk, AutoField):  # only integer ids can be counted here
        flush_inserts()  # keep the order of inserts
        buffer = None
    if buffer is not None:
        if data.get(pk.name) is None:
            setattr(instance, pk.name, _next_id(model))
        fields = [f for f in meta.sorted_fields if f.name in data]
        by_columns = buffer.setdefault(model, {})
        by_columns.setdefault(tuple(f.name for f in fields), (fields, []))[1].append(
            [f.db_value(data[f.name]) for f in fields])
        instance._dirty.clear()
        return instance
    fields = [f for f in meta.sorted_fields if f.name in data and not (f is pk and data[f.name] is None)]
    returning = not isinstance(database.obj, SqliteDatabase) and pk.name not in data
    cursor = database.execute_sql(_insert_sql(model, fields, returning), [f.db_value(data[f.name]) for f in fields])
    if data.get(pk.name) is None:
        setattr(instance, pk.name, cursor.fetchone()[0] if returning else cursor.lastrowid)
    instance._dirty.clear()
    return instance


_buffer = threading.local()


@contextmanager
def buffered_inserts(models: tuple[type[Model], ...] = ()) -> Iterator[None]:
    """Inside a write transaction (on SQLite: whose write lock is held already): the rows that
    ``insert_row`` adds in the block go to the database when it ends, one statement per
    table and column set, a table's rows in the order they were added and every table after
    the tables its foreign keys point at (``_parents_first``).  The ids are assigned when
    the row is added: on SQLite counting on from the table's largest id as SQLite itself
    would (nobody else can insert while we hold the write lock); on PostgreSQL drawn from
    the table's sequence a block at a time (ids another writer draws meanwhile are its own;
    the ids of a block left unused are gaps, as a rolled-back insert leaves).  Every
    statement is a moment a thread gives up the GIL — under load it waits milliseconds to
    get it back, holding the write lock all along — and on PostgreSQL a round trip the
    server parses and plans: a batch's twenty inserts become three.  Reads inside the block
    do not see the waiting rows: call ``flush_inserts()`` before one that must.  Nested
    blocks: the outer one holds the rows.

    ``models``: the tables the block will probably insert into; on SQLite the first id
    needed reads the largest id of each of them in one statement instead of one each."""
    if getattr(_buffer, "rows", None) is not None:
        yield
        return
    _buffer.rows, _buffer.ids, _buffer.models = {}, {}, models
    try:
        yield
        flush_inserts()
        if not isinstance(database.obj, SqliteDatabase):
            _remember_use(_buffer.ids)
    finally:
        _buffer.rows = _buffer.ids = _buffer.models = None


def flush_inserts() -> None:
    """The rows ``buffered_inserts`` holds, inserted now (nothing outside such a block)."""
    rows = getattr(_buffer, "rows", None)
    if not rows:
        return
    pending = _parents_first(rows)
    rows.clear()
    if not isinstance(database.obj, SqliteDatabase):
        _flush_postgres(pending)
        return
    for model, by_columns in pending:
        for fields, params in by_columns.values():
            database.obj.cursor().executemany(_insert_sql(model, fields, False), params)


def _flush_postgres(pending: list[tuple[type[Model], dict]]) -> None:
    """Every table's rows as multi-row ``INSERT … VALUES`` statements (``PG_PAGE`` rows each),
    all sent in one round trip: each round trip of the group commit's writer is a wait for
    the server and then for the GIL, while it holds the chain lock (bench_archive: ~3 ms a
    statement under load against ~0.2 of server work)."""
    cur = database.obj.cursor()
    statements: list[bytes] = []
    for model, by_columns in pending:
        for fields, params in by_columns.values():
            head = _values_sql(model, fields)[:-2].encode()  # "... VALUES "
            row = ("(" + ", ".join(["%s"] * len(fields)) + ")").encode()
            for start in range(0, len(params), PG_PAGE):
                statements.append(head + b", ".join(cur.mogrify(row, p) for p in params[start:start + PG_PAGE]))
    cur.execute(b";\n".join(statements))


def _parents_first(rows: dict[type[Model], dict]) -> list[tuple[type[Model], dict]]:
    """The buffered tables in the order they first appeared, except that a table whose
    foreign key points at another buffered table comes after it: a batch whose first
    archive capture is a re-sighting (a sighting of a record stored earlier) still inserts
    its new records before their sightings."""
    ordered: list[type[Model]] = []
    placed: set[type[Model]] = set()

    def place(model: type[Model]) -> None:
        placed.add(model)  # before the parents: a cycle of foreign keys ends here
        for parent in model._meta.refs.values():
            if parent in rows and parent not in placed:
                place(parent)
        ordered.append(model)

    for model in rows:
        if model not in placed:
            place(model)
    return [(model, rows[model]) for model in ordered]


def _next_id(model: type[Model]) -> int:
    if not isinstance(database.obj, SqliteDatabase):
        return _drawn_id(model)
    ids = _buffer.ids
    last = ids.get(model)
    if last is None:
        wanted = (model, *(m for m in _buffer.models if m is not model and m not in ids))
        ids.update(zip(wanted, _largest_ids(wanted), strict=True))
        last = ids[model]
    ids[model] = last + 1
    return last + 1


_MAX_SQL: dict[tuple, str] = {}


def _largest_ids(models: tuple[type[Model], ...]) -> tuple[int, ...]:
    """The largest id of each table (0 for an empty one), in one statement."""
    key = (type(database.obj), models)
    sql = _MAX_SQL.get(key)
    if sql is None:
        q = database.obj.quote

        def largest(model: type[Model]) -> str:
            meta = model._meta
            return (f"(SELECT max({q[0]}{meta.primary_key.column_name}{q[1]})"
                    f" FROM {q[0]}{meta.table_name}{q[1]})")

        sql = _MAX_SQL[key] = "SELECT " + ", ".join(largest(m) for m in models)
    return tuple(last or 0 for last in database.execute_sql(sql).fetchone())


# PostgreSQL: rows a multi-row INSERT carries (a larger batch goes as several statements).
PG_PAGE = 500
# PostgreSQL: ids drawn from a sequence at a time.  A block's first draw of a table is 1.5 × what
# this thread's previous block used of it (a group commit's batches are much alike), at
# least PG_ID_BLOCK; when a block runs out it draws again, twice as many as before, up to
# PG_ID_BLOCK_MAX.  ``prefetch_ids`` draws them for every such table in one statement.
PG_ID_BLOCK = 8
PG_ID_BLOCK_MAX = 256
_SEQ: dict[tuple, str] = {}  # (backend, model) -> its id sequence's name as an SQL literal
_used = threading.local()  # .last: {model: ids this thread's previous block of that table used}


def _first_size(model: type[Model]) -> int:
    """Half as many again as the previous block used: batches vary, and a second draw costs a
    round trip where a few unused ids cost nothing (gaps in a bigint sequence)."""
    last = getattr(_used, "last", None) or {}
    used = last.get(model, 0)
    return min(PG_ID_BLOCK_MAX, max(PG_ID_BLOCK, used + (used + 1) // 2))


def _drawn_id(model: type[Model]) -> int:
    """The next id for a buffered row of ``model`` on PostgreSQL, from the block of its
    sequence's values this block drew (a new block when it is used up)."""
    ids = _buffer.ids
    block = ids.get(model)
    if not block:
        size = ids.get((model, "size"))
        size = _first_size(model) if size is None else min(PG_ID_BLOCK_MAX, size * 2)
        ids[(model, "size")] = size
        block = ids[model] = _draw_ids(model, size)
    ids[(model, "used")] = ids.get((model, "used"), 0) + 1
    return block.pop()


def prefetch_ids() -> None:
    """PostgreSQL, inside ``buffered_inserts``: draw now, in one statement, the first block of
    every table this thread's previous block inserted into (and this one has not drawn for
    yet) — instead of a round trip per table when each first needs an id.  Only for a caller
    for whom now is as good a moment as the first insert: the archive chain calls it once it
    holds the chain lock, under which record and sighting ids must be drawn (the indexer's
    watermarks rely on ids becoming visible in order)."""
    ids = getattr(_buffer, "ids", None)
    last = getattr(_used, "last", None)
    if ids is None or not last or isinstance(database.obj, SqliteDatabase):
        return
    wanted = [(m, _first_size(m)) for m in last if (m, "size") not in ids]
    if not wanted:
        return
    parts = [f"(SELECT array_agg(nextval('{_sequence(m)}'::regclass)) FROM generate_series(1, {n}))"
             for m, n in wanted]
    row = database.execute_sql("SELECT " + ", ".join(parts)).fetchone()
    for (model, size), drawn in zip(wanted, row, strict=True):
        ids[(model, "size")] = size
        ids[model] = sorted(drawn, reverse=True)


def _remember_use(ids: dict) -> None:
    """At a block's end: how many ids of each table it used (the next block's first draw)."""
    _used.last = {key[0]: used for key, used in ids.items() if isinstance(key, tuple) and key[1] == "used"}


def _sequence(model: type[Model]) -> str:
    """The name of ``model``'s id sequence as an SQL string literal's content, looked up once
    (``pg_get_serial_sequence`` inside the drawing statement ran once a row: ~4 µs of server
    CPU an id)."""
    key = (type(database.obj), model)
    name = _SEQ.get(key)
    if name is None:
        meta = model._meta
        found = database.execute_sql("SELECT pg_get_serial_sequence(%s, %s)",
                                     (f'"{meta.table_name}"', meta.primary_key.column_name)).fetchone()[0]
        name = _SEQ[key] = found.replace("'", "''")
    return name


def _draw_ids(model: type[Model], n: int) -> list[int]:
    """``n`` values of ``model``'s id sequence, the smallest last (``pop`` takes them in order)."""
    sql = f"SELECT nextval('{_sequence(model)}'::regclass) FROM generate_series(1, %s)"
    return sorted((row[0] for row in database.execute_sql(sql, (n,)).fetchall()), reverse=True)


_VALUES_SQL: dict[tuple, str] = {}


def _values_sql(model: type[Model], fields: list) -> str:
    """``INSERT INTO t (columns) VALUES %s`` (the rows follow: ``_flush_postgres``), built once."""
    key = (model, tuple(f.name for f in fields))
    sql = _VALUES_SQL.get(key)
    if sql is None:
        sql = _insert_sql(model, fields, False)
        sql = _VALUES_SQL[key] = sql[:sql.rindex(" VALUES (")] + " VALUES %s"
    return sql
