"""`mailgate rules test`: a true dry run — decide only, print the trace.

The message is built from the command line (or read from an .eml file), the
rules are evaluated exactly as the gateway would, and the trace — every rule,
hit or miss and why — the verdict and the mutations (described, not applied)
are printed.  Nothing is stored, changed, notified or sent.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterable
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP, compat32
from email.utils import formatdate, make_msgid
from pathlib import Path

from gateway.directory import Directory
from gateway.mutate import STAGES
from gateway.policy import Policy
from gateway.policy.context import Context, Verdict, ambiguous_mime_refusal
from gateway.rules.headerblock import as_postfix_reads


def build_message(mail_from: str, to: list[str], subject: str, attachments: Iterable[Path] = ()) -> bytes:
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=mail_from.rpartition("@")[2] or "localhost")
    msg.set_content("(mailgate rules test: dry run)\n")
    for path in attachments:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        maintype, subtype = ctype.split("/", 1)
        msg.add_attachment(path.read_bytes(), maintype=maintype, subtype=subtype, filename=path.name)
    return msg.as_bytes(policy=SMTP)


def make_context(
    raw: bytes, mail_from: str, rcpt_tos: list[str], directory: Directory, language: str = "en"
) -> Context:
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    # The header section as the SMTP handler reads it on arrival (as Postfix does), so a dry run
    # sees the fields the gateway would see.
    ambiguous: list[str] = []
    raw, body_at = as_postfix_reads(raw, len(raw), ambiguous)
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw[:body_at])
    return Context(
        mail_from=mail_from,
        rcpt_tos=rcpt_tos,
        headers=headers,
        raw=raw,
        employee=directory.employee_for_address(mail_from),
        language=language,
        ambiguous_mime=ambiguous[0] if ambiguous else "",
    )


def dry_run(policy: Policy, ctx: Context) -> Verdict:
    """The verdict the gateway would give: MIME structure that readers read differently is
    refused before the rules are asked, as on submission."""
    if ctx.ambiguous_mime:
        return ambiguous_mime_refusal(ctx, ctx.ambiguous_mime)
    return policy.decide(ctx)


def format_trace(ctx: Context, verdict: Verdict, policy: Policy | None = None) -> str:
    sources = {r.name: getattr(r, "source", "built in") for r in (policy.rules if policy else [])}
    who = f"{ctx.employee.name} <{ctx.employee.email}>" if ctx.employee else "no employee"
    lines = [
        f"from:      {ctx.mail_from} ({who})",
        f"to:        {', '.join(ctx.rcpt_tos)}",
        f"subject:   {ctx.subject}",
        f"size:      {len(ctx.raw)} bytes",
        "",
        "rules:",
    ]
    for step in ctx.trace:
        mark = "HIT " if step.hit else "miss"
        mode = " [audit]" if step.mode == "audit" else ""
        where = sources.get(step.rule, "")
        lines.append(f"  {mark} {step.rule}{mode}{'  (' + where + ')' if where else ''}")
        for part in step.why.split("\n"):
            lines.append(f"         {part}")
    lines.append("")
    if verdict.action == "reject":
        lines.append(f"verdict:   REJECT {verdict.smtp_code} {verdict.enhanced} (rule {verdict.rule})")
        lines += [f"           {part}" for part in verdict.reason.split("\n")]
    elif verdict.action == "hold":
        lines.append(f"verdict:   HOLD for approval by {', '.join(verdict.approvers)} (rule {verdict.rule})")
        if verdict.reason:
            lines.append(f"           reason: {verdict.reason}")
    else:
        lines.append("verdict:   ACCEPT")
    if verdict.action != "reject":
        lines.append("mutations:" if verdict.mutations else "mutations: none")
        for stage in STAGES:
            for m in verdict.mutations:
                if getattr(m, "stage", None) == stage:
                    text = m.describe() if hasattr(m, "describe") else repr(m)
                    lines.append(f"  [{stage}] {text}")
    lines.append("")
    lines.append("(dry run: nothing was stored, changed or sent)")
    return "\n".join(lines)
