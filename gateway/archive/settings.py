"""The [archive] config section (owned by the archive area)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ArchiveConfig:
    # Where blobs live; empty = <node.data_dir>/archive.
    dir: Path | None = None
    # Keyring (AES-256-GCM keys, one per line "<id> <base64>"; the last line encrypts new
    # blobs, every line stays readable).  Created mode 0600 on first use.
    key_file: Path = Path("certs/archive.keys")
    # zstd level for blobs (1-19; 3 is fast and compresses mail ~3-4x).
    compression_level: int = 3
    # Years a record is kept after it was first archived; 0 = forever.
    retention_years: int = 0
    # Run the retention purge once a day inside `mailgate run`.
    purge_enabled: bool = True
    # Seconds between chain checkpoints inside `mailgate run`: the chain head and the operation
    # log's end written to the operation log and to chain-anchors.log (gateway/archive/anchors.py),
    # only when something was archived or logged since the previous one.  What is newer than
    # the last checkpoint has no anchor yet: this is the window in which a cut at the end of
    # the chain or the log would not be seen by verify.
    checkpoint_interval: float = 3600.0
    # Background inbound sync of every active employee's mailboxes.
    sync_enabled: bool = False
    # Upstream master user (Dovecot: login "<user>*<master_user>"); empty = no master login.
    master_user: str = ""
    master_password: str = ""
    # Separator between the user and the master user in the login name.
    master_separator: str = "*"
    # Seconds between sync passes.
    sync_interval: float = 300.0
    # Mailboxes synced per employee (names at the upstream).
    sync_mailboxes: list[str] = field(default_factory=lambda: ["INBOX", "Sent"])
    # Archive whole messages served through the IMAP proxy (fetched again upstream, off the proxy path).
    # Needs a way to read upstream: master_user or capture_credentials_opt_in; without either it
    # is off and the node warns at start (`capture_problem`) — a warning, not a config error,
    # because `mailgate init` writes `capture_imap = true` into every config, so "set in the
    # file" does not tell intent.  false = off, quietly (a deployment archiving outbound only).
    capture_imap: bool = True
    # Opt-in: keep employees' IMAP passwords (sealed) captured at proxy login, for the sync
    # of providers without a master user.
    capture_credentials_opt_in: bool = False
    # Seconds the search index may fall behind while mail keeps arriving: during a burst the
    # background indexer waits (the SMTP path and the indexer share SQLite's write lock) and
    # catches up after it, in larger transactions; 0 = index every pass.
    index_lag: float = 60.0
    # Seconds between two syncs of the archive's file system by the node (gateway/archive/pending.py):
    # till then a just-accepted message's sealed bytes are kept durable in the database instead.
    blob_sync_interval: float = 1.0
    # Messages larger than this are not archived from IMAP/sync (logged instead).
    max_message_size: int = 50 * 1024 * 1024


def can_read_upstream(section: ArchiveConfig) -> bool:
    """Whether IMAP capture and the sync have a way to log in upstream (sync.login_for)."""
    return bool(section.master_user) or section.capture_credentials_opt_in


def capture_imap_on(section: ArchiveConfig) -> bool:
    """Whether the node captures whole messages the IMAP proxy serves."""
    return section.capture_imap and can_read_upstream(section)


def capture_problem(section: ArchiveConfig) -> str | None:
    """Why inbound capture is off although nobody switched it off, or None.  A warning, not
    an error: ``capture_imap`` on without a way to read upstream."""
    if not section.capture_imap or can_read_upstream(section):
        return None
    return ("[archive] inbound mail is not archived: IMAP proxy capture and the background sync "
            "(sync_enabled) are off because neither master_user (with master_password) nor "
            "capture_credentials_opt_in = true is set; only mail through the gateway's SMTP is archived. "
            "Set one of them, or capture_imap = false to archive outbound mail only on purpose")


def validate(section: ArchiveConfig) -> list[str]:
    problems = []
    if not 1 <= section.compression_level <= 19:
        problems.append("[archive] compression_level: must be 1..19")
    if section.retention_years < 0:
        problems.append("[archive] retention_years: must be >= 0 (0 = keep forever)")
    if section.checkpoint_interval < 60:
        problems.append("[archive] checkpoint_interval: must be >= 60 seconds")
    if section.sync_interval <= 0:
        problems.append("[archive] sync_interval: must be > 0")
    if section.master_user and not section.master_password:
        problems.append("[archive] master_password: required when master_user is set")
    if section.blob_sync_interval <= 0:
        problems.append("[archive] blob_sync_interval: must be > 0")
    if section.index_lag < 0:
        problems.append("[archive] index_lag: must be >= 0 (0 = index at once)")
    if section.max_message_size <= 0:
        problems.append("[archive] max_message_size: must be > 0")
    if section.sync_enabled and not can_read_upstream(section):
        problems.append("[archive] sync_enabled: needs master_user or capture_credentials_opt_in = true")
    return problems
