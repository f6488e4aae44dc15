"""Dashboard (仪表盘): what a manager checks in the morning — mail sent and received per
person, blocked sends, pending approvals, customers with no contact for N days — with
charts drawn on the server as SVG (no JavaScript, nothing inline that the CSP forbids:
the bars' sizes are SVG attributes, their colours classes in app.css).

Scope (server-side): a salesperson sees their own numbers, a department head the
departments they head, a CRM administrator everyone (``panel.scope.visible_employee_ids``).
IT administrators and auditors get 403: the page is about people's sales work, which
is not theirs to watch (the auditor reads mail in the archive area, with its own log).
The numbers come from panel/stats.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bottle

from panel import i18n, stats
from panel.scope import visible_employee_ids
from panel.web import current_user, int_arg, render, require

VIEWERS = ("salesperson", "dept_head", "crm_admin")
NAV = [("/dashboard", "nav.dashboard", VIEWERS)]
DAY_CHOICES = (7, 14, 30, 90)
DEFAULT_DAYS = 14
DEFAULT_STALE = 30
SERIES = ("sent", "received", "blocked")

i18n.register({
    "zh-CN": {
        "nav.dashboard": "仪表盘",
        "dash.title": "仪表盘",
        "dash.scope.all": "全公司",
        "dash.scope.team": "本部门",
        "dash.scope.self": "我自己",
        "dash.days": "统计天数",
        "dash.stale_days": "未联系天数 N",
        "dash.show": "显示",
        "dash.sent": "发出",
        "dash.received": "收到",
        "dash.blocked": "被拦截",
        "dash.held": "待审核扣留",
        "dash.pending": "待审核",
        "dash.stale": "超过 {n} 天未联系的客户",
        "dash.by_day": "每日邮件",
        "dash.by_person": "按员工",
        "dash.person": "员工",
        "dash.no_people": "没有可显示的员工。",
        "dash.stale_empty": "没有超过 {n} 天未联系的客户。",
        "dash.customer": "客户",
        "dash.owners": "负责人",
        "dash.last_contact": "最后联系",
        "dash.never": "从未联系",
        "dash.days_ago": "{n} 天前",
        "dash.blocked_recent": "最近被拦截的发信",
        "dash.blocked_empty": "这段时间没有被拦截的发信。",
        "dash.when": "时间 (UTC)",
        "dash.from": "发件人",
        "dash.to": "收件人",
        "dash.subject": "主题",
        "dash.reason": "原因",
        "dash.open_approvals": "去审核",
        "dash.chart_label": "最近 {n} 天每日发出、收到和被拦截的邮件数",
    },
    "en": {
        "nav.dashboard": "Dashboard",
        "dash.title": "Dashboard",
        "dash.scope.all": "Whole company",
        "dash.scope.team": "My departments",
        "dash.scope.self": "Just me",
        "dash.days": "Days",
        "dash.stale_days": "No contact for N days",
        "dash.show": "Show",
        "dash.sent": "Sent",
        "dash.received": "Received",
        "dash.blocked": "Blocked",
        "dash.held": "Held for approval",
        "dash.pending": "Pending approvals",
        "dash.stale": "Customers without contact for {n} days",
        "dash.by_day": "Mail per day",
        "dash.by_person": "Per person",
        "dash.person": "Employee",
        "dash.no_people": "Nobody to show.",
        "dash.stale_empty": "No customer has gone {n} days without contact.",
        "dash.customer": "Customer",
        "dash.owners": "Owners",
        "dash.last_contact": "Last contact",
        "dash.never": "never",
        "dash.days_ago": "{n} days ago",
        "dash.blocked_recent": "Recently blocked sends",
        "dash.blocked_empty": "No blocked sends in this period.",
        "dash.when": "When (UTC)",
        "dash.from": "From",
        "dash.to": "To",
        "dash.subject": "Subject",
        "dash.reason": "Reason",
        "dash.open_approvals": "Review",
        "dash.chart_label": "Mail sent, received and blocked per day, last {n} days",
    },
})


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: str
    title: str


@dataclass
class Chart:
    """An SVG chart: bars and labels in a fixed viewBox (the SVG scales to its box)."""

    width: int
    height: int
    bars: list[Bar]
    labels: list[tuple[float, float, str, str]]  # x, y, text, anchor
    grid: list[tuple[float, str]]  # y, value label


def _nice_step(value: int, ticks: int = 4) -> int:
    """A round tick step (1, 2, 5 × 10^k) so that ``ticks`` steps reach at least ``value``."""
    target = max(1, value) / ticks
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= target:
                return m * step
        step *= 10


def _nice_max(value: int) -> int:
    """A round axis maximum ≥ value (a whole number of ticks)."""
    step = _nice_step(value)
    return step * max(1, -(-max(1, value) // step))


def day_chart(summary: stats.Summary, names: dict[str, str]) -> Chart:
    """Grouped bars per day: sent, received, blocked."""
    width, height, left, bottom, top = 760, 240, 36, 28, 10
    plot_h = height - bottom - top
    days = summary.days
    peak = _nice_max(max((getattr(summary.by_day[d], s) for d in days for s in SERIES), default=0))
    slot = (width - left - 4) / max(1, len(days))
    bar_w = max(1.0, min(14.0, (slot - 4) / len(SERIES)))
    bars: list[Bar] = []
    labels: list[tuple[float, float, str, str]] = []
    every = max(1, len(days) // 10)
    for i, day in enumerate(days):
        counts = summary.by_day[day]
        x0 = left + i * slot + (slot - bar_w * len(SERIES)) / 2
        for j, series in enumerate(SERIES):
            n = getattr(counts, series)
            h = plot_h * n / peak
            bars.append(Bar(round(x0 + j * bar_w, 1), round(top + plot_h - h, 1), round(bar_w - 1, 1), round(h, 1),
                            series, f"{day:%m-%d} {names[series]}: {n}"))
        if i % every == 0:
            labels.append((round(left + i * slot + slot / 2, 1), height - 10, f"{day:%m-%d}", "middle"))
    step = _nice_step(peak)
    grid = [(round(top + plot_h - plot_h * v / peak, 1), str(v)) for v in range(0, peak + 1, step)]
    return Chart(width, height, bars, labels, grid)


def person_chart(summary: stats.Summary, names: dict[str, str], limit: int = 15) -> Chart:
    """Horizontal bars per person: sent and received (the busiest first)."""
    people = [p for p in summary.people if p.total.sent or p.total.received or p.total.blocked][:limit]
    row_h, left, width = 30, 150, 760
    height = max(40, row_h * len(people) + 10)
    peak = _nice_max(max((max(p.total.sent, p.total.received) for p in people), default=0))
    span = width - left - 50
    bars: list[Bar] = []
    labels: list[tuple[float, float, str, str]] = []
    for i, p in enumerate(people):
        y = 5 + i * row_h
        name = p.name if len(p.name) <= 18 else p.name[:17] + "…"
        labels.append((left - 6, y + 17, name, "end"))
        for j, series in enumerate(("sent", "received")):
            n = getattr(p.total, series)
            w = span * n / peak
            bars.append(Bar(left, y + 2 + j * 12, round(max(w, 0.5 if n else 0), 1), 11, series,
                            f"{p.name} {names[series]}: {n}"))
            labels.append((round(left + w + 4, 1), y + 12 + j * 12, str(n), "start"))
    return Chart(width, height, bars, labels, [])


def routes(app: bottle.Bottle) -> None:
    @app.get("/dashboard")
    @require(*VIEWERS)
    def index() -> str:
        user = current_user()
        q = bottle.request.query
        days = int_arg(q.get("days"), DEFAULT_DAYS)
        days = days if days in DAY_CHOICES else DEFAULT_DAYS
        stale_days = max(1, min(int_arg(q.get("stale"), DEFAULT_STALE), 3650))
        ids = visible_employee_ids(user)
        scope = "all" if ids is None else ("self" if ids <= {user.employee_id} else "team")
        summary = stats.summary(ids, days=days, stale_days=stale_days)
        names = {s: i18n.t("dash." + s) for s in SERIES}
        context: dict[str, Any] = {
            "s": summary, "days": days, "stale_days": stale_days, "day_choices": DAY_CHOICES, "scope": scope,
            "day_chart": day_chart(summary, names), "person_chart": person_chart(summary, names),
            "series": [(s, names[s]) for s in SERIES],
        }
        return render("dashboard/index.html", **context)
