"""The [distribution] config section (owned by the distribution area)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DELIVERY_METHODS = ("forward", "append")


@dataclass
class DistributionConfig:
    enabled: bool = False
    # Shared mailboxes to watch (login names at the upstream).
    mailboxes: list[str] = field(default_factory=list)
    # The folder watched in each shared mailbox.
    folder: str = "INBOX"
    # Where rejected mail (拒收) is moved.
    junk_folder: str = "Junk"
    # IMAP keyword set on the shared copy once it is handled.
    keyword: str = "$Distributed"
    # Extra keyword on shared copies left for a manager (removed when dispatched).
    undistributed_keyword: str = "$Undistributed"
    # First start on a mailbox: "new" = only mail arriving from now on, "all" = everything not yet marked.
    initial: str = "new"
    # Master user of the upstream: logs in as "<mailbox>*<master_user>" (shared mailboxes, APPEND).
    master_user: str = ""
    master_password: str = ""
    # forward (through the relay queue) or append (IMAP APPEND into the employee's mailbox).
    delivery: str = "forward"
    # Employees (addresses) who get APPEND instead of forward; "*" = everyone.
    append_for: list[str] = field(default_factory=list)
    # Folder in the employee's mailbox that APPEND delivers to.
    append_folder: str = "INBOX"
    # Envelope sender of forwards; empty = the shared mailbox address.
    forward_sender: str = ""
    # Distribution rule files (*.yaml).
    rules_dir: Path = Path("rules/distribution")
    # Seconds between checks where the upstream has no IDLE; also the safety re-scan under IDLE.
    poll_interval: float = 30.0
    # Seconds before an IDLE command is renewed (keep below 29 minutes).
    idle_renew: float = 600.0
    # Reconnect backoff after a disconnect, refusal or throttling: first and longest wait in seconds.
    reconnect_initial: float = 1.0
    reconnect_max: float = 300.0
    # Messages fetched per round.
    batch_size: int = 100
    # Larger messages are not forwarded automatically: they stay undistributed for a manager.
    max_message_size: int = 50 * 1024 * 1024
    # least-loaded groups count what each member received in this many hours.
    load_window_hours: int = 24


def validate(section: DistributionConfig) -> list[str]:
    problems = []
    if section.delivery not in DELIVERY_METHODS:
        problems.append(f"[distribution] delivery: forward or append (got {section.delivery!r})")
    if section.enabled and not section.mailboxes:
        problems.append("[distribution] mailboxes: at least one shared mailbox is needed when enabled")
    if section.enabled and not (section.master_user and section.master_password):
        problems.append("[distribution] master_user/master_password: required when enabled")
    for mailbox in section.mailboxes:
        if "@" not in mailbox or any(c in mailbox for c in " *\r\n"):
            problems.append(f"[distribution] mailboxes: {mailbox!r} is not a mailbox address")
    for name in ("keyword", "undistributed_keyword"):
        value = getattr(section, name)
        if not value or any(c in value for c in ' ()"{%*]\\\r\n'):
            problems.append(f"[distribution] {name}: {value!r} is not a valid IMAP keyword")
    if section.initial not in ("new", "all"):
        problems.append(f"[distribution] initial: new or all (got {section.initial!r})")
    if section.poll_interval <= 0 or section.idle_renew <= 0:
        problems.append("[distribution] poll_interval/idle_renew: must be positive")
    if section.idle_renew > 29 * 60:
        problems.append("[distribution] idle_renew: must be below 29 minutes (RFC 2177)")
    if section.reconnect_initial <= 0 or section.reconnect_max < section.reconnect_initial:
        problems.append("[distribution] reconnect_initial/reconnect_max: need 0 < initial <= max")
    if not 1 <= section.batch_size <= 10000:
        problems.append("[distribution] batch_size: must be 1-10000")
    if section.max_message_size < 1024:
        problems.append("[distribution] max_message_size: too small")
    if section.load_window_hours <= 0:
        problems.append("[distribution] load_window_hours: must be positive")
    return problems
