"""Inbound capture from the upstream IMAP server (imapclient, blocking).

- ``sync_all``: the background sync of every active employee's ``sync_mailboxes``
  (INBOX, Sent), logged in as ``<employee>*<master_user>`` (Dovecot master user) or, in
  opt-in mode, with the password captured at IMAP proxy login (sealed at rest).
  ``ArchiveSyncState`` keeps (UIDVALIDITY, last UID) per mailbox, so a pass resumes where
  the last one stopped; a new UIDVALIDITY starts the mailbox again (dedup by content
  hash and by the sighting ref ``<uidvalidity>:<uid>`` keeps that cheap).
- ``capture_uids``: messages the IMAP proxy served whole, fetched again here (off the
  proxy's path) and archived as ``imap:<account>/<mailbox>``.
- ``fetch_mailbox``: the shared loop (also used by ``mailgate archive import --imap``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from gateway.archive import Archive, Capture
from gateway.archive.schema import ArchiveCredential, ArchiveSighting, ArchiveSyncState
from gateway.credentials import CredentialsError, seal, unseal
from gateway.db.models import Employee, utcnow
from gateway.groupcommit import write_transaction

log = logging.getLogger("mailgate.archive")

FETCH_CHUNK = 50  # messages per UID FETCH (bounded memory: 50 x max_message_size worst case)


@dataclass
class Upstream:
    host: str
    port: int
    security: str = "tls"  # tls | starttls | none
    ssl_context: object | None = None
    timeout: float = 30.0

    @classmethod
    def from_config(cls, cfg) -> Upstream:  # noqa: ANN001 - gateway.config.Config
        from gateway.relay import tls_context

        up = cfg.upstream
        ctx = tls_context(up) if up.imap_security != "none" else None
        return cls(up.host, up.imap_port, up.imap_security, ctx, up.timeout)

    def login(self, user: str, password: str) -> IMAPClient:
        client = IMAPClient(self.host, port=self.port, ssl=self.security == "tls", ssl_context=self.ssl_context,
                            timeout=self.timeout)
        try:
            if self.security == "starttls":
                client.starttls(self.ssl_context)
            client.login(user, password)
        except BaseException:
            _close(client)
            raise
        return client


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


def is_sent_mailbox(client: IMAPClient, name: str) -> bool:
    try:
        for flags, _, mbox in client.list_folders():
            if mbox == name:
                return b"\\Sent" in flags or name.lower() in ("sent", "sent items", "sent messages")
    except IMAPClientError:
        pass
    return name.lower() in ("sent", "sent items", "sent messages")


def fetch_mailbox(
    archive: Archive,
    client: IMAPClient,
    mailbox: str,
    place: str,
    *,
    after_uid: int = 0,
    uids: list[int] | None = None,
    employee: Employee | None = None,
    direction: str | None = None,
    verdict: str = "seen",
    max_size: int = 50 * 1024 * 1024,
    progress: Callable[[int, int], None] | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    expect_uidvalidity: int | None = None,
) -> tuple[int, int]:
    """Archive ``mailbox`` (UIDs > after_uid, or exactly ``uids``); returns (uidvalidity, new sightings).

    ``on_chunk(uidvalidity, highest uid)`` runs after each committed chunk (checkpoints)."""
    info = client.select_folder(mailbox, readonly=True)
    uidvalidity = int(info.get(b"UIDVALIDITY", 0))
    if expect_uidvalidity is not None and uidvalidity != expect_uidvalidity:
        log.info("archive: %s has a new UIDVALIDITY; those UIDs name other messages now, skipped", place)
        return uidvalidity, 0
    if direction is None:
        direction = "outbound" if is_sent_mailbox(client, mailbox) else "inbound"
    if uids is None:
        found = client.search(["UID", f"{after_uid + 1}:*"]) if info.get(b"EXISTS", 0) else []
        uids = sorted(u for u in found if u > after_uid)
    new = done = 0
    try:
        for chunk in _chunks(uids, FETCH_CHUNK):
            sizes = client.fetch(chunk, ["RFC822.SIZE"])
            wanted = []
            for uid in chunk:
                size = int(sizes.get(uid, {}).get(b"RFC822.SIZE", 0))
                if size > max_size:
                    log.warning("archive: %s UID %d is %d bytes (> max_message_size); not archived", place, uid, size)
                elif uid in sizes:
                    wanted.append(uid)
            captures = []
            if wanted:
                for uid, data in sorted(client.fetch(wanted, ["BODY.PEEK[]"]).items()):
                    raw = data.get(b"BODY[]")
                    if raw is None:
                        continue
                    captures.append(Capture(
                        raw=bytes(raw), place=place, direction=direction, verdict=verdict,
                        ref=f"{uidvalidity}:{uid}", employee_id=employee.id if employee else None,
                        employee_email=employee.email if employee else ""))
            if captures:
                new += sum(o.new_sighting for o in archive.ingest_many(captures, pipeline=True))
            if on_chunk is not None:  # the chunk's records are committed (its index rows may follow: see below)
                on_chunk(uidvalidity, max(chunk))
            done += len(chunk)
            if progress is not None:
                progress(done, len(uids))
    finally:
        # The chunks' ingest is pipelined (a chunk's index rows are written while the next one
        # is fetched and stored); wait here, at the end of the folder, not of the sync pass:
        # every caller (sync, import --imap, the IMAP capture) takes this return as "the
        # folder's messages are archived and searchable", and a folder is where the chunks
        # are (a pass over many small folders has little to overlap).  Also after an error.
        archive.wait_indexed()
    return uidvalidity, new


def _chunks(items: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# -- credentials (opt-in) --------------------------------------------------------------


def _cred_aad(account: str) -> str:
    return f"archive-imap:{account.lower()}"


def store_credentials(archive: Archive, account: str, username: str, password: str) -> None:
    """Opt-in capture at proxy login: seal and keep (one row per account, replaced on change)."""
    ring = archive.store.keyring
    sealed = seal(ring.current, username, password, _cred_aad(account))
    with write_transaction():
        row = ArchiveCredential.get_or_none(ArchiveCredential.account == account.lower())
        if row is None:
            ArchiveCredential.create(account=account.lower(), key_id=ring.current_id, sealed=sealed)
        else:
            row.key_id, row.sealed, row.captured_at = ring.current_id, sealed, utcnow()
            row.save()


def load_credentials(archive: Archive, account: str) -> tuple[str, str] | None:
    row = ArchiveCredential.get_or_none(ArchiveCredential.account == account.lower())
    if row is None:
        return None
    try:
        return unseal(archive.store.keyring.key(row.key_id), bytes(row.sealed), _cred_aad(account))
    except (CredentialsError, Exception) as exc:  # noqa: BLE001 - a bad row must not stop the sync
        log.warning("archive: stored IMAP login of %s does not open: %s", account, type(exc).__name__)
        return None


# -- logins ------------------------------------------------------------------------------


def login_for(archive: Archive, cfg, account: str) -> tuple[str, str] | None:  # noqa: ANN001
    """(login, password) to read ``account``'s mailboxes, or None when there is no way."""
    a = cfg.archive
    if a.master_user:
        return f"{account}{a.master_separator}{a.master_user}", a.master_password
    if a.capture_credentials_opt_in:
        return load_credentials(archive, account)
    return None


# -- background sync ---------------------------------------------------------------------


def sync_account(archive: Archive, cfg, upstream: Upstream, employee: Employee) -> int:  # noqa: ANN001
    creds = login_for(archive, cfg, employee.email)
    if creds is None:
        return 0
    client = upstream.login(*creds)
    new = 0
    try:
        for mailbox in cfg.archive.sync_mailboxes:
            try:
                new += _sync_mailbox(archive, cfg, client, employee, mailbox)
            except IMAPClientError as exc:
                _note_error(employee.email, mailbox, str(exc))
                log.info("archive sync: %s/%s skipped: %s", employee.email, mailbox, exc)
            except OSError as exc:  # a blob not stored (disk full …) or the connection lost: the next pass retries
                _note_error(employee.email, mailbox, str(exc))
                log.warning("archive sync: %s/%s stopped: %s (resumes after its last stored message)",
                            employee.email, mailbox, exc)
    finally:
        _close(client)
    return new


def _sync_mailbox(archive: Archive, cfg, client: IMAPClient, employee: Employee, mailbox: str) -> int:  # noqa: ANN001
    with write_transaction():  # read-then-insert: take the write lock first (SQLite "database is locked")
        state, _ = ArchiveSyncState.get_or_create(account=employee.email, mailbox=mailbox)
    info = client.select_folder(mailbox, readonly=True)
    uidvalidity = int(info.get(b"UIDVALIDITY", 0))
    after = state.last_uid if state.uidvalidity == uidvalidity else 0

    def checkpoint(validity: int, uid: int) -> None:
        ArchiveSyncState.update(uidvalidity=validity, last_uid=uid, updated_at=utcnow(), last_error="").where(
            ArchiveSyncState.id == state.id).execute()

    _, new = fetch_mailbox(archive, client, mailbox, f"sync:{employee.email}/{mailbox}", after_uid=after,
                           employee=employee, max_size=cfg.archive.max_message_size, on_chunk=checkpoint)
    return new


def _note_error(account: str, mailbox: str, error: str) -> None:
    ArchiveSyncState.update(last_error=error[:1000], updated_at=utcnow()).where(
        (ArchiveSyncState.account == account) & (ArchiveSyncState.mailbox == mailbox)).execute()


def sync_all(archive: Archive, cfg, should_stop: Callable[[], bool] = lambda: False) -> int:  # noqa: ANN001
    """One pass over every active employee; returns new sightings."""
    upstream = Upstream.from_config(cfg)
    total = 0
    # A list, not a lazy cursor: an open SELECT keeps a stale read snapshot, and SQLite then
    # refuses the sync's write transactions at once ("database is locked", no busy wait).
    employees = list(Employee.select().where(Employee.active == True).order_by(Employee.id))  # noqa: E712
    for employee in employees:
        if should_stop():
            break
        try:
            total += sync_account(archive, cfg, upstream, employee)
        except (IMAPClientError, OSError) as exc:
            log.warning("archive sync: %s: %s", employee.email, exc)
    return total


# -- IMAP proxy capture --------------------------------------------------------------------


def capture_uids(archive: Archive, cfg, account: str, mailbox: str, uidvalidity: int,  # noqa: ANN001
                 uids: list[int], upstream: Upstream | None = None) -> int:
    """Archive messages the proxy served whole (skipping those already sighted there)."""
    place = f"imap:{account}/{mailbox}"
    refs = [f"{uidvalidity}:{u}" for u in uids]
    known = {s.ref for s in ArchiveSighting.select(ArchiveSighting.ref).where(
        (ArchiveSighting.place == place) & (ArchiveSighting.ref.in_(refs)))}
    todo = [u for u, r in zip(uids, refs, strict=True) if r not in known]
    if not todo:
        return 0
    creds = login_for(archive, cfg, account)
    if creds is None:
        log.debug("archive: no way to read %s upstream; IMAP capture skipped", account)
        return 0
    employee = Employee.get_or_none(Employee.email == account)
    client = (upstream or Upstream.from_config(cfg)).login(*creds)
    try:
        _, new = fetch_mailbox(archive, client, mailbox, place, uids=todo, employee=employee,
                               max_size=cfg.archive.max_message_size, expect_uidvalidity=uidvalidity)
        return new
    finally:
        _close(client)
