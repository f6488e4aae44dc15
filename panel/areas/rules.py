"""Rules (规则), for the IT administrator: the rule files read-only, their validation
state, what the running node loaded and when, and a dry run ("what happens if A
sends to B").

Nothing here writes: rule files are edited on disk (and reloaded by the node's
watcher, gateway/rules/watcher.py); the page shows each file escaped, the errors
of the files as they are now (file:line), and ``<data_dir>/rules-status.json`` — the
rule set the node enforces, when it loaded it, and why an edit was refused.  The
dry run evaluates the files on disk with the current directory exactly like
`mailgate rules test`; nothing is stored, changed or sent.
"""

from __future__ import annotations

import datetime as dt
import logging
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import bottle

from gateway.rules.watcher import read_status
from panel import i18n
from panel.areas.approvals import gateway_for
from panel.web import form_value, panel_config, render, require, t

log = logging.getLogger("mailgate.panel.rules")

NAV = [("/rules", "nav.rules", ("it_admin",))]
MAX_FILE_SHOWN = 256 * 1024
MAX_FILES = 200
MAX_ATTACHMENT = 10 * 1024 * 1024
MAX_RECIPIENTS = 50

i18n.register({
    "zh-CN": {
        "nav.rules": "规则",
        "rules.title": "发信规则",
        "rules.running": "正在执行的规则",
        "rules.loaded_at": "最近加载：{when}，共 {count} 条规则",
        "rules.never_loaded": "网关还没有报告加载状态（网关未运行，或尚未启动）。",
        "rules.refused": "{when} 的修改被拒绝，网关继续执行之前的规则：",
        "rules.files_ok": "规则文件检查通过（{count} 条规则）。",
        "rules.files_bad": "规则文件现在有 {count} 个问题（修正前网关不会加载）：",
        "rules.files": "规则文件",
        "rules.dir": "目录：{dir}",
        "rules.no_files": "目录中没有规则文件。",
        "rules.file_ok": "无错误",
        "rules.file_errors": "{count} 个错误",
        "rules.truncated": "文件过大，只显示开头部分。",
        "rules.readonly": "只读。请在服务器上编辑规则文件，网关会在一秒内自动重新加载。",
        "rules.dryrun": "试运行",
        "rules.dryrun.help": "模拟一封邮件，查看每条规则是否命中以及最终结果。不会保存、修改或发送任何内容。",
        "rules.dryrun.from": "发件人",
        "rules.dryrun.to": "收件人（多个用逗号分隔）",
        "rules.dryrun.subject": "主题",
        "rules.dryrun.body": "正文",
        "rules.dryrun.attachment": "附件（可选，按内容判断类型）",
        "rules.dryrun.submit": "试运行",
        "rules.dryrun.need": "请填写发件人和至少一个收件人。",
        "rules.dryrun.bad_address": "地址无效：{address}",
        "rules.dryrun.too_big": "附件太大（上限 10 MB）。",
        "rules.dryrun.cannot": "规则文件有错误，无法试运行。",
        "rules.dryrun.result": "结果",
        "rules.dryrun.rule": "规则",
        "rules.dryrun.hit": "命中",
        "rules.dryrun.miss": "未命中",
        "rules.dryrun.why": "说明",
        "rules.dryrun.audit": "审计模式",
        "rules.dryrun.verdict": "结论",
        "rules.dryrun.full": "完整跟踪",
        "rules.verdict.accept": "放行",
        "rules.verdict.reject": "拒绝",
        "rules.verdict.hold": "待审核",
    },
    "en": {
        "nav.rules": "Rules",
        "rules.title": "Sending rules",
        "rules.running": "Rules in force",
        "rules.loaded_at": "Last loaded {when}: {count} rules",
        "rules.never_loaded": "The gateway has not reported a rule status (not running, or not started yet).",
        "rules.refused": "An edit at {when} was refused; the gateway keeps enforcing the previous rules:",
        "rules.files_ok": "The rule files check out ({count} rules).",
        "rules.files_bad": "The rule files now have {count} problem(s) (the gateway will not load them until fixed):",
        "rules.files": "Rule files",
        "rules.dir": "Folder: {dir}",
        "rules.no_files": "No rule files in the folder.",
        "rules.file_ok": "no errors",
        "rules.file_errors": "{count} error(s)",
        "rules.truncated": "The file is large; only its beginning is shown.",
        "rules.readonly": "Read-only. Edit the rule files on the server; the gateway reloads them within a second.",
        "rules.dryrun": "Dry run",
        "rules.dryrun.help": "Try a message: see which rules match and what would happen. Nothing is stored, "
                             "changed or sent.",
        "rules.dryrun.from": "From",
        "rules.dryrun.to": "To (comma-separated)",
        "rules.dryrun.subject": "Subject",
        "rules.dryrun.body": "Text",
        "rules.dryrun.attachment": "Attachment (optional; its type is judged by content)",
        "rules.dryrun.submit": "Run",
        "rules.dryrun.need": "Please give a sender and at least one recipient.",
        "rules.dryrun.bad_address": "Not a valid address: {address}",
        "rules.dryrun.too_big": "The attachment is too large (10 MB at most).",
        "rules.dryrun.cannot": "The rule files have errors; a dry run is not possible.",
        "rules.dryrun.result": "Result",
        "rules.dryrun.rule": "Rule",
        "rules.dryrun.hit": "match",
        "rules.dryrun.miss": "no match",
        "rules.dryrun.why": "Why",
        "rules.dryrun.audit": "audit mode",
        "rules.dryrun.verdict": "Verdict",
        "rules.dryrun.full": "Full trace",
        "rules.verdict.accept": "accept",
        "rules.verdict.reject": "reject",
        "rules.verdict.hold": "hold for approval",
    },
})


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])[:MAX_FILES]


def _source(rule: Any) -> str:
    """``file.yaml:line`` of a file rule ("" for a built-in one)."""
    return Path(getattr(rule, "source", "") or "").name


def _read_shown(path: Path) -> tuple[str, bool]:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_SHOWN + 1)
    except OSError as exc:
        return f"({exc.strerror or exc})", False
    return data[:MAX_FILE_SHOWN].decode("utf-8", "replace"), len(data) > MAX_FILE_SHOWN


def _check_files(directory: Path) -> tuple[list, list[str]]:
    from gateway.rules.loader import load_rules

    return load_rules(directory, gateway_for().env())


def _page_context() -> dict[str, Any]:
    cfg = panel_config()
    directory = Path(cfg.rules.dir)
    rules, errors = _check_files(directory)
    files = []
    for path in _files(directory):
        text, truncated = _read_shown(path)
        mine = [e for e in errors if e.startswith(f"{path}:")]
        files.append({"name": path.name, "text": text, "truncated": truncated,
                      "errors": [e[len(str(path.parent)) + 1:] for e in mine],
                      "rules": [r.name for r in rules if _source(r).rsplit(":", 1)[0] == path.name]})
    shown_errors = [e.replace(f"{directory}/", "") for e in errors]
    return {"status": read_status(cfg), "shown_time": shown_time, "files": files, "errors": shown_errors,
            "rule_count": len(rules), "directory": str(directory)}


def shown_time(iso: str) -> str:
    """The node's ISO timestamp as the panel shows times elsewhere (``2026-11-30 03:05:09 UTC``);
    seconds kept: an administrator checks whether the edit just saved is the one loaded."""
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return f"{when:%Y-%m-%d %H:%M:%S} UTC"


def _address_ok(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain and "." in domain and not any(c.isspace() or c in "<>,;\"\\" for c in address)
                and len(address) <= 320)


def _dry_run(form: dict[str, str], upload: Any) -> dict[str, Any]:
    from gateway.policy import Policy
    from gateway.rules.dryrun import format_trace, make_context

    sender = form["from"]
    recipients = [r.strip() for r in form["to"].replace(";", ",").split(",") if r.strip()][:MAX_RECIPIENTS]
    if not sender or not recipients:
        return {"error": t("rules.dryrun.need")}
    for address in [sender, *recipients]:
        if not _address_ok(address):
            return {"error": t("rules.dryrun.bad_address", address=address)}
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = form["subject"]
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    msg.set_content(form["body"] or "(dry run)\n")
    if upload is not None and getattr(upload, "raw_filename", ""):
        data = upload.file.read(MAX_ATTACHMENT + 1)
        if len(data) > MAX_ATTACHMENT:
            return {"error": t("rules.dryrun.too_big")}
        name = (upload.raw_filename or "attachment").replace("\\", "/").rsplit("/", 1)[-1][:200] or "attachment"
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    raw = msg.as_bytes(policy=SMTP)
    rules, errors = _check_files(Path(panel_config().rules.dir))
    if errors:
        return {"error": t("rules.dryrun.cannot")}
    directory = gateway_for().service().directory
    policy = Policy(directory)
    policy.replace_rules(rules)
    ctx = make_context(raw, sender, recipients, directory, panel_config().company.language)
    verdict = policy.decide(ctx)
    sources = {r.name: _source(r) for r in policy.rules}
    steps = [{"rule": s.rule, "hit": s.hit, "why": s.why, "audit": s.mode == "audit",
              "source": sources.get(s.rule, "")} for s in ctx.trace]
    mutations = [m.describe() if hasattr(m, "describe") else type(m).__name__ for m in verdict.mutations]
    return {"steps": steps, "verdict": verdict, "mutations": mutations,
            "employee": ctx.employee.name if ctx.employee else "", "trace": format_trace(ctx, verdict, policy)}


def routes(app: Any) -> None:
    @app.get("/rules")
    @require("it_admin")
    def rules_page() -> str:
        return render("rules/index.html", form={"from": "", "to": "", "subject": "", "body": ""}, result=None,
                      **_page_context())

    @app.post("/rules/dryrun")
    @require("it_admin")
    def dry_run() -> str:
        form = {"from": form_value("from", max_length=320), "to": form_value("to", max_length=20000),
                "subject": form_value("subject", max_length=998), "body": form_value("body", max_length=100000)}
        result = _dry_run(form, bottle.request.files.get("attachment"))
        if result.get("error"):
            bottle.response.status = 400
        return render("rules/index.html", form=form, result=result, **_page_context())
