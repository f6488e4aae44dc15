"""Approvals (审核): the approver's queue, history, and the public approve/reject link pages.

Who sees (and may decide) an approval, checked on the server for every request:
the addresses in ``Approval.approvers``, the department head of the sender's
department (or of a department above it), and crm_admin.  Nobody decides their
own message in the panel.  Decisions go through ``gateway.approval.ApprovalService``
(which writes them to the operation log with the actor given here — the panel does
not log them a second time).

The e-mailed links (``cfg.approval.link_base_url`` + ``/approve?t=…`` or
``/reject?t=…``) need no sign-in: the signed, single-use, expiring token is the
credential.  A GET only verifies the token and shows the message and a confirm
form; the POST (CSRF-checked like every form) decides.  The message HTML is never
inlined: it is served sanitized (panel/preview.py) from its own URL with a strict
CSP, inside ``<iframe sandbox>``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bottle

from gateway.approval import PENDING, ApprovalError, ApprovalService, verify_token
from gateway.db.models import Approval, ArchiveRecord, Department, Employee, UsedApprovalToken, utcnow
from panel import i18n
from panel.preview import (
    HTML_CSP,
    IFRAME_SANDBOX,
    NOTE_TEXTS,
    Preview,
    build_preview,
    decode_header_value,
    html_document,
)
from panel.web import (
    User,
    current_user,
    flash,
    forbidden,
    form_value,
    not_found,
    optional_user,
    paginate,
    redirect,
    render,
    require,
    t,
)

log = logging.getLogger("mailgate.panel.approvals")

NAV = [("/approvals", "nav.approvals", ())]
MAX_REASON = 1000

i18n.register({
    "zh-CN": {
        "nav.approvals": "审核",
        "approvals.title": "邮件审核",
        "approvals.pending": "待审核",
        "approvals.history": "审核记录",
        "approvals.empty": "没有待审核的邮件。",
        "approvals.history_empty": "还没有审核记录。",
        "approvals.col.requested": "提交时间",
        "approvals.col.sender": "发件人",
        "approvals.col.recipients": "收件人",
        "approvals.col.subject": "主题",
        "approvals.col.rule": "规则",
        "approvals.col.reason": "原因",
        "approvals.col.state": "状态",
        "approvals.col.decided": "处理",
        "approvals.col.size": "大小",
        "approvals.col.expires": "审核期限",
        "approvals.col.approvers": "审核人",
        "approvals.state.pending": "待审核",
        "approvals.state.approved": "已批准",
        "approvals.state.rejected": "已拒绝",
        "approvals.state.expired": "已超时",
        "approvals.open": "查看",
        "approvals.detail": "审核邮件 #{id}",
        "approvals.approve": "批准发送",
        "approvals.reject": "拒绝",
        "approvals.reject_reason": "拒绝理由（会告知发件人）",
        "approvals.reason_required": "请填写拒绝理由。",
        "approvals.approved_flash": "已批准，邮件已进入发送队列。",
        "approvals.rejected_flash": "已拒绝，已通知发件人。",
        "approvals.failed": "无法处理：{error}",
        "approvals.decided_by": "{when} 由 {who} 处理",
        "approvals.own_message": "这是您自己的邮件，不能由您审核。",
        "approvals.headers": "邮件头",
        "approvals.text": "正文",
        "approvals.html": "HTML 预览（已去除脚本和外部内容）",
        "approvals.attachments": "附件",
        "approvals.no_attachments": "没有附件。",
        "approvals.links": "邮件中的链接（仅显示，未打开）",
        "approvals.text_from_html": "（正文由 HTML 部分提取）",
        "approvals.message_gone": "邮件内容已不再保存。",
        "approvals.bytes": "{n} 字节",
        "approvals.link.title_approve": "确认批准",
        "approvals.link.title_reject": "确认拒绝",
        "approvals.link.ask_approve": "批准后，这封邮件会发给收件人。请先核对内容。",
        "approvals.link.ask_reject": "拒绝后，这封邮件不会发出，发件人会收到您的理由。",
        "approvals.link.confirm_approve": "确认批准",
        "approvals.link.confirm_reject": "确认拒绝",
        "approvals.link.done_approved": "已批准。邮件已进入发送队列。",
        "approvals.link.done_rejected": "已拒绝。发件人会收到通知。",
        "approvals.link.invalid": "链接无效。请使用审核邮件中的原始链接。",
        "approvals.link.expired": "链接已过期。",
        "approvals.link.used": "此链接已经使用过，不能再次使用。",
        "approvals.link.decided": "这封邮件已经处理过：{state}。",
        "approvals.link.error_title": "无法使用此链接",
        "preview.note.malformed": "邮件结构已损坏，预览可能不完整。",
        "preview.note.defects": "邮件的 MIME 格式有缺陷，预览可能不完整。",
        "preview.note.too_large": "邮件很大，只读取了开头部分。",
        "preview.note.text_truncated": "正文过长，只显示开头部分。",
        "preview.note.html_truncated": "HTML 过长，只显示开头部分。",
        "preview.note.too_many_attachments": "附件太多，未全部列出。",
        "preview.note.charset": "部分文字的字符集未知或有误，无法识别的字节显示为 �。",
        "preview.note.remote_images": "已阻止外部图片。",
        "preview.note.empty": "邮件没有可读的正文。",
    },
    "en": {
        "nav.approvals": "Approvals",
        "approvals.title": "Approvals",
        "approvals.pending": "Waiting",
        "approvals.history": "History",
        "approvals.empty": "Nothing is waiting for your approval.",
        "approvals.history_empty": "No decisions yet.",
        "approvals.col.requested": "Submitted",
        "approvals.col.sender": "From",
        "approvals.col.recipients": "To",
        "approvals.col.subject": "Subject",
        "approvals.col.rule": "Rule",
        "approvals.col.reason": "Reason",
        "approvals.col.state": "State",
        "approvals.col.decided": "Decision",
        "approvals.col.size": "Size",
        "approvals.col.expires": "Decide by",
        "approvals.col.approvers": "Approvers",
        "approvals.state.pending": "waiting",
        "approvals.state.approved": "approved",
        "approvals.state.rejected": "rejected",
        "approvals.state.expired": "expired",
        "approvals.open": "Open",
        "approvals.detail": "Held message #{id}",
        "approvals.approve": "Approve and send",
        "approvals.reject": "Reject",
        "approvals.reject_reason": "Reason (the sender is told)",
        "approvals.reason_required": "Please give a reason for rejecting.",
        "approvals.approved_flash": "Approved; the message is queued for sending.",
        "approvals.rejected_flash": "Rejected; the sender has been told.",
        "approvals.failed": "Could not do that: {error}",
        "approvals.decided_by": "{when} by {who}",
        "approvals.own_message": "This is your own message; someone else must decide.",
        "approvals.headers": "Headers",
        "approvals.text": "Text",
        "approvals.html": "HTML preview (scripts and remote content removed)",
        "approvals.attachments": "Attachments",
        "approvals.no_attachments": "No attachments.",
        "approvals.links": "Links in the message (shown, not opened)",
        "approvals.text_from_html": "(text taken from the HTML part)",
        "approvals.message_gone": "The message itself is no longer kept.",
        "approvals.bytes": "{n} bytes",
        "approvals.link.title_approve": "Confirm approval",
        "approvals.link.title_reject": "Confirm rejection",
        "approvals.link.ask_approve": "Once approved, this message goes to its recipients. Please check it first.",
        "approvals.link.ask_reject": "Once rejected, this message is not sent; the sender gets your reason.",
        "approvals.link.confirm_approve": "Approve",
        "approvals.link.confirm_reject": "Reject",
        "approvals.link.done_approved": "Approved. The message is queued for sending.",
        "approvals.link.done_rejected": "Rejected. The sender will be told.",
        "approvals.link.invalid": "This link is not valid. Please use the link from the approval e-mail.",
        "approvals.link.expired": "This link has expired.",
        "approvals.link.used": "This link has already been used; it works only once.",
        "approvals.link.decided": "This message has already been decided: {state}.",
        "approvals.link.error_title": "This link cannot be used",
        **{f"preview.note.{code}": text for code, text in NOTE_TEXTS.items()},
    },
})


# -- the approval service inside the panel ---------------------------------------------------


class PanelGateway:
    """The approval service: the node's own inside `mailgate run`; under `mailgate panel
    serve` one built here on first use (directory, policy with the current rules, DKIM
    signer).  That one reloads the rules when their files change (checked before each
    use) and replays the directory's change feed, so decisions see what the node sees."""

    def __init__(self, cfg: Any, node: Any = None):
        self.cfg = cfg
        self.node = node
        self._lock = threading.Lock()
        self._service: ApprovalService | None = None
        self._reloader: Any = None

    def env(self) -> Any:
        from gateway.rules.env import RuleEnv
        from gateway.rules.loader import _SHARED_DEPARTMENTS, _SHARED_HISTORY

        return RuleEnv(departments=_SHARED_DEPARTMENTS, history=_SHARED_HISTORY, company=self.cfg.company.name,
                       company_domains=tuple(self.cfg.company.domains))

    def service(self) -> ApprovalService:
        node_service = getattr(self.node, "approvals", None)
        if node_service is not None:  # inside `mailgate run`: the node's own service, rules and directory
            return node_service
        with self._lock:
            if self._service is None:
                self._service = self._build()
            else:
                self._service.directory.refresh()
                self._reloader.poll()  # a broken edit keeps the previous rules, as in the node
            return self._service

    def _build(self) -> ApprovalService:
        from gateway.directory import Directory
        from gateway.dkim import signing_mutation
        from gateway.policy import Policy
        from gateway.rules.watcher import RuleReloader, RuleStatus
        from gateway.spool import Spool

        cfg = self.cfg
        directory = Directory(cfg.company.domains, cfg.public_mail_domains)
        directory.load()
        policy = Policy(directory)
        self._reloader = RuleReloader(policy, cfg.rules.dir, status=RuleStatus(), status_path=None, env=self.env())
        if not self._reloader.reload():
            log.error("panel: the rules have errors; approvals are decided without file rules until fixed: %s",
                      "; ".join(self._reloader.status.errors))
        sign = signing_mutation(cfg)
        spool = Spool(cfg.spool_dir, node="" if cfg.node.shared_spool else cfg.node.name)
        return ApprovalService(cfg, directory, spool, policy=policy, signer=sign.signer if sign else None,
                               on_released=self.on_released)

    def on_released(self) -> None:
        """Under `mailgate panel serve` the node's relay finds the released message by polling."""


def gateway_for(app: Any = None) -> PanelGateway:
    app = app or bottle.request.app
    gw = getattr(app, "mailgate_gateway", None)
    if gw is None:
        gw = app.mailgate_gateway = PanelGateway(app.mailgate.cfg, getattr(app.mailgate, "node", None))
    return gw


# -- who may see and decide -----------------------------------------------------------------


def _headed_employee_ids(user: User) -> set[int]:
    """Employees in departments the user heads, sub-departments included."""
    if user.employee_id is None or "dept_head" not in user.roles:
        return set()
    rows = list(Department.select(Department.id, Department.parent, Department.head_id).tuples())
    children: dict[int | None, list[int]] = {}
    for did, parent, _ in rows:
        children.setdefault(parent, []).append(did)
    todo = [did for did, _, head in rows if head == user.employee_id]
    depts: set[int] = set()
    while todo:
        d = todo.pop()
        if d not in depts:
            depts.add(d)
            todo.extend(children.get(d, []))
    if not depts:
        return set()
    return {e.id for e in Employee.select(Employee.id).where(Employee.department.in_(sorted(depts)))}


@dataclass
class Access:
    user: User
    admin: bool
    headed: set[int]

    @classmethod
    def of(cls, user: User) -> Access:
        return cls(user, "crm_admin" in user.roles, _headed_employee_ids(user))

    def can_see(self, a: Approval) -> bool:
        if self.admin:
            return True
        if self.user.email and self.user.email.lower() in {x.lower() for x in _approvers(a)}:
            return True
        return a.employee_id is not None and a.employee_id in self.headed

    def can_decide(self, a: Approval) -> bool:
        own = self.user.employee_id is not None and a.employee_id == self.user.employee_id
        return self.can_see(a) and not own

    def query(self, state: str | None) -> Any:
        q = Approval.select()
        q = q.where(Approval.state == PENDING) if state == PENDING else q.where(Approval.state != PENDING)
        if self.admin:
            return q
        cond = None
        if self.user.email:
            cond = Approval.approvers.contains(json.dumps(self.user.email.lower()))
        if self.headed:
            by_dept = Approval.employee.in_(sorted(self.headed))
            cond = by_dept if cond is None else (cond | by_dept)
        return q.where(cond) if cond is not None else q.where(Approval.id < 0)


def _approvers(a: Approval) -> list[str]:
    try:
        return [str(x) for x in json.loads(a.approvers or "[]")]
    except ValueError:
        return []


def _recipients(a: Approval) -> list[str]:
    try:
        return [str(x) for x in json.loads(a.recipients or "[]")]
    except ValueError:
        return []


def _visible_or_403(approval_id: int) -> tuple[Approval, Access]:
    a = Approval.get_or_none(Approval.id == approval_id)
    if a is None:
        not_found()
    access = Access.of(current_user())
    if not access.can_see(a):
        forbidden()
    return a, access


# -- the message ---------------------------------------------------------------------------


def _message_bytes(a: Approval) -> bytes | None:
    """The message as submitted while pending; afterwards the archived copy, if any."""
    cfg = bottle.request.app.mailgate.cfg
    if a.state == PENDING and a.original_path:
        path = Path(cfg.spool_dir) / Path(a.original_path).name
        try:
            return path.read_bytes()
        except OSError:
            pass
    rec = ArchiveRecord.select().where(ArchiveRecord.queue_id == a.queue_id,
                                       ArchiveRecord.direction == "outbound").order_by(ArchiveRecord.id).first()
    if rec is not None:
        try:
            from gateway.archive import Archive

            return Archive(cfg.archive_dir).read(rec)
        except Exception:  # noqa: BLE001 - a missing or unreadable blob only hides the preview
            log.warning("approval %s: archived copy not readable", a.id)
    return None


def _preview(a: Approval) -> Preview | None:
    raw = _message_bytes(a)
    return build_preview(raw) if raw is not None else None


def _serve_html(preview: Preview | None, title: str) -> str:
    """The iframe document: sanitized HTML under a CSP that allows no script and no network."""
    bottle.response.content_type = "text/html; charset=utf-8"
    bottle.response.set_header("Content-Security-Policy", HTML_CSP)
    bottle.response.set_header("X-Frame-Options", "SAMEORIGIN")
    bottle.response.set_header("Referrer-Policy", "no-referrer")
    if preview is None or preview.html is None:
        preview = Preview(html="")
    return html_document(preview, title)


def _when(value: dt.datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC" if value else ""


def _row(a: Approval) -> dict[str, Any]:
    return {"a": a, "subject": decode_header_value(a.subject), "recipients": _recipients(a),
            "approvers": _approvers(a), "requested": _when(a.requested_at),
            "expires": _when(a.expires_at), "decided": _when(a.decided_at)}


# -- the link pages ------------------------------------------------------------------------


def link_base_path(cfg: Any) -> str:
    return urlsplit(cfg.approval.link_base_url).path.rstrip("/") or "/approvals"


def _link_error(key: str, status: int, **fmt: Any) -> str:
    bottle.response.status = status
    return render("approvals/link_error.html", message=t(key, **fmt))


def _check_link(token: str, action: str) -> tuple[Any, Approval] | str:
    """Verify without using the token: the claims and the approval, or an error page."""
    service = gateway_for().service()
    now = utcnow().replace(tzinfo=dt.UTC).timestamp()
    try:
        claims = verify_token(service.key, token or "", now)
    except ApprovalError as exc:
        return _link_error("approvals.link.expired" if "expired" in str(exc) else "approvals.link.invalid",
                           410 if "expired" in str(exc) else 400)
    if claims.action != action:
        return _link_error("approvals.link.invalid", 400)
    a = Approval.get_or_none(Approval.id == claims.approval_id)
    if a is None:
        return _link_error("approvals.link.invalid", 400)
    if a.state == PENDING and a.expires_at <= utcnow():
        service.expire_due()
        a = Approval.get_by_id(a.id)
    if a.state != PENDING:
        return _link_error("approvals.link.decided", 410, state=t("approvals.state." + a.state))
    if UsedApprovalToken.get_or_none(UsedApprovalToken.nonce == claims.nonce) is not None:
        return _link_error("approvals.link.used", 410)
    return claims, a


def _link_actor(a: Approval) -> str:
    """Who decided through a link: the signed-in approver, else the approver it was mailed to."""
    approvers = _approvers(a)
    user = optional_user()
    if user is not None and user.email and user.email.lower() in {x.lower() for x in approvers}:
        return user.email
    if len(approvers) == 1:
        return approvers[0]
    return "link:" + ",".join(approvers)


def _link_routes(app: Any, base: str) -> None:
    for action in ("approve", "reject"):
        def show(action: str = action) -> str:
            token = bottle.request.query.getunicode("t") or ""
            checked = _check_link(token, action)
            if isinstance(checked, str):
                return checked
            _, a = checked
            return render("approvals/link.html", action=action, token=token, row=_row(a), preview=_preview(a),
                          html_url=f"{base}/message.html?t={token}", sandbox=IFRAME_SANDBOX, done=None)

        def decide(action: str = action) -> str:
            token = form_value("t", max_length=2000)
            checked = _check_link(token, action)
            if isinstance(checked, str):
                return checked
            _, a = checked
            reason = form_value("reason", max_length=MAX_REASON)
            if action == "reject" and not reason:
                bottle.response.status = 400
                return render("approvals/link.html", action=action, token=token, row=_row(a), preview=_preview(a),
                              html_url=f"{base}/message.html?t={token}", sandbox=IFRAME_SANDBOX, done=None,
                              error=t("approvals.reason_required"))
            try:
                decided = gateway_for().service().act_on_token(token, actor=_link_actor(a), reason=reason)
            except ApprovalError as exc:
                text = str(exc)
                key = "approvals.link.used" if "used" in text else "approvals.link.expired" if "expired" in text \
                    else "approvals.link.invalid"
                return _link_error(key, 410)
            return render("approvals/link.html", action=action, token="", row=_row(decided), preview=None,
                          html_url="", sandbox=IFRAME_SANDBOX, done=decided.state)

        app.route(f"{base}/{action}", "GET", show, name=f"approval_link_{action}")
        app.route(f"{base}/{action}", "POST", decide, name=f"approval_link_{action}_post")

    @app.get(f"{base}/message.html")
    def link_message() -> str:
        token = bottle.request.query.getunicode("t") or ""
        service = gateway_for().service()
        try:
            claims = verify_token(service.key, token, utcnow().replace(tzinfo=dt.UTC).timestamp())
        except ApprovalError:
            bottle.abort(403, t("approvals.link.invalid"))
        a = Approval.get_or_none(Approval.id == claims.approval_id)
        if a is None or a.state != PENDING:
            bottle.abort(410, t("approvals.link.decided", state=t("approvals.state." + (a.state if a else "expired"))))
        return _serve_html(_preview(a), decode_header_value(a.subject))


# -- the queue -----------------------------------------------------------------------------


def routes(app: Any) -> None:
    base = link_base_path(app.mailgate.cfg)
    _link_routes(app, base)  # first: /approvals/approve must not be taken for an id

    @app.get("/approvals")
    @require()
    def queue() -> str:
        view = "history" if bottle.request.query.get("view") == "history" else "pending"
        access = Access.of(current_user())
        q = access.query(PENDING if view == "pending" else None)
        q = q.order_by(Approval.requested_at.desc() if view == "pending" else Approval.decided_at.desc(),
                       Approval.id.desc())
        page = paginate(q, bottle.request.query.get("page"))
        rows = [_row(a) for a in page.items if access.can_see(a)]  # exact check (the SQL one is a prefilter)
        return render("approvals/queue.html", view=view, rows=rows, page=page)

    @app.get("/approvals/<approval_id:int>")
    @require()
    def detail(approval_id: int) -> str:
        a, access = _visible_or_403(approval_id)
        return render("approvals/detail.html", row=_row(a), preview=_preview(a), can_decide=access.can_decide(a),
                      own=not access.can_decide(a), html_url=f"/approvals/{a.id}/message.html",
                      sandbox=IFRAME_SANDBOX, pending=a.state == PENDING, error="")

    @app.get("/approvals/<approval_id:int>/message.html")
    @require()
    def message_html(approval_id: int) -> str:
        a, _ = _visible_or_403(approval_id)
        return _serve_html(_preview(a), decode_header_value(a.subject))

    @app.post("/approvals/<approval_id:int>/decide")
    @require()
    def decide(approval_id: int) -> str:
        a, access = _visible_or_403(approval_id)
        if not access.can_decide(a):
            forbidden(t("approvals.own_message"))
        action = form_value("action", max_length=20)
        reason = form_value("reason", max_length=MAX_REASON)
        if action not in ("approve", "reject"):
            bottle.abort(400, "action")
        if action == "reject" and not reason:
            bottle.response.status = 400
            return render("approvals/detail.html", row=_row(a), preview=_preview(a), can_decide=True, own=False,
                          html_url=f"/approvals/{a.id}/message.html", sandbox=IFRAME_SANDBOX, pending=True,
                          error=t("approvals.reason_required"))
        service = gateway_for().service()
        actor = access.user.actor
        try:
            if action == "approve":
                service.approve(a.id, actor)
            else:
                service.reject(a.id, actor, reason)
        except ApprovalError as exc:
            flash(t("approvals.failed", error=str(exc)))
            redirect(f"/approvals/{a.id}")
        flash(t("approvals.approved_flash" if action == "approve" else "approvals.rejected_flash"))
        redirect("/approvals")
