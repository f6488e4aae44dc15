"""`mailgate archive import`: existing mail from .eml files/folders, mbox files, an IMAP account.

Idempotent: a message already archived gets no second record (content hash), and the
same file / mbox entry / IMAP UID gets no second sighting (the sighting ref is the
file's path, ``<mbox path>#<n>`` or ``<uidvalidity>:<uid>``).  Bad input (unreadable,
empty, too large, not a mail) is reported per item and skipped; nothing else is lost.
Progress (``Progress``): a bar on stderr when it is a terminal, otherwise a line every few
seconds; always a final count.  The total is known up front (files, mbox entries, the IMAP
folders' STATUS counts).
"""

from __future__ import annotations

import mailbox as mailbox_mod
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from gateway.archive import Archive, Capture
from gateway.db.models import Employee

BATCH = 200
EML_SUFFIXES = (".eml", ".msg.eml", ".mail")


@dataclass
class ImportResult:
    seen: int = 0
    new_records: int = 0
    new_sightings: int = 0
    errors: list[str] = field(default_factory=list)


class Progress:
    """A one-line progress bar (TTY: redrawn in place with ``\\r`` at most every 0.1 s, the
    line ended by ``finish``) or periodic plain counts (pipes, logs: a line every ``every``
    seconds) — ``LABEL: DONE/TOTAL UNIT (RATE/s)``, ``unit`` "messages" unless told.  ``finish``
    always draws the final count, so a log shows where it ended; ``close`` (after an error)
    only ends the bar's line."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None, every: float = 5.0,
                 unit: str = "messages"):
        self.label, self.total, self.stream, self.unit = label, total, stream or sys.stderr, unit
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.1 if self.tty else every
        self.start = self._last = time.monotonic()
        self.done = 0
        self._width = 0  # of the bar's line on screen (TTY): a shorter redraw blanks the rest

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._draw()

    def finish(self) -> None:
        self._draw(final=True)
        self.close()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.flush()

    def _draw(self, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed
        if self.tty:
            if self.total:
                width = 30
                filled = int(width * min(self.done, self.total) / self.total)
                bar = "#" * filled + "-" * (width - filled)
                text = f"{self.label} [{bar}] {self.done}/{self.total} ({rate:.0f}/s)"
            else:
                text = f"{self.label} {self.done} ({rate:.0f}/s)"
            self.stream.write("\r" + text.ljust(self._width))
            self._width = max(len(text), 1)
        else:
            total = f"/{self.total}" if self.total else ""
            end = ", done" if final else ""
            self.stream.write(f"{self.label}: {self.done}{total} {self.unit} ({rate:.0f}/s){end}\n")
        self.stream.flush()


def _employee(address: str | None) -> Employee | None:
    if not address:
        return None
    e = Employee.get_or_none(Employee.email == address.lower())
    if e is None:
        raise ValueError(f"no employee {address!r}")
    return e


def _looks_like_mail(raw: bytes) -> bool:
    head = raw[:4096].lstrip()
    return b":" in head.split(b"\n", 1)[0] or head.startswith(b"From ")


class _Batcher:
    """Captures into ``Archive.ingest_many`` per BATCH, pipelined: a batch's index rows are
    written while the next batch is read and stored.  The import functions call
    ``archive.wait_indexed()`` before they return (their messages searchable by then)."""

    def __init__(self, archive: Archive, result: ImportResult):
        self.archive, self.result, self.pending = archive, result, []

    def add(self, cap: Capture) -> None:
        self.pending.append(cap)
        if len(self.pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            outcomes = self.archive.ingest_many(batch, pipeline=True)
        except OSError as exc:
            # A blob file could not be written (disk full, read-only archive folder): no row
            # of this batch was written (ingest_many writes every blob before any row), so
            # each of its messages is reported and a later run archives it.  The import goes
            # on: a failure confined to one folder of the archive spares the other batches.
            reason = exc.strerror or str(exc)
            self.result.errors += [f"{c.ref}: not archived, the archive could not store it ({reason})"
                                   for c in batch]
            return
        for o in outcomes:
            self.result.new_records += o.new_record
            self.result.new_sightings += o.new_sighting
        self.result.seen += len(batch)


def _eml_files(paths: list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(EML_SUFFIXES):
                        yield Path(root) / name
        else:
            yield p


def import_eml(archive: Archive, paths: list[Path], *, employee: str | None = None, direction: str = "inbound",
               max_size: int = 50 * 1024 * 1024, progress: Progress | None = None) -> ImportResult:
    result = ImportResult()
    emp = _employee(employee)
    files = list(_eml_files([Path(p) for p in paths]))
    batcher = _Batcher(archive, result)
    try:
        for n, path in enumerate(files, 1):
            try:
                size = path.stat().st_size
                if size > max_size:
                    raise ValueError(f"{size} bytes is over max_message_size")
                raw = path.read_bytes()
                if not raw.strip() or not _looks_like_mail(raw):
                    raise ValueError("not an e-mail message")
            except (OSError, ValueError) as exc:
                result.errors.append(f"{path}: {exc}")
            else:
                batcher.add(Capture(raw=raw, place="import:eml", direction=direction, verdict="imported",
                                    ref=str(path.resolve()), employee_id=emp.id if emp else None,
                                    employee_email=emp.email if emp else ""))
            if progress is not None:
                progress.update(n, len(files))
        batcher.flush()
    finally:
        archive.wait_indexed()  # also when an error stops the import: no index write left in flight
    return result


def import_mbox(archive: Archive, path: Path, *, employee: str | None = None, direction: str = "inbound",
                max_size: int = 50 * 1024 * 1024, progress: Progress | None = None) -> ImportResult:
    result = ImportResult()
    emp = _employee(employee)
    path = Path(path)
    if not path.is_file():
        result.errors.append(f"{path}: not a file")
        return result
    box = mailbox_mod.mbox(path, factory=None, create=False)
    batcher = _Batcher(archive, result)
    try:
        keys = box.keys()
        for n, key in enumerate(keys, 1):
            try:
                raw = box.get_bytes(key, from_=False)
            except Exception as exc:  # noqa: BLE001 - one broken entry must not stop the import
                result.errors.append(f"{path}#{n}: {exc}")
                continue
            if len(raw) > max_size:
                result.errors.append(f"{path}#{n}: {len(raw)} bytes is over max_message_size")
            elif raw.strip():
                batcher.add(Capture(raw=raw, place="import:mbox", direction=direction, verdict="imported",
                                    ref=f"{path.resolve()}#{n}", employee_id=emp.id if emp else None,
                                    employee_email=emp.email if emp else ""))
            if progress is not None:
                progress.update(n, len(keys))
        batcher.flush()
    finally:
        box.close()
        archive.wait_indexed()  # also when an error stops the import: no index write left in flight
    return result


def import_imap(archive: Archive, upstream, user: str, password: str, mailboxes: list[str], *,  # noqa: ANN001
                employee: str | None = None, max_size: int = 50 * 1024 * 1024,
                progress: Progress | None = None) -> ImportResult:
    """All of ``mailboxes`` (empty: every selectable folder) of one account."""
    from imapclient.exceptions import IMAPClientError

    from gateway.archive.sync import fetch_mailbox

    result = ImportResult()
    emp = _employee(employee)
    account = (emp.email if emp else user).lower()
    client = upstream.login(user, password)
    try:
        if not mailboxes:
            mailboxes = [name for flags, _, name in client.list_folders() if b"\\Noselect" not in flags]
        sizes: dict[str, int] = {}
        for mbox in mailboxes:  # the progress total: every folder's count first (STATUS, cheap)
            try:
                sizes[mbox] = _count(client, mbox)
            except IMAPClientError:
                sizes[mbox] = 0  # reported when the folder itself fails below
        total, passed = sum(sizes.values()), 0
        for mbox in mailboxes:
            offset = result.seen

            def report(done: int, _total: int, passed: int = passed) -> None:
                if progress is not None:
                    progress.update(passed + done, max(total, passed + done))

            try:
                before = result.new_sightings
                # (fetch_mailbox pipelines its chunks and waits for their index rows before it returns)
                _, new = fetch_mailbox(archive, client, mbox, f"import:imap:{account}/{mbox}", employee=emp,
                                       verdict="imported", max_size=max_size, progress=report)
                result.new_sightings = before + new
                result.seen = offset + _count(client, mbox)
            except (IMAPClientError, OSError) as exc:  # upstream trouble, or the archive could not store a blob
                result.errors.append(f"{account}/{mbox}: {exc}")
            # a failed folder counts as passed, as a bad .eml file does; mail that arrived meanwhile too
            passed = max(passed + sizes[mbox], progress.done if progress is not None else 0)
            if progress is not None:
                progress.update(passed, max(total, passed))
    finally:
        try:
            client.logout()
        except Exception:  # noqa: BLE001
            pass
    return result


def _count(client, mbox: str) -> int:  # noqa: ANN001
    return int(client.folder_status(mbox, ["MESSAGES"]).get(b"MESSAGES", 0))
