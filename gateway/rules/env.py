"""What rules may know besides the message: groups, departments, the clock and
the history of domains already written to.  One ``RuleEnv`` per loaded rule set."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger("mailgate.rules")


class DepartmentIndex:
    """Department names -> ids, sub-departments included; refreshed from the DB
    at most every ``ttl`` seconds (an unreachable DB keeps the last answer)."""

    def __init__(self, rows: Iterable[tuple[int, str, int | None]] | None = None, ttl: float = 60.0):
        self.ttl = ttl
        self._loaded_at = 0.0
        self._fixed = rows is not None
        self._names: dict[str, frozenset[int]] = {}
        self._lock = threading.Lock()
        if rows is not None:
            self._build(rows)

    def _build(self, rows: Iterable[tuple[int, str, int | None]]) -> None:
        rows = list(rows)
        children: dict[int | None, list[int]] = {}
        for did, _, parent in rows:
            children.setdefault(parent, []).append(did)

        def subtree(did: int) -> set[int]:
            out, todo = set(), [did]
            while todo:
                d = todo.pop()
                if d not in out:
                    out.add(d)
                    todo.extend(children.get(d, []))
            return out

        names: dict[str, set[int]] = {}
        for did, name, _ in rows:
            names.setdefault(name.strip().lower(), set()).update(subtree(did))
            names.setdefault(str(did), set()).update(subtree(did))
        self._names = {k: frozenset(v) for k, v in names.items()}

    def _maybe_refresh(self) -> None:
        if self._fixed or time.monotonic() - self._loaded_at < self.ttl:
            return
        with self._lock:
            if time.monotonic() - self._loaded_at < self.ttl:
                return
            self._loaded_at = time.monotonic()
            try:
                from gateway.db.models import Department

                self._build(Department.select(Department.id, Department.name, Department.parent).tuples())
            except Exception as exc:  # no DB bound (dry run without config) or DB down
                log.debug("department index not refreshed: %s", exc)

    def ids(self, name_or_id: str) -> frozenset[int]:
        self._maybe_refresh()
        return self._names.get(str(name_or_id).strip().lower(), frozenset())


class DomainHistory:
    """Which external domains (or, on public mail domains, exact addresses) the
    company has written to before.  Loaded once from the ``ContactedDomain``
    table; ``record`` adds what an accepted message reached."""

    def __init__(self, known: Iterable[str] | None = None):
        self._known: set[str] | None = set(known) if known is not None else None
        self._lock = threading.Lock()
        self._warned = False

    def _ensure(self) -> set[str]:
        if self._known is None:
            with self._lock:
                if self._known is None:
                    try:
                        from gateway.db.models import ContactedDomain

                        self._known = {k for (k,) in ContactedDomain.select(ContactedDomain.key).tuples()}
                    except Exception as exc:
                        if not self._warned:
                            self._warned = True
                            log.warning("contact history unavailable, every domain counts as known: %s", exc)
                        return _EVERYTHING
        return self._known

    def seen(self, key: str) -> bool:
        return key in self._ensure()

    def record(self, keys: Iterable[str], employee_id: int | None = None) -> None:
        """Blocking (DB write): call from a worker thread after a message is accepted."""
        known = self._ensure()
        new = [k for k in dict.fromkeys(keys) if k not in known]
        if not new:
            return
        from gateway.db.models import ContactedDomain

        for key in new:
            ContactedDomain.insert(key=key, first_employee=employee_id).on_conflict_ignore().execute()
            known.add(key)


class _Everything(set):
    def __contains__(self, item: object) -> bool:
        return True


_EVERYTHING = _Everything()


def local_now() -> dt.datetime:
    return dt.datetime.now().astimezone()


@dataclass
class RuleEnv:
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    departments: DepartmentIndex = field(default_factory=DepartmentIndex)
    history: DomainHistory = field(default_factory=DomainHistory)
    clock: Callable[[], dt.datetime] = local_now
    company: str = ""
    company_domains: tuple[str, ...] = ()
