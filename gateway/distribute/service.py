"""Running the watchers: inside `mailgate run` (``start``) or alone (`mailgate distribute run`).

One thread per shared mailbox, each with its own Distributor (its own APPEND connections);
they share the directory and the rule set.  Stopping sets an event; IDLE waits check it
every second, so a stop takes about a second.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from gateway.config import Config
from gateway.directory import Directory
from gateway.distribute import manage
from gateway.distribute.deliver import Appender
from gateway.distribute.engine import Distributor
from gateway.distribute.imapconn import connector
from gateway.distribute.rules import RuleReloader
from gateway.distribute.watcher import MailboxWatcher
from gateway.spool import Spool

log = logging.getLogger("mailgate.distribute")


class RulesError(RuntimeError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("distribution rules have errors:\n  " + "\n  ".join(errors))


class Runner:
    def __init__(self, cfg: Config, directory: Directory, spool: Spool, *, wake: Callable[[], None] | None = None,
                 refresh_directory: bool = False, connect: Callable[[str], Any] | None = None):
        self.cfg = cfg
        self.directory = directory
        self.spool = spool
        self.wake = wake
        self.refresh_directory = refresh_directory
        self.connect = connect or connector(cfg)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.watchers: list[MailboxWatcher] = []
        self.distributors: list[Distributor] = []
        self.reloader = RuleReloader(cfg.distribution.rules_dir, on_load=self._use_rules)
        self._lock = threading.Lock()

    def _use_rules(self, ruleset: Any) -> None:
        for d in self.distributors:
            d.set_rules(ruleset)
        log.info("distribution rules loaded: %d rules, %d groups from %s", len(ruleset.rules),
                 len(ruleset.groups), self.cfg.distribution.rules_dir)

    def _round(self) -> None:
        with self._lock:
            self.reloader.check()
            if self.refresh_directory:
                self.directory.refresh()

    def start(self) -> None:
        errors = self.reloader.initial()
        if errors:
            raise RulesError(errors)
        for mailbox in self.cfg.distribution.mailboxes:
            mailbox = mailbox.lower()
            distributor = Distributor(self.cfg, self.directory, self.spool, rules=self.reloader.ruleset,
                                      appender=Appender(self.connect, self.cfg.distribution.append_folder),
                                      wake=self.wake)
            self.distributors.append(distributor)
            watcher = MailboxWatcher(distributor, self.connect, mailbox, self.stop_event, on_round=self._round)
            self.watchers.append(watcher)
            thread = threading.Thread(target=self._run, args=(watcher,), name=f"distribute-{mailbox}", daemon=True)
            self.threads.append(thread)
            thread.start()

    @staticmethod
    def _run(watcher: MailboxWatcher) -> None:
        try:
            watcher.run()
        except Exception:
            log.exception("distribution watcher for %s died", watcher.mailbox)
        finally:
            if watcher.distributor.appender is not None:
                watcher.distributor.appender.close()

    def stop(self, timeout: float = 15.0) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout)


async def start(node: Any, reactor: Any = None) -> Callable[[], Any] | None:
    """The distribution service inside `mailgate run`; None when disabled."""
    cfg = node.cfg
    if not cfg.distribution.enabled:
        return None
    runner = Runner(cfg, node.directory, node.spool, wake=node.wake_relay)
    await asyncio.to_thread(runner.start)
    manage.WAKE = node.wake_relay

    async def stop() -> None:
        await asyncio.to_thread(runner.stop)

    return stop
