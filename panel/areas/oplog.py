"""The operation log (操作日记): every change made in the panel and every approval
decision — who, when, what — filterable by actor, action and date, newest first.

Who may read it (server-side, ``@require``): it_admin (runs the system), crm_admin
(answers for the CRM data) and auditor (read-only oversight).  Salespeople and
department heads get 403: the log names every employee's actions, not only theirs.
Nothing here writes; the log itself is append-only and hash-chained (gateway/oplog.py),
and the page says whether the chain is intact when asked (``?verify=1``).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import bottle

from gateway import oplog as chain
from gateway.db.models import AuditLog
from panel import i18n
from panel.web import int_arg, paginate, render, require

READERS = ("it_admin", "crm_admin", "auditor")
NAV = [("/oplog", "nav.oplog", READERS)]
MAX_FILTER = 200

i18n.register({
    "zh-CN": {
        "nav.oplog": "操作日记",
        "oplog.title": "操作日记",
        "oplog.intro": "面板中的每一次修改、每一次审核决定和每一次登录，按时间倒序。",
        "oplog.actor": "操作人",
        "oplog.action": "操作",
        "oplog.any_action": "全部操作",
        "oplog.target": "对象",
        "oplog.details": "详情",
        "oplog.at": "时间 (UTC)",
        "oplog.from": "起始日期",
        "oplog.to": "截止日期",
        "oplog.filter": "筛选",
        "oplog.reset": "清除",
        "oplog.empty": "没有符合条件的记录。",
        "oplog.bad_date": "日期格式应为 YYYY-MM-DD：{value}",
        "oplog.verify": "校验完整性",
        "oplog.intact": "日志链完整（{n} 条记录）。",
        "oplog.broken": "日志链已被篡改：",
    },
    "en": {
        "nav.oplog": "Operation log",
        "oplog.title": "Operation log",
        "oplog.intro": "Every change made in the panel, every approval decision and every sign-in, newest first.",
        "oplog.actor": "Who",
        "oplog.action": "Action",
        "oplog.any_action": "All actions",
        "oplog.target": "Target",
        "oplog.details": "Details",
        "oplog.at": "When (UTC)",
        "oplog.from": "From",
        "oplog.to": "To",
        "oplog.filter": "Filter",
        "oplog.reset": "Clear",
        "oplog.empty": "No entries match.",
        "oplog.bad_date": "A date is YYYY-MM-DD: {value}",
        "oplog.verify": "Verify integrity",
        "oplog.intact": "The chain is intact ({n} entries).",
        "oplog.broken": "The chain has been tampered with:",
    },
})


def _date(value: str) -> dt.date | None:
    """A YYYY-MM-DD date, or None if empty; ValueError if malformed."""
    value = value.strip()
    return dt.date.fromisoformat(value) if value else None


def _details(text: str) -> str:
    """Details as compact readable text (JSON pretty enough for one table cell)."""
    if not text:
        return ""
    try:
        data = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(data, dict):
        return "; ".join(f"{k}: {_value(v)}" for k, v in data.items())[:2000]
    return json.dumps(data, ensure_ascii=False)[:2000]


def _value(v: Any) -> str:
    """One detail value: a change {"old": a, "new": b} as "a → b", text as is, the rest as JSON."""
    if isinstance(v, dict) and set(v) == {"old", "new"}:
        return f"{_value(v['old'])} → {_value(v['new'])}"
    if v is None:
        return "—"
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def filtered(actor: str = "", action: str = "", since: dt.date | None = None, until: dt.date | None = None,
             target: str = "") -> Any:
    """The AuditLog query for the filters (newest first).

    ``actor`` and ``target`` match a substring (case-insensitive); ``action`` matches
    exactly or, ending in ``.``, a prefix (``customer.`` = every customer action);
    ``since``/``until`` are inclusive UTC calendar days.
    """
    q = AuditLog.select()
    if actor:
        q = q.where(AuditLog.actor.contains(actor))
    if action:
        q = q.where(AuditLog.action.startswith(action) if action.endswith(".") else AuditLog.action == action)
    if target:
        q = q.where(AuditLog.target.contains(target))
    if since:
        q = q.where(AuditLog.at >= dt.datetime.combine(since, dt.time()))
    if until:
        q = q.where(AuditLog.at < dt.datetime.combine(until + dt.timedelta(days=1), dt.time()))
    return q.order_by(AuditLog.id.desc())


def _actions() -> list[str]:
    """The distinct actions (for the filter's choices), plus their area prefixes."""
    names = [a for (a,) in AuditLog.select(AuditLog.action).distinct().order_by(AuditLog.action).tuples()]
    prefixes = sorted({a.split(".", 1)[0] + "." for a in names if "." in a})
    return sorted(set(names) | set(prefixes))


def routes(app: bottle.Bottle) -> None:
    @app.get("/oplog")
    @require(*READERS)
    def index() -> str:
        q = bottle.request.query
        form = {name: (q.getunicode(name) or "").strip()[:MAX_FILTER]
                for name in ("actor", "action", "target", "from", "to")}
        error = ""
        try:
            since, until = _date(form["from"]), _date(form["to"])
        except ValueError:
            bad = form["from"] if form["from"] and not _valid(form["from"]) else form["to"]
            error = i18n.t("oplog.bad_date", value=bad)
            since = until = None
            bottle.response.status = 400
        query = filtered(form["actor"].lower() if "@" in form["actor"] else form["actor"], form["action"],
                         since, until, form["target"])
        page = paginate(query, q.get("page"))
        rows = [{"e": e, "at": f"{e.at:%Y-%m-%d %H:%M:%S}", "details": _details(e.details)} for e in page.items]
        integrity = None
        if int_arg(q.get("verify"), 0):
            problems = chain.verify()
            integrity = {"ok": not problems, "problems": problems[:20], "count": AuditLog.select().count()}
        return render("oplog/index.html", form=form, rows=rows, page=page, actions=_actions(), error=error,
                      integrity=integrity)


def _valid(value: str) -> bool:
    try:
        _date(value)
    except ValueError:
        return False
    return True
