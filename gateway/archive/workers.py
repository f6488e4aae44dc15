"""Full-text extraction on the other cores: a small process pool for the archive's batch paths.

Parsing MIME and building the index text is pure Python (it holds the GIL), about 40 % of
archiving a message.  ``extract_async(raws)`` hands a batch to worker processes and returns
a handle; the caller goes on with the blobs and the chain transaction meanwhile and calls
``result()`` when it writes the index rows.  Each worker answers
``(Extracted, short grams)`` per message — exactly what ``extraction.extract`` and
``terms.short_grams`` give inline, the grams as one space-separated text (as the index
stores them: one string pickles and travels between the processes ~5x cheaper than a few
hundred).

Small batches, a one-core machine, ``MAILGATE_ARCHIVE_WORKERS=0`` or a broken pool: the
work is done inline (same result, just on this core).  Workers are spawned (not forked: a
node has threads and an event loop), at most ``max_workers()`` of them, once per process —
by ``start()`` when a node starts its archive, else by the first batch — stopped at exit,
and exit by themselves within a second when their parent dies (kill -9).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

__all__ = ["BrokenProcessPool", "Pending", "extract_async", "max_workers", "shutdown", "start"]

from gateway.archive import extraction, terms

log = logging.getLogger("mailgate.archive.workers")

MIN_BATCH = 8  # fewer messages: not worth a round trip to another process
CHUNK = 16  # messages per task sent to a worker
PARENT_POLL = 1.0  # seconds between a worker's checks that its parent still lives
# Workers run at a lower priority than the process that started them: where both want a core,
# the parent's serial work goes first — the node's SMTP threads and group commit, the
# indexer's write transaction while the next batch is extracted ahead, ingest_many's sealing
# and chain — and extraction fills the gaps.  bench_archive ingest, 6 interleaved pairs at load
# 3.3-4.7: node 368/358/307/275/320/282 -> 508/455/318/317/273/283 msg/s, batch
# 499/423/356/402/336/375 -> 494/471/402/420/299/380 (slower only at the heaviest outside load).
WORKER_NICE = 5

_POOL: ProcessPoolExecutor | None = None
_LOCK = threading.Lock()

Extraction = tuple[extraction.Extracted, str]  # (text, short grams joined by spaces)


def max_workers() -> int:
    """``MAILGATE_ARCHIVE_WORKERS`` or the number of cores (at most 4); 0 = no pool."""
    env = os.environ.get("MAILGATE_ARCHIVE_WORKERS", "").strip()
    if env.isdigit():
        return int(env)
    cores = os.cpu_count() or 1
    return 0 if cores < 2 else min(4, cores)


def extract_one(raw: bytes, headers: bool = True) -> Extraction:
    """One message's Extraction.  Never raises: a message the extraction cannot read (a bug
    met by hostile input) gets an empty text — it is archived all the same, its record's
    header fields then parsed on their own (``headers_of``), and it must not cost the other
    messages of its batch their archiving or their index."""
    try:
        ex = extraction.extract(raw, headers)
        return ex, " ".join(terms.short_grams(extraction.all_text(ex)))
    except Exception:  # noqa: BLE001
        log.exception("archive: text extraction failed on a %d-byte message; archived without its text", len(raw))
        return extraction.Extracted(), ""


def _extract_chunk(raws: list[bytes], headers: bool = True) -> list[Extraction]:
    return [extract_one(r, headers) for r in raws]


def _watch_parent(parent: int) -> None:
    """Worker initializer: exit when the process that started the pool is gone (a node
    killed with -9 must not leave its workers behind; PR_SET_PDEATHSIG would follow the
    starting *thread*, which may be a short-lived executor thread); run at ``WORKER_NICE``."""
    os.nice(WORKER_NICE)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _pool() -> ProcessPoolExecutor | None:
    global _POOL
    workers = max_workers()
    if workers <= 0:
        return None
    with _LOCK:
        if _POOL is None:
            _POOL = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_watch_parent, initargs=(os.getpid(),))
            atexit.register(shutdown)
        return _POOL


def start() -> None:
    """Start every worker process now and wait until each answers (a node calls it at
    start-up: a spawned worker imports the gateway, a fraction of a second of CPU each, which
    should not land in the middle of the first burst of mail).  Errors are left to the first
    batch, which falls back to extracting inline."""
    pool = _pool()
    if pool is None:
        return
    try:
        # Each submit finds no idle worker and spawns one, up to the pool's size.
        for fut in [pool.submit(os.getpid) for _ in range(max_workers())]:
            fut.result()
    except (BrokenProcessPool, RuntimeError, OSError):
        log.warning("archive extraction pool did not start; batches extract inline until it does", exc_info=True)
        shutdown(wait=False)


def shutdown(wait: bool = True) -> None:
    """Stop the worker processes (at exit, in tests; ``wait=False`` drops a broken pool: the
    next batch starts a new one)."""
    global _POOL
    with _LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown(wait=wait, cancel_futures=True)


class Pending:
    """A batch being extracted; ``result()`` returns one Extraction per message, in order."""

    def __init__(self, raws: list[bytes], headers: bool = True) -> None:
        self._raws = raws
        self._headers = headers
        self._futures: list[tuple[int, Future]] = []
        pool = _pool() if len(raws) >= MIN_BATCH else None
        if pool is None:
            return
        try:
            for start in range(0, len(raws), CHUNK):
                self._futures.append((start, pool.submit(_extract_chunk, raws[start:start + CHUNK], headers)))
        except (BrokenProcessPool, RuntimeError):
            log.warning("archive extraction pool unusable; extracting inline", exc_info=True)
            shutdown(wait=False)
            self._futures = []

    def result(self) -> list[Extraction]:
        out: list[Extraction | None] = [None] * len(self._raws)
        for start, fut in self._futures:
            try:
                for k, item in enumerate(fut.result()):
                    out[start + k] = item
            except (BrokenProcessPool, OSError, EOFError):  # a worker died: do its share here
                log.warning("archive extraction worker failed; extracting inline", exc_info=True)
                shutdown(wait=False)
            except Exception:  # noqa: BLE001 - e.g. an answer that did not travel back: its share inline
                log.warning("archive extraction of a chunk failed; extracting it inline", exc_info=True)
        return [item if item is not None else extract_one(raw, self._headers)
                for item, raw in zip(out, self._raws, strict=True)]


def extract_async(raws: list[bytes], headers: bool = True) -> Pending:
    """Start extracting ``raws`` (in worker processes when worthwhile); ``.result()`` collects.
    ``headers``: also each message's record header fields (``extraction.extract``)."""
    return Pending(raws, headers)
