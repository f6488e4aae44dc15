"""Distribution (邮件分发): the undistributed list, dispatch by hand, mappings, reject list, history.

Department heads and CRM administrators only (salespeople and everyone else get 403);
every check is on the server.  The work is done by ``gateway.distribute.manage``, which
writes each change to the operation log with the signed-in user as actor (the panel
does not log it a second time).

The message itself is read from the shared mailbox (IMAP, the ``[distribution]``
master user) and shown through panel/preview.py: text escaped, the HTML part
sanitized and served from its own URL under a strict CSP inside ``<iframe sandbox>``.
When the shared copy cannot be read, the excerpt stored with the record is shown.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import bottle

from gateway.db.models import Employee
from gateway.distribute import manage
from gateway.distribute.engine import DispatchError
from gateway.distribute.router import list_keys
from gateway.distribute.schema import STATES, UNDISTRIBUTED, DistMapping, DistReject, Distribution
from panel import i18n
from panel.preview import HTML_CSP, IFRAME_SANDBOX, NOTE_TEXTS, Preview, build_preview, html_document
from panel.web import (
    current_user,
    flash,
    form_value,
    not_found,
    paginate,
    panel_config,
    redirect,
    render,
    require,
    t,
)

log = logging.getLogger("mailgate.panel.distribution")

ROLES = ("dept_head", "crm_admin")
NAV = [("/distribution", "nav.distribution", ROLES)]
STEPS = ("reply", "customer", "mapping", "rule", "reject", "none", "loop", "manual")

i18n.register({
    "zh-CN": {
        "nav.distribution": "邮件分发",
        "dist.title": "邮件分发",
        "dist.undistributed": "未分发",
        "dist.history": "分发记录",
        "dist.lists": "映射与拒收",
        "dist.empty": "没有未分发的邮件。",
        "dist.history_empty": "没有符合条件的记录。",
        "dist.counts": "已分发 {distributed} · 未分发 {undistributed} · 已拒收 {rejected}",
        "dist.col.received": "收到时间",
        "dist.col.from": "发件人",
        "dist.col.subject": "主题",
        "dist.col.excerpt": "摘要",
        "dist.col.state": "状态",
        "dist.col.step": "依据",
        "dist.col.to": "分发给",
        "dist.col.reason": "原因",
        "dist.col.actor": "处理人",
        "dist.col.mailbox": "共享邮箱",
        "dist.col.key": "地址或域名",
        "dist.col.employee": "员工",
        "dist.col.note": "备注",
        "dist.col.created": "创建",
        "dist.open": "查看",
        "dist.detail": "共享邮件 #{id}",
        "dist.state.distributed": "已分发",
        "dist.state.undistributed": "未分发",
        "dist.state.rejected": "已拒收",
        "dist.step.reply": "回复",
        "dist.step.customer": "客户",
        "dist.step.mapping": "固定分配",
        "dist.step.rule": "规则",
        "dist.step.reject": "拒收",
        "dist.step.none": "无",
        "dist.step.loop": "回环",
        "dist.step.manual": "手动",
        "dist.dispatch": "分发给员工",
        "dist.dispatch_button": "分发",
        "dist.note": "备注（可选）",
        "dist.employee": "员工",
        "dist.mapping": "总是把此地址/域名分给",
        "dist.mapping_button": "保存固定分配",
        "dist.mapping_also": "同时把这封邮件分发给该员工",
        "dist.customer": "用这封邮件创建客户",
        "dist.customer_name": "客户名称",
        "dist.customer_owner": "负责人",
        "dist.customer_domain": "把发件人的公司域名也归入客户（公共邮箱域名除外）",
        "dist.customer_button": "创建客户",
        "dist.reject": "加入拒收名单",
        "dist.reject_button": "拒收",
        "dist.reject_hint": "此后来自该地址/域名的邮件移入垃圾邮件，不再分发；这封邮件也移入垃圾邮件。",
        "dist.key": "地址或域名",
        "dist.dispatched": "已分发给 {email}。",
        "dist.mapped": "已保存：{entry} → {email}。",
        "dist.customer_created": "已创建客户“{name}”。",
        "dist.rejected": "已把 {entry} 加入拒收名单。",
        "dist.removed": "已删除 {entry}。",
        "dist.failed": "无法完成：{error}",
        "dist.not_undistributed": "这封邮件已处理（{state}），不能再操作。",
        "dist.fetch_failed": "无法从共享邮箱读取原邮件（{error}），只显示保存的摘要。",
        "dist.excerpt": "摘要",
        "dist.headers": "邮件头",
        "dist.text": "正文",
        "dist.html": "HTML 预览（已去除脚本和外部内容）",
        "dist.attachments": "附件",
        "dist.no_attachments": "没有附件。",
        "dist.bytes": "{n} 字节",
        "dist.filter": "筛选",
        "dist.filter.any": "全部",
        "dist.filter.sender": "发件人包含",
        "dist.filter.since": "从（日期）",
        "dist.filter.until": "到（日期，不含）",
        "dist.mappings": "固定分配",
        "dist.rejects": "拒收名单",
        "dist.remove": "删除",
        "dist.add": "添加",
        "dist.none_yet": "暂无。",
        "dist.bad_date": "日期格式应为 YYYY-MM-DD。",
    },
    "en": {
        "nav.distribution": "Distribution",
        "dist.title": "Shared-mailbox distribution",
        "dist.undistributed": "Undistributed",
        "dist.history": "History",
        "dist.lists": "Mappings and reject list",
        "dist.empty": "Nothing is waiting to be distributed.",
        "dist.history_empty": "No records match.",
        "dist.counts": "distributed {distributed} · undistributed {undistributed} · rejected {rejected}",
        "dist.col.received": "Received",
        "dist.col.from": "From",
        "dist.col.subject": "Subject",
        "dist.col.excerpt": "Excerpt",
        "dist.col.state": "State",
        "dist.col.step": "Why",
        "dist.col.to": "Sent to",
        "dist.col.reason": "Reason",
        "dist.col.actor": "By",
        "dist.col.mailbox": "Shared mailbox",
        "dist.col.key": "Address or domain",
        "dist.col.employee": "Employee",
        "dist.col.note": "Note",
        "dist.col.created": "Created",
        "dist.open": "Open",
        "dist.detail": "Shared message #{id}",
        "dist.state.distributed": "distributed",
        "dist.state.undistributed": "undistributed",
        "dist.state.rejected": "rejected",
        "dist.step.reply": "reply",
        "dist.step.customer": "customer",
        "dist.step.mapping": "mapping",
        "dist.step.rule": "rule",
        "dist.step.reject": "reject list",
        "dist.step.none": "none",
        "dist.step.loop": "loop",
        "dist.step.manual": "by hand",
        "dist.dispatch": "Dispatch to an employee",
        "dist.dispatch_button": "Dispatch",
        "dist.note": "Note (optional)",
        "dist.employee": "Employee",
        "dist.mapping": "Always send this address/domain to",
        "dist.mapping_button": "Save mapping",
        "dist.mapping_also": "Also dispatch this message to that employee",
        "dist.customer": "Create a customer from this message",
        "dist.customer_name": "Customer name",
        "dist.customer_owner": "Owner",
        "dist.customer_domain": "Include the sender's company domain (not public mail domains)",
        "dist.customer_button": "Create customer",
        "dist.reject": "Add to the reject list",
        "dist.reject_button": "Reject",
        "dist.reject_hint": "Mail from this address/domain goes to Junk and is never distributed; "
                            "this message goes to Junk too.",
        "dist.key": "Address or domain",
        "dist.dispatched": "Dispatched to {email}.",
        "dist.mapped": "Saved: {entry} → {email}.",
        "dist.customer_created": "Customer “{name}” created.",
        "dist.rejected": "{entry} is on the reject list.",
        "dist.removed": "{entry} removed.",
        "dist.failed": "Could not do that: {error}",
        "dist.not_undistributed": "This message has been handled ({state}); nothing more to do.",
        "dist.fetch_failed": "The original could not be read from the shared mailbox ({error}); "
                             "showing the stored excerpt.",
        "dist.excerpt": "Excerpt",
        "dist.headers": "Headers",
        "dist.text": "Text",
        "dist.html": "HTML preview (scripts and remote content removed)",
        "dist.attachments": "Attachments",
        "dist.no_attachments": "No attachments.",
        "dist.bytes": "{n} bytes",
        "dist.filter": "Filter",
        "dist.filter.any": "any",
        "dist.filter.sender": "Sender contains",
        "dist.filter.since": "From (date)",
        "dist.filter.until": "Until (date, exclusive)",
        "dist.mappings": "Mappings",
        "dist.rejects": "Reject list",
        "dist.remove": "Remove",
        "dist.add": "Add",
        "dist.none_yet": "None yet.",
        "dist.bad_date": "Dates are YYYY-MM-DD.",
    },
})


# The preview notes (shared with the approvals area, which may have registered them already).
PREVIEW_NOTES_ZH = {
    "malformed": "邮件结构已损坏，预览可能不完整。",
    "defects": "邮件的 MIME 格式有缺陷，预览可能不完整。",
    "too_large": "邮件很大，只读取了开头部分。",
    "text_truncated": "正文过长，只显示开头部分。",
    "html_truncated": "HTML 过长，只显示开头部分。",
    "too_many_attachments": "附件太多，未全部列出。",
    "charset": "部分文字的字符集未知或有误，无法识别的字节显示为 �。",
    "remote_images": "已阻止外部图片。",
    "empty": "邮件没有可读的正文。",
}
i18n.register({lang: {f"preview.note.{code}": text for code, text in notes.items()
                     if f"preview.note.{code}" not in i18n.CATALOG[lang]}
               for lang, notes in (("zh-CN", PREVIEW_NOTES_ZH), ("en", NOTE_TEXTS))})

# -- helpers ------------------------------------------------------------------------------


def _record(record_id: int) -> Distribution:
    rec = Distribution.get_or_none(Distribution.id == record_id)
    if rec is None:
        not_found()
    return rec


def _employees() -> list[Employee]:
    """Active employees who can receive inquiries (shared mailboxes left out)."""
    return [e for e in Employee.select().where(Employee.active == True).order_by(Employee.email)  # noqa: E712
            if "shared" not in e.role_set]


def _node_directory() -> Any:
    """The node's directory inside `mailgate run` (None under `mailgate panel serve`: one is loaded)."""
    node = getattr(bottle.request.app.mailgate, "node", None)
    return getattr(node, "directory", None)


def _when(value: dt.datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC" if value else ""


def _fetch(rec: Distribution) -> tuple[Preview | None, str]:
    """The preview of the shared copy, or (None, why not)."""
    try:
        raw = manage.fetch_shared(panel_config(), rec)
    except Exception as exc:  # noqa: BLE001 - shown to the manager; the excerpt stays usable
        log.warning("distribution %s: shared copy not readable: %s", rec.id, exc)
        return None, str(exc) if isinstance(exc, DispatchError) else type(exc).__name__
    return build_preview(raw), ""


def _parse_date(value: str) -> dt.datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        return dt.datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        return None


def _back(rec: Distribution) -> None:
    redirect(f"/distribution/{rec.id}" if rec.state == UNDISTRIBUTED else "/distribution")


def _undistributed_or_back(rec: Distribution) -> None:
    if rec.state != UNDISTRIBUTED:
        flash(t("dist.not_undistributed", state=t("dist.state." + rec.state)))
        redirect(f"/distribution/{rec.id}")


# -- routes -------------------------------------------------------------------------------


def routes(app: Any) -> None:
    @app.get("/distribution")
    @require(*ROLES)
    def index() -> str:
        q = Distribution.select().where(Distribution.state == UNDISTRIBUTED).order_by(Distribution.id.desc())
        page = paginate(q, bottle.request.query.get("page"))
        counts = {s: 0 for s in STATES}
        counts.update(manage.counts())
        return render("distribution/index.html", page=page, counts=counts, when=_when)

    @app.get("/distribution/history")
    @require(*ROLES)
    def history() -> str:
        query = bottle.request.query
        state = query.getunicode("state") or ""
        step = query.getunicode("step") or ""
        flt = manage.HistoryFilter(
            state=state if state in STATES else "", step=step if step in STEPS else "",
            employee=(query.getunicode("employee") or "")[:320], sender=(query.getunicode("sender") or "")[:320],
            mailbox=(query.getunicode("mailbox") or "")[:320],
            since=_parse_date(query.getunicode("since") or ""), until=_parse_date(query.getunicode("until") or ""))
        bad_date = any((query.getunicode(k) or "").strip() and _parse_date(query.getunicode(k) or "") is None
                       for k in ("since", "until"))
        page = paginate(manage.history_query(flt).order_by(Distribution.id.desc()), query.get("page"))
        return render("distribution/history.html", page=page, flt=flt, states=STATES, steps=STEPS,
                      recipients=manage.recipients_of(page.items), employees=_employees(), when=_when,
                      bad_date=bad_date, since=query.getunicode("since") or "", until=query.getunicode("until") or "")

    @app.get("/distribution/lists")
    @require(*ROLES)
    def lists() -> str:
        mappings = list(DistMapping.select(DistMapping, Employee).join(Employee).order_by(DistMapping.key))
        rejects = list(DistReject.select().order_by(DistReject.key))
        return render("distribution/lists.html", mappings=mappings, rejects=rejects, employees=_employees(),
                      when=_when)

    @app.post("/distribution/lists/reject")
    @require(*ROLES)
    def add_reject() -> None:
        try:
            row = manage.add_reject(form_value("key", max_length=320), current_user().actor,
                                    form_value("note", max_length=1000))
            flash(t("dist.rejected", entry=row.key))
        except manage.ManageError as exc:
            flash(t("dist.failed", error=str(exc)))
        redirect("/distribution/lists")

    @app.post("/distribution/lists/reject/remove")
    @require(*ROLES)
    def remove_reject() -> None:
        key = form_value("key", max_length=320)
        try:
            if manage.remove_reject(key, current_user().actor):
                flash(t("dist.removed", entry=key))
        except manage.ManageError as exc:
            flash(t("dist.failed", error=str(exc)))
        redirect("/distribution/lists")

    @app.post("/distribution/lists/mapping")
    @require(*ROLES)
    def add_mapping() -> None:
        try:
            row = manage.set_mapping(form_value("key", max_length=320), form_value("employee", max_length=320),
                                     current_user().actor)
            flash(t("dist.mapped", entry=row.key, email=row.employee.email))
        except manage.ManageError as exc:
            flash(t("dist.failed", error=str(exc)))
        redirect("/distribution/lists")

    @app.post("/distribution/lists/mapping/remove")
    @require(*ROLES)
    def remove_mapping() -> None:
        key = form_value("key", max_length=320)
        try:
            if manage.remove_mapping(key, current_user().actor):
                flash(t("dist.removed", entry=key))
        except manage.ManageError as exc:
            flash(t("dist.failed", error=str(exc)))
        redirect("/distribution/lists")

    @app.get("/distribution/<record_id:int>")
    @require(*ROLES)
    def detail(record_id: int) -> str:
        rec = _record(record_id)
        preview, fetch_error = _fetch(rec) if rec.state == UNDISTRIBUTED else (None, "")
        recipients = manage.recipients_of([rec]).get(rec.id, [])
        domain = rec.from_addr.rpartition("@")[2]
        public = set(panel_config().public_mail_domains)
        return render("distribution/detail.html", rec=rec, preview=preview, fetch_error=fetch_error,
                      recipients=recipients, employees=_employees(), keys=list_keys(rec.from_addr)[:2],
                      company_domain=domain if domain and domain not in public else "",
                      html_url=f"/distribution/{rec.id}/message.html", sandbox=IFRAME_SANDBOX, when=_when)

    @app.get("/distribution/<record_id:int>/message.html")
    @require(*ROLES)
    def message_html(record_id: int) -> str:
        rec = _record(record_id)
        preview, _ = _fetch(rec)
        bottle.response.content_type = "text/html; charset=utf-8"
        bottle.response.set_header("Content-Security-Policy", HTML_CSP)
        bottle.response.set_header("X-Frame-Options", "SAMEORIGIN")
        bottle.response.set_header("Referrer-Policy", "no-referrer")
        if preview is None or preview.html is None:
            preview = Preview(html="")
        return html_document(preview, rec.subject)

    @app.post("/distribution/<record_id:int>/dispatch")
    @require(*ROLES)
    def dispatch(record_id: int) -> None:
        rec = _record(record_id)
        _undistributed_or_back(rec)
        employee = form_value("employee", max_length=320)
        try:
            manage.dispatch(panel_config(), rec.id, employee, current_user().actor, form_value("note", max_length=500),
                            directory=_node_directory())
        except (DispatchError, manage.ManageError) as exc:
            flash(t("dist.failed", error=str(exc)))
            redirect(f"/distribution/{rec.id}")
        flash(t("dist.dispatched", email=employee.strip().lower()))
        redirect("/distribution")

    @app.post("/distribution/<record_id:int>/mapping")
    @require(*ROLES)
    def mapping(record_id: int) -> None:
        rec = _record(record_id)
        key = form_value("key", max_length=320)
        employee = form_value("employee", max_length=320)
        actor = current_user().actor
        try:
            if manage.normalize_key(key) not in list_keys(rec.from_addr):
                raise manage.ManageError(f"{key} does not cover the sender {rec.from_addr}")
            row = manage.set_mapping(key, employee, actor)
            flash(t("dist.mapped", entry=row.key, email=row.employee.email))
            if form_value("also_dispatch", max_length=5) and rec.state == UNDISTRIBUTED:
                manage.dispatch(panel_config(), rec.id, employee, actor, f"mapping {row.key}",
                                directory=_node_directory())
                flash(t("dist.dispatched", email=row.employee.email))
        except (DispatchError, manage.ManageError) as exc:
            flash(t("dist.failed", error=str(exc)))
        _back(Distribution.get_by_id(rec.id))

    @app.post("/distribution/<record_id:int>/customer")
    @require(*ROLES)
    def customer(record_id: int) -> None:
        rec = _record(record_id)
        name = form_value("name", max_length=300)
        try:
            created = manage.create_customer_from(panel_config(), rec.id, name, form_value("owner", max_length=320),
                                                  current_user().actor, use_domain=bool(form_value("use_domain")))
            flash(t("dist.customer_created", name=created.name))
        except manage.ManageError as exc:
            flash(t("dist.failed", error=str(exc)))
        redirect(f"/distribution/{rec.id}")

    @app.post("/distribution/<record_id:int>/reject")
    @require(*ROLES)
    def reject(record_id: int) -> None:
        rec = _record(record_id)
        try:
            row = manage.reject_message(panel_config(), rec.id, form_value("key", max_length=320),
                                        current_user().actor, form_value("note", max_length=1000))
            flash(t("dist.rejected", entry=row.key))
        except manage.ManageError as exc:
            flash(t("dist.failed", error=str(exc)))
            redirect(f"/distribution/{rec.id}")
        redirect("/distribution")

