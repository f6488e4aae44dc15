"""Delivery status notifications (RFC 3464 inside an RFC 6522 multipart/report).

``build_dsn`` returns the complete message, ready to spool with an empty
envelope sender.  It has three parts:

1. text/plain for people (zh-CN or English): which recipients failed, what
   the remote server answered and what to do about it;
2. message/delivery-status for programs: one per-message block and one block
   per recipient (Final-Recipient, Action, Status, Diagnostic-Code, Remote-MTA);
3. text/rfc822-headers: the header of the original message, at most 64 KB.

Every line ends in CRLF and is at most 998 bytes; text from outside (remote
replies, addresses, original headers) cannot break the structure.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import secrets
from dataclasses import dataclass
from email.header import Header
from email.utils import format_datetime, make_msgid

CRLF = b"\r\n"
MAX_HEADERS = 64 * 1024
MAX_LINE = 998
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Failure:
    """One recipient that could not be delivered (or is still being retried)."""

    recipient: str
    status: str  # enhanced status code, e.g. "5.1.1" or "4.4.7"
    diagnostic: str  # the remote server's reply (or our own explanation)
    remote_mta: str = ""  # host name of the server that answered


def build_dsn(
    original: bytes,
    mail_from: str,
    failures: list[Failure],
    *,
    hostname: str,
    company_domain: str,
    language: str,
    action: str = "failed",
    arrival_date: dt.datetime | None = None,
    queue_id: str = "",
) -> bytes:
    """Build a DSN to ``mail_from`` about ``failures`` of the message ``original``."""
    if action not in ("failed", "delayed"):
        raise ValueError(f"action must be failed or delayed, not {action!r}")
    if not failures:
        raise ValueError("a DSN needs at least one failed recipient")
    english = language == "en"
    boundary = f"=_mailgate_dsn_{secrets.token_hex(12)}"
    now = dt.datetime.now(dt.UTC)
    subject = _SUBJECT[english][action]
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{_clean(company_domain)}>",
        f"To: <{_clean(mail_from)}>",
        f"Subject: {_encode_subject(subject)}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {make_msgid('dsn', domain=_clean(hostname))}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: base64",
        "Content-Description: Notification",
        "",
        *_base64_lines(_human_text(failures, hostname, english, action)),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        *_status_fields(failures, hostname, action, arrival_date or now, queue_id),
        "",
        f"--{boundary}",
    ]
    headers, eight_bit = _original_headers(original)
    lines += [
        "Content-Type: text/rfc822-headers",
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
        "Content-Description: Undelivered message headers",
        "",
    ]
    out = CRLF.join(line.encode("utf-8") for line in lines) + CRLF
    return out + headers + CRLF + f"--{boundary}--".encode() + CRLF


# -- the part for people ------------------------------------------------------

_SUBJECT = {
    False: {"failed": "退信通知：邮件未能送达", "delayed": "延迟通知：邮件尚未送达，仍在重试"},
    True: {
        "failed": "Undelivered Mail Returned to Sender",
        "delayed": "Delayed Mail (still being retried)",
    },
}

_TEXT = {
    False: {
        "intro": "这是 {host} 上的邮件系统发出的自动通知，请勿直接回复。",
        "failed": "很抱歉，您的邮件未能送达以下收件人：",
        "delayed": "您的邮件暂时未能送达以下收件人，系统会继续自动重试，您无需重发：",
        "reply": "对方服务器答复：",
        "server": "答复的服务器：",
        "todo": "建议：",
        "end": "附件中是原邮件的信头，供 IT 管理员排查问题。",
    },
    True: {
        "intro": "This is the mail system at {host}. This is an automatic notice; "
        "please do not reply to it.",
        "failed": "I'm sorry to inform you that your message could not be delivered "
        "to the following recipients:",
        "delayed": "Your message has not been delivered yet to the following recipients. "
        "The mail system keeps trying; you do not need to send it again:",
        "reply": "The remote server replied: ",
        "server": "Server: ",
        "todo": "What to do:",
        "end": "The headers of your message are attached for your IT administrator.",
    },
}

# Advice by status, most specific prefix first.
_ADVICE = [
    ("4.4.7", "多次重试后在规定时间内仍未能送达。请确认地址无误后稍后重发，或通过其他方式联系收件人。",
     "Delivery was retried until the time limit ran out. Check the address, send the message "
     "again later, or reach the recipient another way."),
    ("5.1.", "收件人地址不存在或有误。请检查地址拼写（常见错误：域名拼错、多余空格），更正后重发。",
     "The recipient address does not exist. Check its spelling (domain name, extra spaces) "
     "and send the message again."),
    ("5.2.2", "收件人邮箱已满。请稍后重发，或通过其他方式联系收件人。",
     "The recipient's mailbox is full. Send the message again later or reach the recipient "
     "another way."),
    ("5.3.4", "邮件太大，超过了对方的限制。请缩小附件（或改用网盘链接）后重发。",
     "The message is too large for the receiving system. Make attachments smaller (or send "
     "a download link) and send it again."),
    ("5.7.", "对方服务器因安全或反垃圾策略拒收。请联系 IT 管理员，并附上本通知。",
     "The receiving system refused the message by policy (security or anti-spam). Contact "
     "your IT administrator and include this notice."),
    ("4.", "这是暂时性问题，系统会自动重试。",
     "This is a temporary problem; the mail system retries on its own."),
    ("", "请确认地址无误后重发；如问题持续，请联系 IT 管理员，并附上本通知。",
     "Check the address and send the message again; if the problem persists, contact your "
     "IT administrator and include this notice."),
]


def _advice(status: str, english: bool) -> str:
    for prefix, zh, en in _ADVICE:
        if status.startswith(prefix):
            return en if english else zh
    raise AssertionError("unreachable: the last advice matches every status")


def _human_text(failures: list[Failure], hostname: str, english: bool, action: str) -> str:
    t = _TEXT[english]
    out = [t["intro"].format(host=_clean(hostname)), "", t[action], ""]
    advice: list[str] = []
    for f in failures:
        out.append(f"  <{_clean(f.recipient)}>")
        out.append(f"    {t['reply']}{_clean(f.diagnostic) or '-'}")
        if f.remote_mta:
            out.append(f"    {t['server']}{_clean(f.remote_mta)}")
        out.append("")
        tip = _advice(_status(f.status, action), english)
        if tip not in advice:
            advice.append(tip)
    out.append(t["todo"])
    out.extend(f"  - {tip}" for tip in advice)
    out += ["", t["end"], ""]
    return "\r\n".join(out)


def _encode_subject(subject: str) -> str:
    if subject.isascii():
        return subject
    return Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")


def _base64_lines(text: str) -> list[str]:
    encoded = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return [encoded[i : i + 76] for i in range(0, len(encoded), 76)]


# -- the part for programs ----------------------------------------------------


def _status_fields(
    failures: list[Failure],
    hostname: str,
    action: str,
    arrival: dt.datetime,
    queue_id: str,
) -> list[str]:
    if arrival.tzinfo is None:
        arrival = arrival.replace(tzinfo=dt.UTC)
    lines = [f"Reporting-MTA: dns; {_ascii(hostname)}"]
    if queue_id:
        lines.append(f"X-Mailgate-Queue-ID: {_ascii(queue_id)}")
    lines.append(f"Arrival-Date: {format_datetime(arrival)}")
    for f in failures:
        lines += [
            "",
            f"Final-Recipient: {_address_type(f.recipient)}",
            f"Action: {action}",
            f"Status: {_status(f.status, action)}",
        ]
        if f.remote_mta:
            lines.append(f"Remote-MTA: dns; {_ascii(f.remote_mta)}")
        lines += _fold(f"Diagnostic-Code: smtp; {_ascii(f.diagnostic) or 'unknown'}")
    return lines


def _status(status: str, action: str) -> str:
    status = status.strip()
    if _STATUS.match(status):
        return status
    return "5.0.0" if action == "failed" else "4.0.0"


def _address_type(address: str) -> str:
    """``rfc822;addr``, or RFC 6533's ``utf-8;`` with \\x{HEX} for non-ASCII addresses."""
    address = _clean(address)
    if address.isascii():
        return f"rfc822;{address}"
    return "utf-8;" + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)


def _fold(field: str, width: int = 76, limit: int = 900) -> list[str]:
    """Fold a long header field at spaces; cut it at ``limit`` characters."""
    if len(field) > limit:
        field = field[: limit - 3] + "..."
    lines: list[str] = []
    line = ""
    for word in field.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = " " + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return lines


def _clean(text: str) -> str:
    """One line of text: control characters (CR, LF, TAB …) become single spaces."""
    return _CONTROL.sub(" ", str(text)).strip()


def _ascii(text: str) -> str:
    return _clean(text).encode("ascii", "replace").decode("ascii")


# -- the original headers -----------------------------------------------------

_EOL = re.compile(rb"\r\n|\r|\n")


def _original_headers(original: bytes) -> tuple[bytes, bool]:
    """The original's header block, CRLF-terminated lines, at most MAX_HEADERS bytes.

    Cut at a field boundary; each line is cut at MAX_LINE bytes.  Also returns
    whether the result holds 8-bit bytes.
    """
    lines: list[bytes] = []
    size = 0
    field_start = 0  # index in ``lines`` where the current field begins
    for line in _EOL.split(original):
        if not line:
            break  # the empty line ending the header
        if line[:1] not in (b" ", b"\t"):
            field_start = len(lines)
        line = line[:MAX_LINE]
        if size + len(line) + 2 > MAX_HEADERS:
            del lines[field_start:]  # drop the field that does not fit whole
            break
        lines.append(line)
        size += len(line) + 2
    block = b"".join(line + CRLF for line in lines)
    return block, not block.isascii()
