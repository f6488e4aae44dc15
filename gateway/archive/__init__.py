"""The compliance archive: one encrypted blob and one record per distinct message, a
sighting for every place it was seen, all hash-chained (see README.md in this folder).

``Archive.record(raw, direction=, verdict=, …, place=)`` stores the blob durably, then —
inside the caller's transaction (the SMTP group commit) or its own — chains the record
(when the content is new) and the sighting.  ``Archive.read(record)`` returns the
original bytes.  Blocking: call from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.header
import email.message
import email.parser
import email.policy
import email.quoprimime
import email.utils
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.archive import chain
from gateway.archive import original as original_mod
from gateway.archive import pipeline as pipeline_mod
from gateway.archive.headertext import getaddresses
from gateway.archive.original import OriginalCopy
from gateway.archive.pipeline import IndexWriter
from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.archive.store import BlobError, BlobStore, PreparedBlob
from gateway.areas import optional_module
from gateway.db.inserts import buffered_inserts, flush_inserts
from gateway.db.models import Employee, database, utcnow
from gateway.groupcommit import write_transaction
from gateway.mimeparts import SURROGATE
from gateway.spool import fsync_dir

log = logging.getLogger("mailgate.archive")

__all__ = ["Archive", "ArchiveError", "BlobError", "Capture", "OriginalCopy", "PreparedBlob", "headers_of"]


class ArchiveError(Exception):
    """The archive is not usable (no key file configured, unreadable blob …)."""


@dataclass
class Capture:
    """One message to ingest with where it was seen (for ``Archive.ingest_many``)."""

    raw: bytes
    place: str
    direction: str = "inbound"
    verdict: str = "seen"
    ref: str = ""
    employee_id: int | None = None
    employee_email: str | None = None  # None: looked up from employee_id
    mail_from: str = ""
    recipients: list[str] = field(default_factory=list)
    subject: str | None = None
    message_id: str | None = None
    reason: str = ""
    trace: list[dict] | None = None
    queue_id: str = ""
    seen_at: dt.datetime | None = None
    original: OriginalCopy | None = None  # the submitted bytes, when the gateway changed them
    headers: dict[str, Any] | None = None  # headers_of(raw) when already parsed (ingest_many: the extraction's)
    staged: Staged | None = None  # the rows' values made ahead (Archive.stage), outside the transaction


@dataclass
class Staged:
    """What ``Archive.stage`` works out before the transaction: the trace and recipients as
    stored, and the record a new content hash gets (its digest computed; seq, links and id
    come in the transaction)."""

    trace: str
    recipients: str
    record: ArchiveRecord


@dataclass
class Outcome:
    record: ArchiveRecord  # from chain_batch, of a record archived before: its id and sha256 only
    new_record: bool
    new_sighting: bool
    sighting: ArchiveSighting | None = None


@dataclass
class _Batch:
    """State shared by the messages of one ``ingest_many`` call."""

    now: dt.datetime
    emails: dict[int | None, str] = field(default_factory=dict)
    contacts: list[tuple[str, dt.datetime]] = field(default_factory=list)


class Archive:
    def __init__(self, directory: Path, key_file: Path | None = None, *, level: int = 3, defer_index: bool = False,
                 keep_recent: bool | None = None):
        """``key_file`` None: not usable until ``configure`` (gateway.archive.service does it).
        ``defer_index``: new records and sightings are not full-text indexed in their
        transaction; a background indexer does it (``indexer.index_pending``, run by
        gateway.archive.service inside a node) — the node sets it, everything else indexes inline.
        ``keep_recent`` (None: as ``defer_index``): keep what ``prepare`` saw for a background
        indexer in this process (``take_recent``); an acceptor process, whose records the
        node indexes, keeps nothing."""
        self.defer_index = defer_index
        self.keep_recent = defer_index if keep_recent is None else keep_recent
        # The SMTP path's blob files are fsynced later, in bulk, by the node's BlobSyncer
        # (gateway/archive/pending.py); set by the node when it runs one (and in its acceptors).
        self.sync_later = False
        # Deferred indexing: the indexable bytes of messages just prepared (attachment bodies
        # cut, ``index.indexable``), by content hash, so the background indexer need not
        # read, decrypt and decompress their blobs again.
        # Bounded (RECENT_BYTES, oldest dropped first); each entry is used once.
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_size = 0
        self._recent_lock = threading.Lock()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._store: BlobStore | None = None
        self._index_writer = IndexWriter()  # ingest_many(pipeline=True)'s step 4, one batch at a time
        if key_file is not None:
            self._store = BlobStore(self.directory, key_file, level)

    @classmethod
    def from_config(cls, cfg: Any) -> Archive:
        """From a gateway.config.Config."""
        return cls(cfg.archive_dir, cfg.archive.key_file, level=cfg.archive.compression_level)

    def configure(self, cfg: Any) -> None:
        if self._store is None:
            self._store = BlobStore(self.directory, cfg.archive.key_file, cfg.archive.compression_level)

    @property
    def store(self) -> BlobStore:
        if self._store is None:
            raise ArchiveError("archive key file not configured (Archive.from_config)")
        return self._store

    # -- legacy helpers ----------------------------------------------------------

    def blob_path(self, record_or_sha: ArchiveRecord | str) -> Path:
        if isinstance(record_or_sha, ArchiveRecord):
            return self.store.path_of(record_or_sha.blob_path)
        return self.store.path_of(self.store.name_for(record_or_sha))

    # -- write ---------------------------------------------------------------------

    def store_blob(self, raw: bytes) -> str:
        """Write the blob now (e.g. SMTP phase 1, in parallel); ``record`` later finds the file
        and only hashes.  Returns the content hash."""
        blob = self.store.prepare(raw)
        self.store.write(blob)
        return blob.sha256

    def prepare(self, raw: bytes) -> PreparedBlob:
        """CPU part of archiving (hash, compress, encrypt): may run before ``record``,
        in any thread, to keep it out of a commit's critical section."""
        blob = self.store.prepare(raw)
        if self.keep_recent and blob.data is not None:
            self._remember(blob.sha256, raw)
        return blob

    def _remember(self, sha256: str, raw: bytes) -> None:
        index = optional_module("gateway.archive.index")
        if index is None:
            return
        raw = index.indexable(raw)  # what extraction reads: ~1/20 of the bytes of mail with attachments
        if len(raw) > RECENT_MAX_MESSAGE:
            return
        with self._recent_lock:
            if sha256 in self._recent:
                return
            self._recent[sha256] = raw
            self._recent_size += len(raw)
            while self._recent_size > RECENT_BYTES:
                _, old = self._recent.popitem(last=False)
                self._recent_size -= len(old)

    def take_recent(self, sha256: str) -> bytes | None:
        """The indexable bytes (``index.indexable``: ``extraction.extract`` reads the same text from
        them as from the whole message) of a message this archive prepared lately, for the
        background indexer; or None.  An entry is handed out once."""
        with self._recent_lock:
            raw = self._recent.pop(sha256, None)
            if raw is not None:
                self._recent_size -= len(raw)
            return raw

    def record(
        self,
        raw: bytes,
        *,
        direction: str,
        verdict: str,
        mail_from: str = "",
        recipients: list[str] | None = None,
        subject: str | None = "",
        message_id: str | None = "",
        employee_id: int | None = None,
        reason: str = "",
        trace: list[dict] | None = None,
        queue_id: str = "",
        place: str = "smtp:submitted",
        ref: str = "",
        seen_at: dt.datetime | None = None,
        employee_email: str | None = None,
        prepared: PreparedBlob | None = None,
        defer_index: bool | None = None,
        original: OriginalCopy | None = None,
    ) -> ArchiveRecord:
        """Archive one sighting of ``raw``; returns its (possibly existing) record.
        ``subject``/``message_id`` None: taken from the message's header.
        ``defer_index`` None: this archive's ``defer_index``.  ``original``: the client's
        bytes as submitted when ``raw`` is what the gateway made of them (``original_copy``),
        kept with a new record."""
        cap = Capture(raw=raw, place=place, direction=direction, verdict=verdict, ref=ref, employee_id=employee_id,
                      employee_email=employee_email,
                      mail_from=mail_from, recipients=list(recipients or []), subject=subject,
                      message_id=message_id, reason=reason, trace=trace, queue_id=queue_id, seen_at=seen_at,
                      original=original)
        blob = prepared or self.prepare(raw)
        self.store.write(blob)
        with write_transaction():
            return self._chain(cap, blob, defer=defer_index).record

    def ingest_many(self, captures: list[Capture], prepared: list[PreparedBlob] | None = None, *,
                    defer_index: bool | None = None, pipeline: bool = False) -> list[Outcome]:
        """Batch ingest (import, sync, bench), in four steps:

        1. the search index's text extraction starts in worker processes (``workers``);
        2. hash, zstd and AES-GCM on one thread per core (they release the GIL), each blob
           file written and fsynced on the I/O threads as soon as it is sealed (fsyncs in
           flight together share journal commits, and their waits overlap the sealing), their
           folders fsynced once — all before any row names a blob (``_durable_blobs``);
        3. every record and sighting in one transaction, the chain head written once;
        4. after that commit, the new records' index documents in one bulk insert (a second,
           short transaction).  A crash between 3 and 4 leaves records without a document:
           the background indexer (``indexer.index_pending``, inside ``mailgate run``) indexes
           every record that has none.

        ``defer_index`` (None: this archive's ``defer_index``) skips step 4 and 1.

        ``pipeline`` (on PostgreSQL; on SQLite it measured no gain and step 4 stays here, see
        ``pipeline.worthwhile``): step 4 goes to this archive's index-writer thread
        (gateway/archive/pipeline.py) and the call returns after step 3 — the caller's next batch (steps 1-3)
        overlaps this one's index write, which the next pipelined call waits for before it
        hands over its own (one in flight).  The caller calls ``wait_indexed`` once it is
        done (before it reports its messages as archived).  Inside a transaction of the
        caller's, step 4 runs here, in it, as without ``pipeline``.  Without ``pipeline``, step 4
        first waits for a pipelined write in flight: a batch is never indexed before an
        earlier one."""
        if not captures:
            return []
        inline_index = not (self.defer_index if defer_index is None else defer_index)
        extraction = None
        if inline_index and optional_module("gateway.archive.index") is not None:
            from gateway.archive.workers import extract_async

            extraction = extract_async([c.raw for c in captures])
        blobs = self._durable_blobs(captures, prepared)
        extracted = extraction.result() if extraction is not None else None
        if extracted is not None:  # the extraction parsed the headers already: no second parse
            for cap, (ex, _) in zip(captures, extracted, strict=True):
                if cap.headers is None:
                    cap.headers = getattr(ex, "headers", None)
        outcomes = self.chain_batch(captures, blobs)
        if extracted is None:
            return outcomes
        if not database.in_transaction():
            if pipeline and pipeline_mod.worthwhile():
                self._index_writer.hand_over(lambda: self.index_committed(outcomes, extracted))
                return outcomes
            self.wait_indexed()  # (not inside a transaction: on SQLite it holds the lock that write needs)
        self.index_committed(outcomes, extracted)
        return outcomes

    def wait_indexed(self) -> None:
        """Until the index write of the last pipelined ``ingest_many`` batch is over (at once
        if there is none).  Raises nothing: a failed write was logged, and the background
        indexer (``indexer.index_pending``) indexes the records it left without documents."""
        self._index_writer.wait()

    def _durable_blobs(self, captures: list[Capture], prepared: list[PreparedBlob] | None) -> list[PreparedBlob]:
        """Step 2 of ``ingest_many``: every capture's blob prepared (unless ``prepared``) on the
        CPU threads (one per core), each file written and fsynced on the I/O threads as soon as
        its blob is sealed — the fsyncs' waits overlap the sealing of the next blobs instead of
        following all of them — then their folders fsynced once.  Returns when every file is
        durable; raises (after the writes under way ended) if a blob could not be prepared or
        written."""
        prepared = prepared or None
        io = _io_pool()
        sealing = [] if prepared is not None else [_pool().submit(self.prepare, c.raw) for c in captures]
        blobs: list[PreparedBlob] = []
        writing: list[Future] = []
        try:
            for item in prepared if prepared is not None else sealing:
                blob = item if isinstance(item, PreparedBlob) else item.result()
                blobs.append(blob)
                writing.append(io.submit(self.store.write, blob, False))
        finally:
            for fut in sealing:
                fut.cancel()
            wait(writing)
        dirs = {fut.result() for fut in writing} - {None}
        list(io.map(fsync_dir, dirs))
        return blobs

    def chain_batch(self, captures: list[Capture], blobs: list[PreparedBlob]) -> list[Outcome]:
        """Step 3 of ``ingest_many``: every record and sighting of a batch in one transaction
        (the chain head written once, records deduplicated by content hash, inbound senders'
        last contact updated once).  The blobs must already be durable; the index is not
        touched (``index_committed`` or the background indexer does it)."""
        batch = _Batch(now=utcnow())
        wanted = {c.employee_id for c in captures if c.employee_email is None}
        # Inside a transaction already (the group commit's batch form, the relay's outcomes): no
        # savepoint of our own — the caller's savepoint rolls back the whole batch anyway.
        with (write_transaction() if not database.in_transaction() else nullcontext()), chain.batch(), \
                buffered_inserts((ArchiveRecord, ArchiveSighting)):
            # The chain's lock before any read (see _chain) and before buffered_inserts counts ids.
            chain.lock()
            if wanted:
                batch.emails.update(_emails_of(wanted))
            # Of a record archived before, a sighting needs only its id (and a re-sighting test
            # by id): two columns, not the whole row turned into a model (~6 % of the relay's CPU).
            known = {r.sha256: r for r in _records_by_sha(sorted({b.sha256 for b in blobs}), "id, sha256")}
            outcomes = [self._chain(c, b, known, defer=True, batch=batch)
                        for c, b in zip(captures, blobs, strict=True)]
            _record_contacts(batch.contacts)
        return outcomes

    @staticmethod
    def index_committed(outcomes: list[Outcome], extracted: list[tuple[Any, list[str]]]) -> None:
        """Step 4 of ``ingest_many``: documents of the new records (``extracted``: one
        ``(Extracted, short grams)`` per outcome, as ``workers.extract_async`` answers), later
        sightings noted; a failure is logged (the background indexer retries)."""
        index = optional_module("gateway.archive.index")
        if index is None or not hasattr(index, "index_new"):
            return
        entries = [(o.record, ex, grams) for o, (ex, grams) in zip(outcomes, extracted, strict=True) if o.new_record]
        try:
            with write_transaction():
                index.index_new(entries)
                index.index_sightings([o.sighting for o in outcomes if o.sighting is not None and not o.new_record])
        except Exception:
            log.exception("archive batch: full-text indexing failed (records kept; the indexer retries)")

    def _chain(self, cap: Capture, blob: PreparedBlob, known: dict[str, ArchiveRecord] | None = None,
               defer: bool | None = None, batch: _Batch | None = None) -> Outcome:
        """``known``: records by content hash already looked up (batch ingest; kept up to date).
        ``defer``: leave the search index to the background indexer (None: ``self.defer_index``).
        ``batch``: a batch ingest's shared state (one clock reading, employee addresses looked
        up once, inbound senders collected for one contact update)."""
        inline_index = not (self.defer_index if defer is None else defer)
        # The chain lock (a write) comes before any read of this transaction: a SQLite
        # transaction that read first cannot always become a writer ("database is locked").
        chain.lock()
        if cap.employee_email is None:
            if batch is None:
                cap.employee_email = _email_of(cap.employee_id)
            else:
                if cap.employee_id not in batch.emails:
                    batch.emails[cap.employee_id] = _email_of(cap.employee_id)
                cap.employee_email = batch.emails[cap.employee_id]
        if cap.seen_at is None and batch is not None:
            cap.seen_at = batch.now
        if blob.data is None and not os.path.exists(self.store.path_str(blob.name)):
            # The file was there when prepared, but a retention purge removed it since.
            self.store.write(self.store.prepare(cap.raw, blob.sha256))
        if known is None:
            rec = _record_by_sha(blob.sha256)
        else:
            rec = known.get(blob.sha256)
        new_record = rec is None
        staged = cap.staged
        if staged is not None and (staged.record.sha256 != blob.sha256 or staged.record.id is not None):
            # Staged for other bytes, or its record was inserted once already (a batch that
            # rolled back and is run again job by job): made afresh.
            staged = None
        trace, cap_recipients = (staged.trace, staged.recipients) if staged is not None else _texts(cap)
        if rec is None:
            record = staged.record if staged is not None else _new_record(cap, blob, trace, cap_recipients)
            rec = chain.append_record(record, digest=record.digest)
            if known is not None:
                known[blob.sha256] = rec
            if inline_index:
                self._index(rec, cap.raw)
            if cap.direction == "inbound" and rec.mail_from:
                if batch is None:
                    _record_contact(rec.mail_from, rec.created_at)
                else:
                    batch.contacts.append((rec.mail_from, rec.created_at))
        elif cap.ref and _seen_at(rec, cap.place, cap.ref):
            return Outcome(rec, False, False)
        sighting = chain.append_sighting(ArchiveSighting(
            record=rec, seen_at=cap.seen_at or utcnow(), place=cap.place[:1000], direction=cap.direction,
            verdict=cap.verdict, reason=cap.reason, trace=trace,
            queue_id=cap.queue_id, employee=cap.employee_id, employee_email=cap.employee_email[:320],
            mail_from=cap.mail_from[:320], recipients=cap_recipients,
            ref=cap.ref[:500]))
        if not new_record and inline_index:
            self._index_sighting(sighting)
        return Outcome(rec, new_record, True, sighting)

    def stage(self, cap: Capture, blob: PreparedBlob) -> Capture:
        """CPU only, any thread, before the transaction (the SMTP handler's phase 1): the
        capture's record and its digest, the trace and recipients as stored, made now, so the
        group commit — holding the database write lock — only links and inserts them.  Sets
        ``seen_at`` (the record's time) and ``staged``; returns ``cap``."""
        if cap.seen_at is None:
            cap.seen_at = utcnow()
        trace, recipients = _texts(cap)
        record = _new_record(cap, blob, trace, recipients)
        record.digest = chain.record_digest(record)
        cap.staged = Staged(trace, recipients, record)
        return cap

    @staticmethod
    def _index(rec: ArchiveRecord, raw: bytes) -> None:
        """Full-text index (gateway.archive.index, the search area) — never loses the record."""
        index = optional_module("gateway.archive.index")
        if index is None or not hasattr(index, "index_record"):
            return
        try:
            with database.atomic():  # a savepoint: an indexing failure rolls back only itself
                index.index_record(rec, raw)
        except Exception:
            log.exception("archive record %s: full-text indexing failed (record kept)", rec.id)

    @staticmethod
    def _index_sighting(sighting: ArchiveSighting) -> None:
        """A later sighting (another employee / direction) for the search index's filters."""
        index = optional_module("gateway.archive.index")
        if index is None or not hasattr(index, "index_sighting"):
            return
        try:
            with database.atomic():
                index.index_sighting(sighting)
        except Exception:
            log.exception("archive sighting %s: search index update failed (sighting kept)", sighting.id)

    # -- read ----------------------------------------------------------------------

    def read(self, record: ArchiveRecord) -> bytes:
        """The stored bytes (for outbound mail: as relayed); raises BlobError if
        missing/altered, ArchiveError if purged."""
        if record.purged_at is not None:
            raise ArchiveError(f"archive record {record.id} was purged on {record.purged_at:%Y-%m-%d}")
        return self.store.read(record.blob_path, record.sha256)

    def original_copy(self, submitted: bytes, stored: bytes) -> OriginalCopy | None:
        """CPU only (any thread): the sealed submitted bytes to pass to ``record(original=)``
        when ``stored`` (what is archived and relayed) differs from them; else None."""
        return original_mod.capture(self.store, submitted, stored)

    def read_original(self, record: ArchiveRecord, stored: bytes | None = None) -> bytes | None:
        """The bytes the client submitted, or None if the record has no separate original
        (the blob is what was submitted).  ``stored``: the blob's bytes if already read.
        Raises BlobError if altered, ArchiveError if purged."""
        if record.purged_at is not None:
            raise ArchiveError(f"archive record {record.id} was purged on {record.purged_at:%Y-%m-%d}")
        if not record.original_sha256:
            return None
        if stored is None:
            stored = self.read(record)
        return original_mod.restore(self.store, record.original, record.original_sha256, stored)


RECENT_BYTES = 64 * 1024 * 1024  # indexable bytes kept for the background indexer (see Archive.prepare)
RECENT_MAX_MESSAGE = 4 * 1024 * 1024  # larger (after the cut) messages are read back from their blobs
IO_THREADS = 8  # blob writers of batch ingest (see _io_pool)
_POOL: ThreadPoolExecutor | None = None
_IO_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _record_contact(sender: str | list[str], at: Any) -> None:
    """A customer who wrote to us was in contact (the public pool's clock, gateway.customers);
    never costs the archive its record."""
    try:
        from gateway.customers import record_contact

        with database.atomic():  # a savepoint
            record_contact([sender] if isinstance(sender, str) else sender, at)
    except Exception:
        log.exception("archive: could not record the last contact of an inbound sender")


def _record_contacts(contacts: list[tuple[str, dt.datetime]]) -> None:
    """``_record_contact`` for a batch (one look-up for every sender); never costs the
    archive its records."""
    if not contacts:
        return
    try:
        from gateway.customers import record_contacts

        with database.atomic():  # a savepoint
            record_contacts(contacts)
    except Exception:
        log.exception("archive: could not record the last contact of inbound senders")


def _pool() -> ThreadPoolExecutor:
    """Threads for batch ingest: hashing, zstd and AES-GCM release the GIL, fsyncs overlap.
    One per core (at least 2, at most 8): with two per core the threads spent more CPU
    handing the GIL to each other than they gained (bench_archive batch shape on 2 cores,
    2 threads against 4: 417/469/440 vs 387/380/379 msg/s, 3.0-3.5 vs 3.8-4.0 ms CPU a message)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="archive")
        return _POOL


def _io_pool() -> ThreadPoolExecutor:
    """Threads that write and fsync blob files for batch ingest (``_durable_blobs``): they
    wait on the disk, holding the GIL only for a few system calls each, so there are more of
    them than cores — fsyncs in flight together share the file system's journal commits."""
    global _IO_POOL
    with _POOL_LOCK:
        if _IO_POOL is None:
            _IO_POOL = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="archive-io")
        return _IO_POOL


# json.dumps(..., ensure_ascii=False) without a new encoder per call
_JSON = json.JSONEncoder(ensure_ascii=False).encode

def _texts(cap: Capture) -> tuple[str, str]:
    """The trace and the recipients as the record and the sighting store them."""
    return _JSON(cap.trace or []), _JSON(cap.recipients)


def _new_record(cap: Capture, blob: PreparedBlob, trace: str, recipients_json: str) -> ArchiveRecord:
    """The record a capture of new content gets (no digest, seq or id yet); subject, Message-ID
    and addresses the capture does not give come from the message's header."""
    subject, message_id = cap.subject, cap.message_id
    mail_from, recipients = cap.mail_from, cap.recipients
    if subject is None or message_id is None or (not mail_from and not recipients):
        h = cap.headers if cap.headers is not None else headers_of(cap.raw)
        subject = h["subject"] if subject is None else subject
        message_id = h["message_id"] if message_id is None else message_id
        if not mail_from and not recipients:
            mail_from, recipients = h["from"], h["to"]
            recipients_json = _JSON(recipients)
    return ArchiveRecord(
        created_at=(cap.seen_at or utcnow()).replace(tzinfo=None), direction=cap.direction,
        sha256=blob.sha256, blob_path=blob.name, size=blob.size, stored_size=blob.stored_size,
        key_id=blob.key_id, mail_from=mail_from[:320], recipients=recipients_json,
        subject=subject[:2000], message_id=message_id[:998], employee=cap.employee_id,
        verdict=cap.verdict, reason=cap.reason, trace=trace,
        queue_id=cap.queue_id, original_sha256=cap.original.sha256 if cap.original else "",
        original=cap.original.sealed if cap.original else None)


def _seen_at(rec: ArchiveRecord, place: str, ref: str) -> bool:
    """Whether ``rec`` has a sighting at ``place`` with ``ref`` already (an import or sync
    seeing the same message again)."""
    flush_inserts()  # sightings waiting in a buffered_inserts() block
    return ArchiveSighting.select().where(
        (ArchiveSighting.record == rec) & (ArchiveSighting.place == place[:1000])
        & (ArchiveSighting.ref == ref[:500])).exists()


def _records_by_sha(hashes: list[str], columns: str = "*") -> list[ArchiveRecord]:
    """The records with these content hashes (``select().where(sha256.in_(…))`` without peewee
    building the statement: the SMTP group commit asks once per batch); ``columns``: only
    these (plain names, comma-separated; the other fields stay unset)."""
    flush_inserts()  # records waiting in a buffered_inserts() block
    if not hashes:
        return []
    db = database.obj
    q = db.quote
    sql = (f"SELECT {columns} FROM {q[0]}{ArchiveRecord._meta.table_name}{q[1]} "
           f"WHERE {q[0]}sha256{q[1]} IN ({', '.join([db.param] * len(hashes))})")
    return list(ArchiveRecord.raw(sql, *hashes))


def _record_by_sha(sha256: str) -> ArchiveRecord | None:
    """``ArchiveRecord.get_or_none(sha256 == …)`` without peewee building the statement."""
    found = _records_by_sha([sha256])
    return found[0] if found else None


_EMAIL_SQL: dict[type, str] = {}


def _email_of(employee_id: int | None) -> str:
    """An employee's address ("" for none or unknown); the statement text cached."""
    if employee_id is None:
        return ""
    db = database.obj
    sql = _EMAIL_SQL.get(type(db))
    if sql is None:
        q = db.quote
        sql = _EMAIL_SQL[type(db)] = (f"SELECT {q[0]}email{q[1]} FROM {q[0]}{Employee._meta.table_name}{q[1]} "
                                      f"WHERE {q[0]}id{q[1]} = {db.param}")
    row = db.execute_sql(sql, (int(employee_id),)).fetchone()
    return row[0] if row else ""


def _emails_of(employee_ids: set[int | None]) -> dict[int | None, str]:
    """``_email_of`` for many employees in one statement (unknown ids: "")."""
    ids = sorted(i for i in employee_ids if i is not None)
    out: dict[int | None, str] = dict.fromkeys(employee_ids, "")
    for start in range(0, len(ids), 500):
        out.update(Employee.select(Employee.id, Employee.email).where(Employee.id.in_(ids[start:start + 500])).tuples())
    return out


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)  # ~10x faster than default


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)\s+(=\?)")  # whitespace between two encoded words is not text


def _decode_word(m: re.Match) -> str:
    charset, encoding, data = m.group(1).split("*")[0], m.group(2), m.group(3)
    try:
        if encoding in "bB":
            raw = base64.b64decode(data + "=" * (-len(data) % 4))
        else:
            raw = email.quoprimime.header_decode(data).encode("latin-1")
        return raw.decode("gb18030" if charset.lower() in ("gb2312", "gbk") else charset, "replace")
    except (LookupError, ValueError, binascii.Error, UnicodeError):
        return m.group(0)


def _text(value: Any) -> str:
    """A header value as text: RFC 2047 words decoded, unknown charsets replaced, no folding, no
    NULs (PostgreSQL refuses them in a text column)."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        chunks = value._chunks  # noqa: SLF001 - a Header from a non-ASCII raw value
        value = "".join(str(c) for c, _ in chunks)
    text = str(value)
    if not text.isascii() and SURROGATE.search(text) is not None:  # raw 8-bit header bytes: UTF-8 in practice
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "=?" in text:
        text = _ENCODED_WORD.sub(_decode_word, _BETWEEN_WORDS.sub(r"\1\2", text))
    return text.replace("\r", "").replace("\n", "").replace("\x00", " ").strip()  # unfold


HEAD_LIMIT = 65536  # bytes of the header section headers_of reads


def _head_end(raw: bytes) -> int:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    return end


def headers_of(raw: bytes) -> dict[str, Any]:
    """Subject, Message-ID, From, To/Cc addresses and Date of a raw message (best effort)."""
    end = _head_end(raw)
    head = raw[: end if end >= 0 else min(len(raw), HEAD_LIMIT)][:HEAD_LIMIT]
    try:
        return header_fields(_HEADER_PARSER.parsebytes(head))
    except Exception:  # a malformed header never stops archiving
        log.debug("header parse failed", exc_info=True)
        return {"subject": "", "message_id": "", "from": "", "to": [], "date": None}


_LONE_CR = re.compile(rb"\r(?!\n)")


def headers_of_parsed(raw: bytes, msg: email.message.Message) -> dict[str, Any] | None:
    """``headers_of(raw)`` from ``msg``, a compat32 parse of all of ``raw`` (e.g. text
    extraction's), without parsing the header section again — or None where the two could
    differ: a header section past HEAD_LIMIT, none at all, or one whose end the parser finds
    elsewhere than ``headers_of`` does (a bare-LF blank line before the CRLF one, lone CRs)."""
    end = _head_end(raw)
    if end < 0 or end > HEAD_LIMIT or _LONE_CR.search(raw, 0, end + 4) is not None:
        return None
    blank = [p for p in (raw.find(b"\n\n", 0, end + 4), raw.find(b"\n\r\n", 0, end + 4)) if p >= 0]
    crlf = raw.startswith(b"\r\n\r\n", end)
    if not blank or min(blank) != (end + 1 if crlf else end):
        return None
    try:
        return header_fields(msg)
    except Exception:  # noqa: BLE001 - headers_of decides (and logs) then
        return None


def header_fields(msg: email.message.Message) -> dict[str, Any]:
    """``headers_of``'s fields from a parsed (compat32) message."""
    out: dict[str, Any] = {"subject": "", "message_id": "", "from": "", "to": [], "date": None}
    try:
        out["subject"] = _text(msg.get("subject"))
        out["message_id"] = _text(msg.get("message-id"))
        froms = getaddresses(tuple(_text(v) for v in msg.get_all("from", [])))
        out["from"] = froms[0][1] if froms else ""
        tos = getaddresses(tuple(_text(v) for k in ("to", "cc") for v in msg.get_all(k, [])))
        out["to"] = list(dict.fromkeys(a for _, a in tos if a))  # each once (To and Cc may both name one)
        date = msg.get("date")
        if date:
            d = email.utils.parsedate_to_datetime(_text(date))
            out["date"] = d.astimezone(dt.UTC).replace(tzinfo=None) if d.tzinfo else d
    except Exception:  # a malformed header never stops archiving
        log.debug("header parse failed", exc_info=True)
    return out


# -- capture hooks for code outside this package ---------------------------------------------

_ARCHIVES: dict[tuple[str, str], Archive] = {}


def for_config(cfg: Any) -> Archive:
    """One Archive per (directory, key file) in this process."""
    key = (str(cfg.archive_dir), str(cfg.archive.key_file))
    archive = _ARCHIVES.get(key)
    if archive is None:
        archive = _ARCHIVES[key] = Archive.from_config(cfg)
    return archive


@dataclass
class RelayedCopy:
    """The "relay:sent" sighting of a relayed message, prepared (blob durable) by
    ``relayed_capture``; ``record_relayed`` writes it inside the caller's transaction."""

    archive: Archive
    capture: Capture
    blob: PreparedBlob

    def record(self) -> None:
        record_relayed([self])


def relayed_capture(cfg: Any, row: Any, data: bytes, delivered: list[str], remote: str,
                    stored: PreparedBlob | None = None, archive: Archive | None = None) -> RelayedCopy | None:
    """For gateway.relay: prepare the "relay:sent" sighting of ``data`` (hash, encrypt, blob
    file — outside any transaction) for ``record_relayed``.  ``archive``: the one the message
    was read from (None: the config's); ``stored``: its blob that ``data`` was read from
    unchanged (``BlobStore.read_blob``), nothing to prepare.  None if even the preparation
    failed (logged).  The sighting's search-index update is left to the node's background
    indexer (the relay runs inside ``mailgate run``)."""
    try:
        archive = archive or for_config(cfg)
        if stored is not None:
            blob = stored
        else:
            blob = archive.prepare(data)
            archive.store.write(blob)
    except Exception:
        log.exception("%s: archiving the relayed copy failed (blob)", getattr(row, "queue_id", "?"))
        return None
    return RelayedCopy(archive, Capture(
        raw=data, place="relay:sent", direction="outbound", verdict="sent", mail_from=row.mail_from,
        recipients=list(delivered), queue_id=row.queue_id, employee_id=row.employee_id,
        reason=f"accepted by {remote}"[:500], subject=None, message_id=row.message_id or None), blob)


def record_relayed(copies: list[RelayedCopy]) -> None:
    """Inside the caller's transaction (a savepoint; a failure rolls back the chain head too):
    the sightings of relayed copies, with one look-up of their records.  An archive failure
    is logged, never fails the relay."""
    by_archive: dict[int, list[RelayedCopy]] = {}
    for copy in copies:
        by_archive.setdefault(id(copy.archive), []).append(copy)
    for group in by_archive.values():
        try:
            with database.atomic(), chain.savepoint():
                group[0].archive.chain_batch([c.capture for c in group], [c.blob for c in group])
        except Exception:
            log.exception("%s: archiving the relayed copy failed (record)",
                          ", ".join(c.capture.queue_id for c in group))
