"""Archive (邮件归档) for compliance auditors: search, message view, downloads, exports,
correspondence per customer (往来邮件).

Only the ``auditor`` role gets in (everyone else: 403, checked on the server for every
route).  Every search, message view, download and export is written to the operation log
(``archive.search``, ``archive.view``, ``archive.view_html``, ``archive.download``,
``archive.export``) with the auditor as actor, so the auditors' own trail can be audited.
Opening a message therefore logs two reads: ``archive.view`` (the page: headers, text,
attachment list) and ``archive.view_html`` (its HTML part, fetched by the page's iframe —
or directly: that URL is a read of its own and logged as one).

The message HTML is never inlined: it is sanitized by ``panel.preview`` and served from
its own URL under ``HTML_CSP`` inside ``<iframe sandbox>`` (no scripts, no same-origin,
no remote content).  Attachments are always sent as ``application/octet-stream`` with
``Content-Disposition: attachment`` so the browser never renders them in the panel's
origin.

An export holds at most ``EXPORT_MAX`` messages (the newest) and never hides what it
lacks: a zip always carries ``EXPORT-NOTES.txt`` ("N of M exported", the cap, and every
record left out as unreadable with the reason — or that the export is complete); an mbox
has no place for such a note, so an mbox export that would be incomplete (over the cap,
or a message unreadable) is refused with a 409 page saying why and what to do instead
(narrow the query, export zip, or ``mailgate archive export --limit`` up to 100 000).
The search page shows the cap beside the export buttons, and warns once the pages shown
pass it (it does not count a text query's matches: a second search per page).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import bottle

from gateway.archive import ArchiveError, BlobError, for_config
from gateway.archive.export import ExportItem, attachments, safe_filename, write_mbox, write_zip
from gateway.archive.indexer import backlog
from gateway.archive.query import QueryError
from gateway.archive.schema import ArchiveSighting
from gateway.archive.search import MAX_OFFSET, record_ids, search
from gateway.archive.search_cli import EXPORT_MAX as CLI_EXPORT_MAX
from gateway.archive.unread import given_up as index_given_up
from gateway.db.models import ArchiveRecord, CompanyDomain, Contact, Customer, Employee
from panel import i18n
from panel.preview import HTML_CSP, IFRAME_SANDBOX, NOTE_TEXTS, Preview, build_preview, html_document
from panel.web import int_arg, not_found, oplog, panel_config, render, require

log = logging.getLogger("mailgate.panel.archive")

NAV = [("/archive", "nav.archive", ("auditor",))]
PER_PAGE = 25
EXPORT_MAX = 2000  # messages in one export; more: narrow the query
FORMATS = {"mbox": ("application/mbox", "mbox"), "zip": ("application/zip", "zip")}

i18n.register({
    "zh-CN": {
        "nav.archive": "邮件归档",
        "archive.title": "邮件归档",
        "archive.search": "搜索",
        "archive.query": "查询",
        "archive.help": ("输入关键词（中英文均可）或字段：from: to: subject: after:2026-01-01 before:2026-07-01 "
                         "has:attachment direction:in|out employee:邮箱 customer:客户名或编号；短语请加引号。"),
        "archive.results": "搜索结果（最新的在前）",
        "archive.no_results": "没有找到邮件。",
        "archive.pending": ("有 {n} 封邮件暂时搜不到：最新的邮件还在建立索引（邮件高峰时索引最多落后约 {lag} 秒），"
                            "存储文件读取失败或写入索引失败的邮件稍后会再试（如果这个数字一直不减少，请联系管理员）。"),
        "archive.given_up": ("有 {n} 封邮件因内容无法写入搜索索引，已停止重试：邮件本身完整保存在归档中，"
                             "但搜索不到。请联系管理员（命令 mailgate archive reindex --failed 可重试，"
                             "mailgate archive verify 会列出这些邮件）。"),
        "archive.col.date": "时间 (UTC)",
        "archive.col.direction": "方向",
        "archive.col.from": "发件人",
        "archive.col.to": "收件人",
        "archive.col.subject": "主题",
        "archive.col.attachment": "附件",
        "archive.dir.in": "收",
        "archive.dir.out": "发",
        "archive.dir.inbound": "收",
        "archive.dir.outbound": "发",
        "archive.open": "查看",
        "archive.page": "第 {page} 页",
        "archive.export": "导出结果",
        "archive.export_mbox": "导出 mbox",
        "archive.export_zip": "导出 zip（.eml）",
        "archive.export_limit": "一次最多导出 {n} 封邮件。",
        "archive.export_over": ("这次搜索找到的邮件超过 {n} 封，导出只包含最新的 {n} 封：zip 里的 EXPORT-NOTES.txt "
                                "会注明，mbox 则不予导出。请缩小查询范围（例如 after: before:），或在命令行用 "
                                "mailgate archive export --limit（最多 {cli} 封）。"),
        "archive.export_mbox_over": ("这次搜索找到的邮件超过 {n} 封，mbox 导出会不完整，因此未导出。"
                                     "请缩小查询范围（例如 after: before:），或导出 zip（只含最新的 {n} 封，"
                                     "EXPORT-NOTES.txt 注明缺少的部分），或在命令行用 "
                                     "mailgate archive export --limit（最多 {cli} 封）。"),
        "archive.export_mbox_skipped": ("有 {k} 封邮件无法读取，mbox 导出会不完整，因此未导出：{items}。"
                                        "请导出 zip（EXPORT-NOTES.txt 列出缺少的邮件及原因），或缩小查询范围。"),
        "archive.notes.title": "Mailgate 归档导出说明",
        "archive.notes.query": "查询：{q}",
        "archive.notes.created": "导出时间 (UTC)：{when}",
        "archive.notes.exported": "已导出 {n} 封，搜索共找到 {m} 封。",
        "archive.notes.exported_over": "已导出 {n} 封，搜索找到的超过 {m} 封。",
        "archive.notes.cap": ("一次导出最多 {cap} 封（最新的）：更早的邮件不在本文件中。"
                              "请缩小查询范围（例如 after: before:），"
                              "或在命令行用 mailgate archive export --limit（最多 {cli} 封）。"),
        "archive.notes.skipped": "以下 {k} 封邮件无法读取，不在本文件中：",
        "archive.notes.skipped_row": "记录 {id}：{reason}",
        "archive.notes.complete": "导出完整：搜索找到的每封邮件都在本文件中。",
        "archive.notes.purged": "已按保留期限删除",
        "archive.notes.gone": "记录不存在",
        "archive.export_empty": "没有可导出的邮件。",
        "archive.too_deep": "结果页太靠后，请缩小查询范围。",
        "archive.message": "归档邮件 #{id}",
        "archive.record": "归档记录",
        "archive.sha256": "SHA-256",
        "archive.size": "大小",
        "archive.bytes": "{n} 字节",
        "archive.verdict": "结果",
        "archive.employee": "员工",
        "archive.queue_id": "队列号",
        "archive.reason": "原因",
        "archive.sightings": "出现位置",
        "archive.col.seen": "时间 (UTC)",
        "archive.col.place": "位置",
        "archive.headers": "邮件头",
        "archive.text": "正文",
        "archive.text_from_html": "（由 HTML 转换的文字）",
        "archive.html": "HTML 视图（已移除脚本和外部内容）",
        "archive.attachments": "附件",
        "archive.no_attachments": "无附件",
        "archive.download": "下载",
        "archive.download_eml": "下载 .eml",
        "archive.download_original": "下载提交原件 .eml",
        "archive.original_sha256": "提交原件 SHA-256",
        "archive.original_note": ("网关改动过这封邮件（发件人改写、标记或 DKIM 签名）："
                                  "这里显示的是发出的版本，员工客户端提交的原件可单独下载。"),
        "archive.links": "邮件中的链接（仅显示文字）",
        "archive.unreadable": "无法读取归档内容：{error}",
        "archive.purged": "该记录已于 {when} 按保留期限删除。",
        "archive.back": "返回搜索",
        "archive.customers": "客户往来邮件",
        "archive.customer_filter": "客户名称",
        "archive.col.customer": "客户",
        "archive.col.contacts": "联系人 / 域名",
        "archive.no_customers": "没有找到客户。",
        "archive.correspondence": "往来邮件：{name}",
        "archive.correspondence_of": "与 {name} 的往来邮件",
        "archive.refine": "在往来邮件中搜索",
        "archive.note.malformed": "邮件结构已损坏，显示可能不完整。",
        "archive.note.defects": "邮件的 MIME 格式有缺陷，显示可能不完整。",
        "archive.note.too_large": "邮件很大，只读取了开头部分。",
        "archive.note.text_truncated": "正文过长，只显示开头部分。",
        "archive.note.html_truncated": "HTML 过长，只显示开头部分。",
        "archive.note.too_many_attachments": "附件太多，未全部列出。",
        "archive.note.charset": "部分文字的字符集未知或有误，无法识别的字节显示为 �。",
        "archive.note.remote_images": "已阻止外部图片。",
        "archive.note.empty": "邮件没有可读的正文。",
    },
    "en": {
        "nav.archive": "Archive",
        "archive.title": "Mail archive",
        "archive.search": "Search",
        "archive.query": "Query",
        "archive.help": ("Words (Chinese or English) or fields: from: to: subject: after:2026-01-01 "
                         "before:2026-07-01 has:attachment direction:in|out employee:address "
                         "customer:name-or-id; put phrases in quotes."),
        "archive.results": "Results (newest first)",
        "archive.no_results": "No messages found.",
        "archive.pending": ("{n} messages cannot be found yet: the newest are still being indexed (during a "
                            "burst of mail the index may fall up to about {lag} s behind), and any whose stored "
                            "copy could not be read or whose index entry could not be written are tried again "
                            "later (if this number does not go down, tell the administrator)."),
        "archive.given_up": ("{n} messages could not be added to the search index because of their content and are "
                             "no longer retried: they are kept whole in the archive but search does not find them. "
                             "Tell the administrator (`mailgate archive reindex --failed` tries them again; "
                             "`mailgate archive verify` lists them)."),
        "archive.col.date": "Date (UTC)",
        "archive.col.direction": "Direction",
        "archive.col.from": "From",
        "archive.col.to": "To",
        "archive.col.subject": "Subject",
        "archive.col.attachment": "Attachment",
        "archive.dir.in": "in",
        "archive.dir.out": "out",
        "archive.dir.inbound": "in",
        "archive.dir.outbound": "out",
        "archive.open": "Open",
        "archive.page": "Page {page}",
        "archive.export": "Export the results",
        "archive.export_mbox": "Export mbox",
        "archive.export_zip": "Export zip (.eml)",
        "archive.export_limit": "At most {n} messages per export.",
        "archive.export_over": ("This search finds more than {n} messages; an export holds only the newest {n}: "
                                "a zip says so in EXPORT-NOTES.txt, an mbox is refused. Narrow the query "
                                "(e.g. after: before:) or use mailgate archive export --limit (up to {cli}) "
                                "on the command line."),
        "archive.export_mbox_over": ("This search finds more than {n} messages, so an mbox export would be "
                                     "incomplete and was not made. Narrow the query (e.g. after: before:), export "
                                     "zip (the newest {n} only, with EXPORT-NOTES.txt saying what is missing), or "
                                     "use mailgate archive export --limit (up to {cli}) on the command line."),
        "archive.export_mbox_skipped": ("{k} message(s) cannot be read, so an mbox export would be incomplete "
                                        "and was not made: {items}. Export zip (EXPORT-NOTES.txt lists what is "
                                        "missing and why) or narrow the query."),
        "archive.notes.title": "Mailgate archive export notes",
        "archive.notes.query": "Query: {q}",
        "archive.notes.created": "Exported (UTC): {when}",
        "archive.notes.exported": "{n} of {m} messages exported.",
        "archive.notes.exported_over": "{n} of more than {m} messages exported.",
        "archive.notes.cap": ("One export holds at most {cap} messages (the newest): older matches are not in "
                              "this file. Narrow the query (e.g. after: before:) or use mailgate archive export "
                              "--limit (up to {cli}) on the command line."),
        "archive.notes.skipped": "These {k} message(s) could not be read and are not in this file:",
        "archive.notes.skipped_row": "record {id}: {reason}",
        "archive.notes.complete": "Complete: every message the search found is in this file.",
        "archive.notes.purged": "purged (retention)",
        "archive.notes.gone": "record not found",
        "archive.export_empty": "Nothing to export.",
        "archive.too_deep": "That page is too deep: narrow the query.",
        "archive.message": "Archived message #{id}",
        "archive.record": "Archive record",
        "archive.sha256": "SHA-256",
        "archive.size": "Size",
        "archive.bytes": "{n} bytes",
        "archive.verdict": "Verdict",
        "archive.employee": "Employee",
        "archive.queue_id": "Queue id",
        "archive.reason": "Reason",
        "archive.sightings": "Seen at",
        "archive.col.seen": "When (UTC)",
        "archive.col.place": "Place",
        "archive.headers": "Headers",
        "archive.text": "Text",
        "archive.text_from_html": "(text taken from the HTML)",
        "archive.html": "HTML view (scripts and remote content removed)",
        "archive.attachments": "Attachments",
        "archive.no_attachments": "No attachments",
        "archive.download": "Download",
        "archive.download_eml": "Download .eml",
        "archive.download_original": "Download as submitted (.eml)",
        "archive.original_sha256": "SHA-256 as submitted",
        "archive.original_note": ("The gateway changed this message (sender rewrite, tags or DKIM signature): "
                                  "shown is the copy that was sent; the copy the employee's client submitted "
                                  "can be downloaded separately."),
        "archive.links": "Links in the message (text only)",
        "archive.unreadable": "The archived content cannot be read: {error}",
        "archive.purged": "This record was purged on {when} (retention).",
        "archive.back": "Back to search",
        "archive.customers": "Customer correspondence",
        "archive.customer_filter": "Customer name",
        "archive.col.customer": "Customer",
        "archive.col.contacts": "Contacts / domains",
        "archive.no_customers": "No customers found.",
        "archive.correspondence": "Correspondence: {name}",
        "archive.correspondence_of": "Mail exchanged with {name}",
        "archive.refine": "Search within the correspondence",
        **{f"archive.note.{code}": text for code, text in NOTE_TEXTS.items()},
    },
})


# -- helpers ---------------------------------------------------------------------------------


def _archive() -> Any:
    return for_config(panel_config())


def _record_or_404(record_id: int) -> ArchiveRecord:
    rec = ArchiveRecord.get_or_none(ArchiveRecord.id == record_id)
    if rec is None or rec.seq is None:
        not_found()
    return rec


def _raw(rec: ArchiveRecord) -> tuple[bytes | None, str]:
    """The message bytes, or None and why not."""
    if rec.purged_at is not None:
        return None, ""
    try:
        return _archive().read(rec), ""
    except (ArchiveError, BlobError, OSError) as exc:
        log.warning("archive record %s: not readable: %s", rec.id, exc)
        return None, str(exc)[:300]


def _hit_row(hit: Any) -> dict[str, Any]:
    sender = hit.sender.split("\n")[0] if hit.sender else ""
    return {
        "id": hit.record_id, "when": f"{hit.created_at:%Y-%m-%d %H:%M}", "direction": hit.direction,
        "sender": sender, "rcpt": ", ".join(r for r in hit.rcpt.split("\n") if r)[:300],
        "subject": hit.subject, "attachment": hit.has_attachment,
    }


def _run_search(query: str, page_arg: Any, *, target: str = "archive") -> dict[str, Any]:
    """Search and log it.  Returns the template context."""
    page = max(1, int_arg(page_arg, 1))
    ctx: dict[str, Any] = {"q": query, "page": page, "rows": [], "has_more": False, "error": "", "searched": True,
                           "export_over": False}
    try:
        if (page - 1) * PER_PAGE > MAX_OFFSET:
            raise QueryError(i18n.t("archive.too_deep"))
        results = search(query, page=page, per_page=PER_PAGE)
        ctx["rows"] = [_hit_row(h) for h in results.hits]
        ctx["has_more"] = results.has_more
        # Over the export cap: said where it is known without counting — on the last page, or
        # once the pages shown pass the cap.  (Counting the matches of a text query up to the
        # cap on every page would cost a search of its own on a large archive; the page shows
        # the cap anyway, and an export that is cut says so itself.)
        seen = (page - 1) * PER_PAGE + len(results.hits)
        ctx["export_over"] = seen > EXPORT_MAX or (results.has_more and seen >= EXPORT_MAX)
    except QueryError as exc:
        ctx["error"] = str(exc)
    oplog("archive.search", target, {"query": query, "page": page, "results": len(ctx["rows"]),
                                     **({"error": ctx["error"]} if ctx["error"] else {})})
    return ctx


def _download(data: bytes, filename: str, content_type: str = "application/octet-stream") -> bytes:
    bottle.response.content_type = content_type
    bottle.response.set_header("Content-Disposition", _disposition(filename))
    bottle.response.set_header("Content-Length", str(len(data)))
    bottle.response.set_header("Cache-Control", "no-store")
    return data


def _disposition(filename: str) -> str:
    name = safe_filename(filename)
    ascii_name = name.encode("ascii", "replace").decode().replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


def _export_items(ids: list[int], skipped: list[tuple[int, str]]) -> Iterator[ExportItem]:
    """The messages of ``ids``; each one left out goes to ``skipped`` as (record id, why)."""
    archive = _archive()
    for start in range(0, len(ids), 200):
        chunk = ids[start:start + 200]
        recs = {r.id: r for r in ArchiveRecord.select().where(ArchiveRecord.id.in_(chunk))}
        for rid in chunk:
            rec = recs.get(rid)
            if rec is None or rec.purged_at is not None:
                skipped.append((rid, i18n.t("archive.notes.gone" if rec is None else "archive.notes.purged")))
                continue
            try:
                raw = archive.read(rec)
            except (ArchiveError, BlobError, OSError) as exc:
                log.warning("export: archive record %s not readable: %s", rid, exc)
                skipped.append((rid, str(exc)[:300] or type(exc).__name__))
                continue
            yield ExportItem(record_id=rec.id, created_at=rec.created_at, direction=rec.direction,
                             mail_from=rec.mail_from, recipients=", ".join(_recipients(rec)),
                             subject=rec.subject, sha256=rec.sha256, raw=raw)


def _export_notes(query: str, found: int, truncated: bool, skipped: list[tuple[int, str]], count: int) -> str:
    """EXPORT-NOTES.txt: what the export holds, what it lacks and why (the auditor's language)."""
    t = i18n.t
    lines = [t("archive.notes.title"), "", t("archive.notes.query", q=query),
             t("archive.notes.created", when=f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S}"), ""]
    if truncated:
        lines += [t("archive.notes.exported_over", n=count, m=EXPORT_MAX),
                  t("archive.notes.cap", cap=EXPORT_MAX, cli=CLI_EXPORT_MAX)]
    else:
        lines.append(t("archive.notes.exported", n=count, m=found))
    if skipped:
        lines += ["", t("archive.notes.skipped", k=len(skipped))]
        lines += [t("archive.notes.skipped_row", id=rid, reason=reason) for rid, reason in skipped]
    if not truncated and not skipped:
        lines.append(t("archive.notes.complete"))
    return "\r\n".join(lines) + "\r\n"


def _export_caps() -> dict[str, int]:
    """The export limits the search pages state."""
    return {"export_max": EXPORT_MAX, "cli_export_max": CLI_EXPORT_MAX}


def _recipients(rec: Any) -> list[str]:
    try:
        value = json.loads(rec.recipients or "[]")
        return [str(v) for v in value] if isinstance(value, list) else []
    except ValueError:
        return []


def _customer_summary(c: Customer) -> dict[str, Any]:
    contacts = [x.email for x in Contact.select(Contact.email).where(Contact.customer == c).limit(5)]
    domains = [x.domain for x in CompanyDomain.select(CompanyDomain.domain).where(CompanyDomain.customer == c)
               .limit(5)]
    return {"id": c.id, "name": c.name, "contacts": contacts, "domains": domains}


# -- routes ----------------------------------------------------------------------------------


def routes(app: bottle.Bottle) -> None:
    @app.get("/archive")
    @require("auditor")
    def index() -> str:
        params = bottle.request.query
        # Mail the background indexer has not reached yet (it waits out bursts) or could not read
        # or write (tried again later), and those given up for their content: said, not hidden.
        given_up = index_given_up(0)[0]
        waiting = {"pending": max(0, backlog() - given_up), "given_up": given_up,
                   "lag": int(panel_config().archive.index_lag)}
        if "q" not in params:
            return render("archive/search.html", q="", page=1, rows=[], has_more=False, error="", searched=False,
                          export_over=False, **_export_caps(), base_url="/archive", **waiting)
        query = (params.getunicode("q") or "").strip()[:1000]
        ctx = _run_search(query, params.get("page"))
        return render("archive/search.html", **_export_caps(), base_url="/archive", **ctx, **waiting)

    @app.get("/archive/export")
    @require("auditor")
    def export() -> Any:
        params = bottle.request.query
        query = (params.getunicode("q") or "").strip()[:1000]
        fmt = params.get("format", "mbox")
        if fmt not in FORMATS:
            bottle.abort(400, "format: mbox or zip")
        try:
            ids = record_ids(query, limit=EXPORT_MAX + 1)  # one more: is the result set over the cap?
        except QueryError as exc:
            bottle.abort(400, str(exc))
        truncated = len(ids) > EXPORT_MAX
        ids = ids[:EXPORT_MAX]
        if truncated and fmt == "mbox":  # an mbox has no room for a note: incomplete → not made
            oplog("archive.export", "archive", {"query": query, "format": fmt, "refused": "over cap",
                                                "cap": EXPORT_MAX})
            bottle.abort(409, i18n.t("archive.export_mbox_over", n=EXPORT_MAX, cli=CLI_EXPORT_MAX))
        skipped: list[tuple[int, str]] = []
        out = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)  # noqa: SIM115 - returned to the server
        if fmt == "mbox":
            count = write_mbox(out, _export_items(ids, skipped))
        else:
            count = write_zip(out, _export_items(ids, skipped),
                              notes=lambda n: _export_notes(query, len(ids), truncated, skipped, n))
        size = out.tell()
        out.seek(0)
        details = {"query": query, "format": fmt, "messages": count, "skipped": [rid for rid, _ in skipped[:100]],
                   "bytes": size, **({"truncated_at": EXPORT_MAX} if truncated else {})}
        if skipped and fmt == "mbox":
            out.close()
            oplog("archive.export", "archive", {**details, "refused": "unreadable", "bytes": 0})
            items = "; ".join(f"#{rid} ({reason})" for rid, reason in skipped[:20])
            bottle.abort(409, i18n.t("archive.export_mbox_skipped", k=len(skipped),
                                     items=items + (" …" if len(skipped) > 20 else "")))
        oplog("archive.export", "archive", details)
        content_type, ext = FORMATS[fmt]
        bottle.response.content_type = content_type
        bottle.response.set_header("Content-Disposition", _disposition(f"archive-export.{ext}"))
        bottle.response.set_header("Content-Length", str(size))
        bottle.response.set_header("Cache-Control", "no-store")
        bottle.response.set_header("X-Mailgate-Exported", str(count))
        bottle.response.set_header("X-Mailgate-Skipped", str(len(skipped)))
        bottle.response.set_header("X-Mailgate-Truncated", "yes" if truncated else "no")
        return out

    @app.get("/archive/customers")
    @require("auditor")
    def customers() -> str:
        name = (bottle.request.query.getunicode("name") or "").strip()[:200]
        page = max(1, int_arg(bottle.request.query.get("page"), 1))
        q = Customer.select().order_by(Customer.name, Customer.id)
        if name:
            q = q.where(Customer.name.contains(name))
        items = list(q.paginate(page, PER_PAGE + 1))
        rows = [_customer_summary(c) for c in items[:PER_PAGE]]
        return render("archive/customers.html", name=name, rows=rows, page=page, has_more=len(items) > PER_PAGE)

    @app.get("/archive/customers/<customer_id:int>")
    @require("auditor")
    def correspondence(customer_id: int) -> str:
        customer = Customer.get_or_none(Customer.id == customer_id)
        if customer is None:
            not_found()
        refine = (bottle.request.query.getunicode("q") or "").strip()[:900]
        query = f"customer:{customer.id}" + (f" {refine}" if refine else "")
        ctx = _run_search(query, bottle.request.query.get("page"), target=f"customer:{customer.id}")
        ctx["q"] = refine
        return render("archive/correspondence.html", customer=_customer_summary(customer), full_query=query,
                      **_export_caps(), base_url=f"/archive/customers/{customer.id}", **ctx)

    @app.get("/archive/<record_id:int>")
    @require("auditor")
    def view(record_id: int) -> str:
        rec = _record_or_404(record_id)
        raw, error = _raw(rec)
        preview = build_preview(raw) if raw is not None else None
        parts = attachments(raw) if raw is not None else []
        sightings = list(ArchiveSighting.select().where(ArchiveSighting.record == rec)
                         .order_by(ArchiveSighting.seen_at, ArchiveSighting.id).limit(200))
        employee = Employee.get_or_none(Employee.id == rec.employee_id) if rec.employee_id else None
        oplog("archive.view", f"archive:{rec.id}", {"sha256": rec.sha256, **({"error": error} if error else {})})
        return render("archive/message.html", rec=rec, preview=preview, attachments=parts, sightings=sightings,
                      employee=employee.email if employee else "", recipients=_recipients(rec), error=error,
                      html_url=f"/archive/{rec.id}/message.html", sandbox=IFRAME_SANDBOX,
                      back=_back_link())

    @app.get("/archive/<record_id:int>/message.html")
    @require("auditor")
    def message_html(record_id: int) -> str:
        rec = _record_or_404(record_id)
        raw, error = _raw(rec)
        preview = build_preview(raw) if raw is not None else Preview(html="")
        oplog("archive.view_html", f"archive:{rec.id}", {"sha256": rec.sha256, **({"error": error} if error else {})})
        bottle.response.content_type = "text/html; charset=utf-8"
        bottle.response.set_header("Content-Security-Policy", HTML_CSP)
        bottle.response.set_header("X-Frame-Options", "SAMEORIGIN")
        bottle.response.set_header("Referrer-Policy", "no-referrer")
        if preview.html is None:
            preview = Preview(html="")
        return html_document(preview, preview.subject)

    @app.get("/archive/<record_id:int>/message.eml")
    @require("auditor")
    def eml(record_id: int) -> bytes:
        rec = _record_or_404(record_id)
        raw, error = _raw(rec)
        if raw is None:
            not_found(i18n.t("archive.unreadable", error=error or "purged"))
        oplog("archive.download", f"archive:{rec.id}", {"what": "eml", "sha256": rec.sha256, "bytes": len(raw)})
        return _download(raw, f"archive-{rec.id}-{safe_filename(rec.subject, 'message')[:60]}.eml",
                         "message/rfc822")

    @app.get("/archive/<record_id:int>/submitted.eml")
    @require("auditor")
    def submitted_eml(record_id: int) -> bytes:
        """The client's bytes as submitted, for outbound mail the gateway changed."""
        rec = _record_or_404(record_id)
        raw, error = _raw(rec)
        if raw is None:
            not_found(i18n.t("archive.unreadable", error=error or "purged"))
        try:
            original = _archive().read_original(rec, raw)
        except (ArchiveError, BlobError) as exc:
            log.warning("archive record %s: submitted original not readable: %s", rec.id, exc)
            not_found(i18n.t("archive.unreadable", error=str(exc)[:300]))
        if original is None:
            not_found()
        oplog("archive.download", f"archive:{rec.id}", {"what": "submitted-eml", "sha256": rec.original_sha256,
                                                        "bytes": len(original)})
        return _download(original, f"archive-{rec.id}-submitted-{safe_filename(rec.subject, 'message')[:60]}.eml",
                         "message/rfc822")

    @app.get("/archive/<record_id:int>/attachments/<n:int>")
    @require("auditor")
    def attachment(record_id: int, n: int) -> bytes:
        rec = _record_or_404(record_id)
        raw, error = _raw(rec)
        if raw is None:
            not_found(i18n.t("archive.unreadable", error=error or "purged"))
        parts = attachments(raw)
        if not 0 <= n < len(parts):
            not_found()
        part = parts[n]
        oplog("archive.download", f"archive:{rec.id}", {"what": "attachment", "index": n, "name": part.name,
                                                        "bytes": part.size})
        return _download(part.data, part.name)


def _back_link() -> str:
    """The search the auditor came from (only same-site /archive links are followed)."""
    ref = bottle.request.headers.get("Referer", "")
    marker = "/archive"
    pos = ref.find(marker)
    if pos >= 0:
        path = ref[pos:]
        if path.startswith(("/archive?", "/archive/customers")):
            return path
    return "/archive?" + urlencode({"q": ""})
