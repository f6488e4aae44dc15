"""The node's journal of relay outcomes that could not be recorded (gateway/relay.py).

A relay worker records each attempt's outcome in the database after the upstream
answered.  When that commit keeps failing — the database away — the worker tries again
while the row's claim lasts (``gateway.relayoutcomes``); before, an outcome still
unrecorded when the worker stopped, or when its claim was about to run out, was given up:
the row stayed claimed and queued, and after the claim expired (or at the next start, when
the node releases its old claims) the message was delivered a second time.  Instead the
outcome is written here, and recorded from here at the next chance:

* at the node's next start, before it releases its old claims (``Node.start``), and, while
  the relay runs, after each of a worker's runs that reached the database;
* and whenever one of this node's workers claims a row whose outcome is journalled: the
  journalled outcome is recorded instead of delivering the message again.

So within one node a message whose outcome is journalled is never delivered again.  A row
whose claim ran out may be claimed by another node meanwhile (the journal is per node, the
database is shared): if that node records an attempt of its own first, the journalled
outcome is stale — recording it would overwrite a newer state — and is dropped at WARNING
("may have been delivered twice"): across nodes, at least once.  While another node holds
a live claim on the row the entry waits.  Whether an entry still applies is decided by the
row itself (still queued, its attempt count unchanged, not under someone else's live claim):
an entry whose first commit went through after all is dropped as already recorded.

The file: ``<data_dir>/relay-journal/<node>.journal``, append-only, one record per line —
the CRC-32 of the JSON text (8 hex digits), a space, the JSON — each append fsynced (the
directory too when the file is new); mode 0600: it holds addresses and upstream replies,
never credentials (the row's new state has none).  Bounded (``MAX_BYTES``): a full journal refuses the
outcome, which is then given up as before (logged at ERROR).  Entries recorded or dropped
are removed by writing the rest to a new file and renaming it over the old one (fsynced);
an empty journal is deleted.  A line that fails its checksum — a torn last line after a
crash in the middle of an append, or a corrupt one — is ignored with a WARNING when the
journal is loaded, and dropped by the rewrite that follows.

One process uses a node's journal at a time: the node at its start, then the one that runs
the relay workers (the node itself, or its relay process, started after).  Thread-safe
within that process.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import zlib
from pathlib import Path
from typing import Any

from gateway.db.models import OutboundMessage

log = logging.getLogger(__name__)

MAX_BYTES = 4 * 1024 * 1024  # a few thousand outcomes (an outcome's line is well under 2 KiB)


def journal_path(data_dir: Path, node: str) -> Path:
    """Where node ``node`` keeps its journal (per node: a data directory may be shared)."""
    return Path(data_dir) / "relay-journal" / f"{node}.journal"


def entry_key(entry: dict[str, Any]) -> str:
    """One attempt of one row by one worker run."""
    return f"{entry['row']}:{entry['owner']}:{entry['attempts']}"


def encode_changes(changes: dict[Any, Any]) -> dict[str, Any]:
    """A queue row's new state (``{OutboundMessage field: value}``) as JSON values."""
    return {field.name: {"$dt": value.isoformat()} if isinstance(value, dt.datetime) else value
            for field, value in changes.items()}


def decode_changes(data: dict[str, Any]) -> dict[Any, Any]:
    """``encode_changes`` undone."""
    return {getattr(OutboundMessage, name): dt.datetime.fromisoformat(value["$dt"]) if isinstance(value, dict)
            else value for name, value in data.items()}


def encode_line(entry: dict[str, Any]) -> bytes:
    text = json.dumps(entry, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return f"{zlib.crc32(text.encode()):08x} {text}\n".encode()


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The entry of one line (its end of line included or not); None if it fails its checksum."""
    try:
        text = line.rstrip(b"\n").decode("ascii")
        checksum, body = text.split(" ", 1)
        if len(checksum) != 8 or int(checksum, 16) != zlib.crc32(body.encode()):
            return None
        entry = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return entry if isinstance(entry, dict) and {"row", "owner", "attempts"} <= entry.keys() else None


class OutcomeJournal:
    """The journal file and its entries in memory (loaded once, at construction)."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._size = 0
        self._load()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entries(self) -> list[dict[str, Any]]:
        """The entries, oldest first."""
        with self._lock:
            return list(self._entries.values())

    def for_row(self, row_id: int) -> dict[str, Any] | None:
        """The entry of queue row ``row_id``, if one is journalled."""
        with self._lock:
            for entry in self._entries.values():
                if entry["row"] == row_id:
                    return entry
        return None

    def append(self, entry: dict[str, Any]) -> bool:
        """Write ``entry`` durably (fsynced before this returns True).  False when the journal
        is full or the write failed (logged): the caller gives the outcome up."""
        line = encode_line(entry)
        with self._lock:
            if self._size + len(line) > self.max_bytes:
                log.error("relay outcome journal %s is full (%d bytes): outcome of row %s not kept",
                          self.path, self._size, entry["row"])
                return False
            try:
                new = not self.path.exists()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if new:
                    _fsync_dir(self.path.parent)
            except OSError as exc:
                log.error("relay outcome journal %s: could not write the outcome of row %s: %s",
                          self.path, entry["row"], exc)
                return False
            self._entries[entry_key(entry)] = entry
            self._size += len(line)
        return True

    def remove(self, entries: list[dict[str, Any]]) -> None:
        """Drop ``entries`` (recorded, or stale): the rest is written to a new file, renamed
        over the journal; nothing left, the file goes."""
        with self._lock:
            for entry in entries:
                self._entries.pop(entry_key(entry), None)
            self._rewrite()

    # -- inside the lock --------------------------------------------------------

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        bad = 0
        for number, line in enumerate(lines, 1):
            entry = decode_line(line)
            if entry is None:
                bad += 1
                where = "torn last line" if number == len(lines) else "corrupt line"
                log.warning("relay outcome journal %s: %s %d ignored (checksum or format)", self.path, where, number)
                continue
            self._entries[entry_key(entry)] = entry
        self._size = len(data)
        if bad:  # appends go on from a clean end of line
            self._rewrite()

    def _rewrite(self) -> None:
        if not self._entries:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            else:
                _fsync_dir(self.path.parent)
            self._size = 0
            return
        data = b"".join(encode_line(entry) for entry in self._entries.values())
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._size = len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
