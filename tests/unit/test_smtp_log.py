"""aiosmtpd's per-command-line logging costs nothing while its logger is off (gateway.cli sets
``mail.log`` to ERROR) and still works when an operator turns it on."""

from __future__ import annotations

import logging

import aiosmtpd.smtp

import gateway.smtp.server  # noqa: F401 - installs the level check into aiosmtpd.smtp


def test_command_lines_are_escaped_and_logged_only_when_the_level_is_on(monkeypatch, caplog) -> None:
    mail_log = logging.getLogger("mail.log")
    escaped: list[bytes] = []
    real = aiosmtpd.smtp.sanitize
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", lambda data: escaped.append(data) or real(data))
    line = b"MAIL FROM:<a@acme.test>\x1b[31m"
    caplog.set_level(logging.ERROR, logger="mail.log")
    aiosmtpd.smtp.sanitized_log(mail_log.debug, "_handle_client readline: %r", line)
    aiosmtpd.smtp.sanitized_log(mail_log.info, "%r >> %r", ("127.0.0.1", 1), line)
    assert escaped == [] and caplog.records == []
    caplog.set_level(logging.DEBUG, logger="mail.log")
    aiosmtpd.smtp.sanitized_log(mail_log.debug, "_handle_client readline: %r", line)
    aiosmtpd.smtp.sanitized_log(mail_log.info, "%r >> %r", ("127.0.0.1", 1), line)
    assert escaped == [line, line]
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.INFO]
    assert all("\x1b" not in r.getMessage() for r in caplog.records)  # still escaped
    aiosmtpd.smtp.sanitized_log(mail_log.warning, "%r", line)  # other levels: as before
    assert caplog.records[-1].levelno == logging.WARNING
