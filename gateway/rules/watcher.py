"""Hot reload of rules/*.yaml.

``watch_rules`` polls the files' (mtime, size, inode) about once a second.
On any change the whole directory is loaded again (in a worker thread); only a
set without errors is swapped in, with one assignment (``Policy.replace_rules``).
A broken edit leaves the running rules enforcing; the errors are logged and
kept in ``STATUS`` (and in ``<data_dir>/rules-status.json`` for `mailgate
check` and the panel in other processes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.rules.loader import load_rules

log = logging.getLogger("mailgate.rules")

STATUS_FILE = "rules-status.json"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class RuleStatus:
    """What the running node enforces, and why the last edit was refused (if it was)."""

    loaded_at: str = ""
    rule_count: int = 0
    rule_names: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # of the last refused edit; [] when it loaded
    refused_at: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


STATUS = RuleStatus()


def snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for path in [*directory.glob("*.yaml"), *directory.glob("*.yml")]:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out[path.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


def write_status(status: RuleStatus, path: Path | None) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(status.as_dict(), ensure_ascii=False, indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)


def read_status(cfg: Config) -> dict[str, Any] | None:
    """The running node's rule status (None if it has not written one)."""
    try:
        return json.loads((cfg.node.data_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


class RuleReloader:
    """One reload decision at a time; the async loop below just calls ``poll``."""

    def __init__(self, policy: Any, directory: Path, status: RuleStatus = STATUS,
                 status_path: Path | None = None, loader: Callable = load_rules, **load_kwargs: Any):
        self.policy = policy
        self.directory = Path(directory)
        self.status = status
        self.status_path = status_path
        self.loader = loader
        self.load_kwargs = load_kwargs
        self.seen: dict[str, tuple[int, int, int]] | None = None

    def changed(self) -> bool:
        return snapshot(self.directory) != self.seen

    def reload(self) -> bool:
        """Load the whole set; swap it in only if it has no errors.  Blocking."""
        self.seen = snapshot(self.directory)
        rules, errors = self.loader(self.directory, **self.load_kwargs)
        if errors:
            self.status.errors = errors
            self.status.refused_at = _now()
            for e in errors:
                log.error("rules not reloaded, the previous rules stay in force: %s", e)
            write_status(self.status, self.status_path)
            return False
        self.policy.replace_rules(rules)
        self.status.loaded_at = _now()
        self.status.rule_count = len(rules)
        self.status.rule_names = [r.name for r in rules]
        self.status.errors = []
        self.status.refused_at = ""
        log.info("rules loaded: %d rules from %s", len(rules), self.directory)
        write_status(self.status, self.status_path)
        return True

    def poll(self) -> bool | None:
        """Reload if anything changed: True loaded, False refused, None unchanged."""
        if not self.changed():
            return None
        return self.reload()


async def watch_rules(policy: Any, cfg: Config, stop_event: asyncio.Event, *, interval: float = 1.0,
                      reloader: RuleReloader | None = None,
                      on_poll: Callable[[bool | None], None] | None = None) -> None:
    """Reload cfg.rules.dir whenever it changes, until ``stop_event`` is set.

    Call ``initial_load`` first at start-up; this loop only follows changes."""
    reloader = reloader or RuleReloader(policy, cfg.rules.dir, status_path=cfg.node.data_dir / STATUS_FILE)
    if reloader.seen is None:
        reloader.seen = snapshot(reloader.directory)
    while not stop_event.is_set():
        try:
            result = await asyncio.to_thread(reloader.poll)
        except Exception:
            log.exception("rule reload failed; the previous rules stay in force")
            result = False
        if on_poll is not None:
            on_poll(result)
        try:
            await asyncio.wait_for(stop_event.wait(), interval)
        except TimeoutError:
            pass


def initial_load(policy: Any, cfg: Config, **load_kwargs: Any) -> RuleReloader:
    """Start-up: load the rules or raise RuntimeError listing every problem
    (a node must not start with a broken rule set).  Blocking."""
    reloader = RuleReloader(policy, cfg.rules.dir, status_path=cfg.node.data_dir / STATUS_FILE, **load_kwargs)
    if not reloader.reload():
        raise RuntimeError("rules: " + "; ".join(reloader.status.errors))
    return reloader
