"""Tables of the archive's full-text index (migrations 150-199).

Both backends:
  archivesearchdoc   one row per indexed record: docid (time ordered, see index.docid_for),
                     record_id, created_at, direction (in|out), employee_id, has_attachment
  archivesearchaddr  (docid, role from|to, address, domain) for customer: and correspondence
  archivesearchseen  (docid, employee_id, direction): every distinct employee/direction the
                     message was seen with (first sighting from index_record, later ones from
                     index_sighting) — employee:, direction: and the user scope use it

SQLite:
  archivefts         FTS5, trigram tokenizer: subject, sender, rcpt, body, attnames
                     (rowid = docid; substring search, case-insensitive, any script;
                     8 MB of pending terms before a segment is written, migration 160)
  archivegrams       FTS5, unicode61 tokenizer, contentless, detail=none: the short-gram tokens
                     (CJK characters and pairs, 1-2 letter words) for terms under 3 characters;
                     deleting recomputes the tokens from archivefts (they derive from its text)
PostgreSQL:
  archivesearchtext  docid, subject, sender, rcpt, attnames, doc (all fields + body) with a
                     pg_trgm GIN index, grams text[] (the short-gram tokens) with a GIN index,
                     tsv = to_tsvector('simple', doc) (a generated column, migration 152) with
                     a GIN index: Latin words with their positions, for words and phrases;
                     pairs = archive_word_pairs(doc) (generated, migration 153) with a GIN
                     index: every adjacent pair of ASCII words, so a rare phrase of common
                     words finds its few candidates without rechecking every document that
                     has both words.
                     pg_trgm only indexes CJK when the database's LC_CTYPE is a UTF-8 locale;
                     under LC_CTYPE=C a CJK term is still answered correctly (its grams narrow
                     the candidates, ILIKE checks them) — see README.
"""

from __future__ import annotations

from peewee import BigIntegerField, BooleanField, CharField, Database, DateTimeField, IntegerField

from gateway.db.migrations import migration
from gateway.db.models import BaseModel


class SearchDoc(BaseModel):
    docid = BigIntegerField(primary_key=True)
    record_id = BigIntegerField(unique=True)
    created_at = DateTimeField()
    direction = CharField(max_length=10, default="")
    employee_id = IntegerField(null=True)
    has_attachment = BooleanField(default=False)

    class Meta:
        table_name = "archivesearchdoc"
        indexes = ((("employee_id", "docid"), False), (("direction", "docid"), False))


class SearchAddress(BaseModel):
    docid = BigIntegerField()
    role = CharField(max_length=4)
    address = CharField(max_length=320)
    domain = CharField(max_length=253)

    class Meta:
        table_name = "archivesearchaddr"
        primary_key = False
        indexes = ((("docid", "role", "address"), False), (("address", "docid"), False),
                   (("domain", "docid"), False))


class SearchSeen(BaseModel):
    docid = BigIntegerField()
    employee_id = IntegerField(null=True)
    direction = CharField(max_length=10, default="")

    class Meta:
        table_name = "archivesearchseen"
        primary_key = False
        indexes = ((("docid", "employee_id", "direction"), True), (("employee_id", "docid"), False))


@migration(150)
def search_index(db: Database) -> None:
    """The full-text index of the archive (issue 6)."""
    from peewee import PostgresqlDatabase

    db.create_tables([SearchDoc, SearchAddress, SearchSeen], safe=True)
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        db.execute_sql(
            "CREATE TABLE IF NOT EXISTS archivesearchtext (docid BIGINT PRIMARY KEY, subject TEXT NOT NULL,"
            " sender TEXT NOT NULL, rcpt TEXT NOT NULL, attnames TEXT NOT NULL, doc TEXT NOT NULL,"
            " grams TEXT[] NOT NULL)")
        db.execute_sql("CREATE INDEX IF NOT EXISTS archivesearchtext_doc_trgm ON archivesearchtext"
                       " USING gin (doc gin_trgm_ops)")
        db.execute_sql("CREATE INDEX IF NOT EXISTS archivesearchtext_grams ON archivesearchtext USING gin (grams)")
    else:
        db.execute_sql("CREATE VIRTUAL TABLE IF NOT EXISTS archivefts USING fts5("
                       "subject, sender, rcpt, body, attnames, tokenize='trigram')")
        db.execute_sql("CREATE VIRTUAL TABLE IF NOT EXISTS archivegrams USING fts5("
                       "grams, tokenize='unicode61 remove_diacritics 0', detail='none', content='')")


class SearchState(BaseModel):
    """Durable watermarks of the background indexer (gateway.archive.index.index_pending):
    ``records`` / ``sightings`` = the highest id it has handled."""

    name = CharField(max_length=40, primary_key=True)
    value = BigIntegerField(default=0)

    class Meta:
        table_name = "archivesearchstate"


@migration(151)
def search_index_state(db: Database) -> None:
    """Watermarks for indexing off the mail path (records/sightings written by a node are indexed later)."""
    db.create_tables([SearchState], safe=True)


@migration(152)
def search_words(db: Database) -> None:
    """PostgreSQL: a word index with positions next to the trigram index.  A phrase of common
    words ("price list") made the trigram index recheck most documents (≈ 1 s at 100k);
    ``tsv @@ 'price:* <-> list:*'`` answers it from the words and their positions.

    Existing databases: adding the generated column computes it for every row (the
    backfill, one table rewrite under an exclusive lock — minutes at a million documents).
    SQLite: nothing (FTS5 answers phrases from its own positions)."""
    from peewee import PostgresqlDatabase

    if not isinstance(db, PostgresqlDatabase):
        return
    db.execute_sql("ALTER TABLE archivesearchtext ADD COLUMN IF NOT EXISTS tsv tsvector"
                   " GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, doc)) STORED")
    db.execute_sql("CREATE INDEX IF NOT EXISTS archivesearchtext_tsv ON archivesearchtext USING gin (tsv)")
    db.execute_sql("ANALYZE archivesearchtext")


@migration(153)
def search_word_pairs(db: Database) -> None:
    """PostgreSQL: the adjacent ASCII word pairs of every document, GIN-indexed.  A phrase of
    common words that is itself rare ("sample payment invoice") had the word index return
    every document with all three words, each rechecked for positions (≈ 1.5 s at 130k,
    growing with the archive).  The pairs are split more finely than the text-search parser
    splits (any non-alphanumeric character separates), so every document the phrase's
    ``tsv`` match accepts has its pairs: the pairs only narrow, ``tsv`` decides.

    Existing databases: the generated column is computed for every row by the ALTER (the
    backfill; a table rewrite under an exclusive lock)."""
    from peewee import PostgresqlDatabase

    if not isinstance(db, PostgresqlDatabase):
        return
    db.execute_sql("""
        CREATE OR REPLACE FUNCTION archive_word_pairs(doc text) RETURNS text[]
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
          SELECT coalesce(array_agg(DISTINCT p), '{}') FROM (
            SELECT w || ' ' || lead(w) OVER (ORDER BY i) AS p
            FROM unnest(regexp_split_to_array(lower(doc), '[^a-z0-9]+')) WITH ORDINALITY AS t(w, i)
          ) x WHERE p IS NOT NULL AND left(p, 1) <> ' ' AND right(p, 1) <> ' '
        $$""")
    db.execute_sql("ALTER TABLE archivesearchtext ADD COLUMN IF NOT EXISTS pairs text[]"
                   " GENERATED ALWAYS AS (archive_word_pairs(doc)) STORED")
    db.execute_sql("CREATE INDEX IF NOT EXISTS archivesearchtext_pairs ON archivesearchtext USING gin (pairs)")
    db.execute_sql("ANALYZE archivesearchtext")


FTS_HASHSIZE = 8 * 1024 * 1024  # bytes of pending terms an FTS5 table gathers before it writes a segment


@migration(160)
def search_fts_hashsize(db: Database) -> None:
    """SQLite: the trigram table gathers up to ``FTS_HASHSIZE`` of pending terms in memory (FTS5's
    default: 1 MB) before it writes them out as a segment.  A drain of the background indexer
    writes 600 documents in one transaction — ≈ 5-10 MB of trigram entries — which at 1 MB went
    out as several small segments, each merged again into larger ones within the same
    transaction; now as one or two.  Inserting a bench document into ``archivefts`` cost
    0.33-0.40 ms, now 0.21-0.24 (whole transactions of 600, commit included: 0.48-0.57 ->
    0.42-0.47 ms a document).  A persistent setting of the table (its ``_config``), read by every
    connection; memory only while a transaction writes.  PostgreSQL: nothing."""
    from peewee import PostgresqlDatabase

    if isinstance(db, PostgresqlDatabase):
        return
    db.execute_sql(f"INSERT INTO archivefts(archivefts, rank) VALUES('hashsize', {FTS_HASHSIZE})")
