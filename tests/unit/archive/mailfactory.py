"""Raw test messages for the archive search tests (Chinese charsets, HTML, attachments)."""

from __future__ import annotations

import base64
from email.header import Header
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr


def message(subject: str = "Hello", body: str = "body text", *, sender: tuple[str, str] = ("", "a@x.test"),
            to: tuple[str, str] = ("", "b@y.test"), cc: tuple[str, str] | None = None, charset: str = "utf-8",
            html: str | None = None, attachments: tuple[str, ...] = ()) -> bytes:
    text = MIMEText(body, "plain", charset)
    if html is not None or attachments:
        msg = MIMEMultipart("mixed")
        msg.attach(text)
        if html is not None:
            msg.attach(MIMEText(html, "html", charset))
        for name in attachments:
            part = MIMEApplication(b"%PDF-1.4 binary", "pdf")
            part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", name))
            msg.attach(part)
    else:
        msg = text
    msg["Subject"] = Header(subject, charset)
    msg["From"] = formataddr(sender, charset)
    msg["To"] = formataddr(to, charset)
    if cc:
        msg["Cc"] = formataddr(cc)
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0800"
    return msg.as_bytes()


def b64(text: str, charset: str) -> str:
    return base64.b64encode(text.encode(charset)).decode()
