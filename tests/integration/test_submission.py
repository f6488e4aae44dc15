"""Submission through a running gateway, relayed by the real Dovecot into the sink."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request
from email.message import EmailMessage

import dkim
import pytest

from gateway.db.models import ArchiveRecord
from tests.integration.test_approval_flow import dns_stub

pytestmark = pytest.mark.integration

QUEUED = re.compile(rb"queued as ([0-9A-F]{17})")


def tls_ctx(gw) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gw.cert_path))


def message(frm: str, to: str, subject: str = "Quotation", cc: str | None = None, body: str = "Hello") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def submit(gw, user: str, password: str, msg: EmailMessage, port: str = "587", **kw):
    """Send with smtplib; return the DATA reply (code, text) — smtplib's data() does not raise."""
    if port == "465":
        conn = smtplib.SMTP_SSL("127.0.0.1", gw.smtps_port, context=tls_ctx(gw), timeout=30)
    else:
        conn = smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30)
        conn.starttls(context=tls_ctx(gw))
    with conn:
        conn.login(user, password)
        conn.mail(kw.get("mail_from", user))
        for rcpt in kw.get("rcpts", [a.strip() for a in msg["To"].split(",")]):
            code, text = conn.rcpt(rcpt)
            assert code == 250, text
        return conn.data(msg.as_bytes())


def test_submission_587_reaches_sink(gateway, sink):
    sink.clear()
    msg = message("alice@acme.test", "einkauf@hamburg-tools.de", "Offer 587")
    code, text = submit(gateway, "alice@acme.test", "alice-pw", msg)
    assert code == 250, text
    qid = QUEUED.search(text).group(1).decode()
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["einkauf@hamburg-tools.de"]
    assert f"with ESMTPSA id {qid}".encode() in got.data
    assert b"Subject: Offer 587" in got.data
    assert got.data.rstrip().endswith(b"Hello")


def test_submission_465_implicit_tls_auth_login(gateway, sink):
    sink.clear()
    with smtplib.SMTP_SSL("127.0.0.1", gateway.smtps_port, context=tls_ctx(gateway), timeout=30) as conn:
        conn.ehlo("client.example")
        assert "LOGIN" in conn.esmtp_features["auth"]
        conn.user, conn.password = "bob@acme.test", "bob-pw"
        code, _ = conn.auth("LOGIN", conn.auth_login, initial_response_ok=False)
        assert code == 235
        conn.sendmail("bob@acme.test", ["lagos.imports@gmail.com"], message(
            "bob@acme.test", "lagos.imports@gmail.com", "Offer 465").as_bytes())
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["lagos.imports@gmail.com"]


def test_swaks_through_587(gateway, sink):
    sink.clear()
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{gateway.submission_port}", "--tls", "--tls-verify",
         "--tls-ca-path", str(gateway.cert_path), "--auth", "PLAIN", "--auth-user", "alice@acme.test",
         "--auth-password", "alice-pw", "--from", "alice@acme.test", "--to", "tanaka@osaka-machinery.jp",
         "--header", "Subject: swaks test", "--body", "via swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "queued as" in out.stdout
    [got] = sink.wait_for(1, timeout=20)
    assert b"Subject: swaks test" in got.data


def test_swaks_attachment_named_in_bare_utf8(gateway, sink, tmp_path):
    """swaks writes ``--attach-name 报价单.pdf`` as bare UTF-8 in the part's headers, as many
    clients do; the example rules (rules/50-examples-audit.yaml) look at attachment names.
    The message is accepted and delivered whole — the rules' MIME parse used to raise on that
    header (500, later 451: the client could never send it)."""
    sink.clear()
    pdf = tmp_path / "quote.pdf"
    pdf.write_bytes(b"%PDF-1.4\n% a quotation\n")
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{gateway.submission_port}", "--tls", "--tls-verify",
         "--tls-ca-path", str(gateway.cert_path), "--auth", "PLAIN", "--auth-user", "alice@acme.test",
         "--auth-password", "alice-pw", "--from", "alice@acme.test", "--to", "new.buyer@unknown-importer.example",
         "--header", "Subject: 报价单 Q-2026-1201", "--body", "请查收附件中的报价单。",
         "--attach-type", "application/pdf", "--attach-name", "报价单.pdf", "--attach", f"@{pdf}"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "queued as" in out.stdout
    [got] = sink.wait_for(1, timeout=20)
    assert 'filename="报价单.pdf"'.encode() in got.data


def test_send_conflict_refused_with_reason(gateway, sink):
    sink.clear()
    msg = message("alice@acme.test", "lagos.imports@gmail.com", "Poaching")
    code, reply = submit(gateway, "alice@acme.test", "alice-pw", msg)
    assert code == 550
    text = reply.decode()
    assert "5.7.1" in text
    assert "lagos.imports@gmail.com" in text and "bob@acme.test" in text and "Bob Li" in text
    assert "同事" in text  # zh-CN by default
    record = ArchiveRecord.select().where(ArchiveRecord.subject == "Poaching").get()
    assert record.verdict == "refused" and "lagos.imports@gmail.com" in record.reason


def test_conflict_in_cc_header_refuses_whole_message(gateway, sink):
    msg = message("alice@acme.test", "einkauf@hamburg-tools.de", "Cc trick", cc="Chinedu <lagos.imports@gmail.com>")
    code, reply = submit(gateway, "alice@acme.test", "alice-pw", msg, rcpts=["einkauf@hamburg-tools.de"])
    assert code == 550 and b"lagos.imports@gmail.com" in reply


@pytest.mark.parametrize("rcpt", [
    "anyone@hamburg-tools.de",  # own customer, by company domain
    "tanaka@osaka-machinery.jp",  # co-owned
    "compras@lima-ferreteria.pe",  # public pool
    "someone@unknown-buyer.com",  # unknown
    "bob@acme.test",  # internal
    "other.person@gmail.com",  # public domain, not a contact: nobody's customer
])
def test_allowed_recipients_pass(gateway, rcpt):
    code, text = submit(gateway, "alice@acme.test", "alice-pw", message("alice@acme.test", rcpt))
    assert code == 250, text


def test_auth_before_tls_is_530(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.submission_port, timeout=10) as conn:
        conn.ehlo("client.example")
        assert not conn.has_extn("auth")
        code, text = conn.docmd("AUTH", "PLAIN AGFsaWNlQGFjbWUudGVzdABhbGljZS1wdw==")
        assert code == 530, text


def test_wrong_password_is_535(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.submission_port, timeout=30) as conn:
        conn.starttls(context=tls_ctx(gateway))
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            conn.login("carol@acme.test", "wrong")
        assert err.value.smtp_code == 535


def test_other_sender_is_553_alias_is_fine(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.submission_port, timeout=30) as conn:
        conn.starttls(context=tls_ctx(gateway))
        conn.login("alice@acme.test", "alice-pw")
        code, text = conn.mail("bob@acme.test")
        assert code == 553 and b"5.7.1" in text
        code, _ = conn.mail("alice.wang@acme.test")
        assert code == 250


def test_reading_tags_are_taken_off_to_and_cc(gateway, sink):
    # A reply to a name the IMAP proxy served: mutt writes the tag as an encoded-word, others
    # quote the whole name; the customer must not receive "To: [客户] Klaus Becker".
    sink.clear()
    msg = message("alice@acme.test", "=?utf-8?B?W+WuouaIt10=?= Klaus Becker <einkauf@hamburg-tools.de>",
                  "Re: RFQ", cc='"[客户] tanaka@osaka-machinery.jp" <tanaka@osaka-machinery.jp>, Bob <bob@acme.test>')
    code, reply = submit(gateway, "alice@acme.test", "alice-pw", msg,
                         rcpts=["einkauf@hamburg-tools.de", "tanaka@osaka-machinery.jp", "bob@acme.test"])
    assert code == 250, reply
    [got] = sink.wait_for(1, timeout=20)
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert b'\r\nTo: "Klaus Becker" <einkauf@hamburg-tools.de>\r\n' in head
    assert b"\r\nCc: <tanaka@osaka-machinery.jp>, Bob <bob@acme.test>\r\n" in head
    assert "客户".encode() not in got.data and b"W+WuouaIt10" not in got.data


@pytest.mark.parametrize("rcpt", [
    "victim%elsewhere.example@acme.test",
    "elsewhere.example!victim",
    "@relay.example:victim@elsewhere.example",
    '"victim@elsewhere.example"@acme.test',
])
def test_relay_tricks_refused(gateway, rcpt):
    with smtplib.SMTP("127.0.0.1", gateway.submission_port, timeout=30) as conn:
        conn.starttls(context=tls_ctx(gateway))
        conn.login("alice@acme.test", "alice-pw")
        conn.mail("alice@acme.test")
        code, _ = conn.rcpt(rcpt)
        assert code >= 500


def test_unauthenticated_relay_refused(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.submission_port, timeout=10) as conn:
        conn.starttls(context=tls_ctx(gateway))
        conn.ehlo("client.example")
        code, _ = conn.mail("alice@acme.test")
        assert code == 530
        code, _ = conn.rcpt("victim@elsewhere.example")
        assert code in (503, 530)


def raw_session(gw):
    sock = socket.create_connection(("127.0.0.1", gw.smtps_port), timeout=20)
    tls = tls_ctx(gw).wrap_socket(sock, server_hostname="localhost")
    f = tls.makefile("rb")

    def read_reply() -> bytes:
        lines = []
        while True:
            line = f.readline()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    return tls, read_reply


def smuggle(gateway, payload: bytes) -> bytes:
    tls, read = raw_session(gateway)
    read()
    for cmd in (b"EHLO client.example\r\n", b"AUTH PLAIN AGFsaWNlQGFjbWUudGVzdABhbGljZS1wdw==\r\n",
                b"MAIL FROM:<alice@acme.test>\r\n", b"RCPT TO:<someone@unknown-buyer.com>\r\n", b"DATA\r\n"):
        tls.sendall(cmd)
        read()
    tls.sendall(payload)
    reply = read()
    tls.sendall(b"QUIT\r\n")
    read()
    tls.close()
    return reply


def test_bare_lf_fake_end_of_data_stays_inside_the_message(gateway, sink):
    sink.clear()
    reply = smuggle(gateway, (
        b"Subject: first\r\n\r\nbody\n.\nMAIL FROM:<alice@acme.test>\nRCPT TO:<victim@elsewhere.example>\n"
        b"DATA\nSubject: smuggled\n\nevil\r\n.\r\n"
    ))
    assert reply.startswith(b"250"), reply
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["someone@unknown-buyer.com"]  # one message, to the real recipient only
    # Normalised to CRLF, dot-stuffed by the relay, un-stuffed by the sink: still body text.
    assert b"body\r\n.\r\nMAIL FROM:<alice@acme.test>\r\n" in got.data
    assert b"Subject: smuggled" in got.data and b"\n" not in got.data.replace(b"\r\n", b"")
    # And nothing else arrives: a marker message is the second and last arrival.
    submit(gateway, "alice@acme.test", "alice-pw", message("alice@acme.test", "marker@unknown-buyer.com", "marker"))
    arrived = sink.wait_for(2, timeout=20)
    assert [m.rcpt_tos for m in arrived] == [["someone@unknown-buyer.com"], ["marker@unknown-buyer.com"]]


def test_malformed_header_and_mixed_rfc2231_parameters_are_accepted(gateway, sink):
    """Two messages the submission path used to answer 451 on every try: a header line that is
    neither a field nor a continuation (DKIM signing raised; now it starts the body, after the
    blank line Postfix's cleanup would put before it, and the message is signed) and a
    multipart whose Content-Type mixes RFC 2231 ``name*=`` and ``name*0*=`` (the rules' MIME
    parse raised while the example rules look at attachments)."""
    sink.clear()
    reply = smuggle(gateway, b"From: alice@acme.test\r\nno colon here\r\nSubject: malformed\r\n\r\nbody\r\n.\r\n")
    assert reply.startswith(b"250"), reply
    reply = smuggle(gateway, (
        b"From: alice@acme.test\r\nSubject: mixed 2231\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=b1; name*=utf-8''%E6%8A%A5; name*0*=utf-8''x\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\nsee the file\r\n--b1\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''%E6%8A%A5.pdf; filename*0*=utf-8''x\r\n\r\n"
        b"%PDF-1.4\r\n--b1--\r\n.\r\n"))
    assert reply.startswith(b"250"), reply
    first, second = sink.wait_for(2, timeout=20)
    assert b"From: alice@acme.test\r\n\r\nno colon here\r\nSubject: malformed\r\n\r\nbody" in first.data
    assert b"DKIM-Signature:" in first.data and dkim.verify(first.data, dnsfunc=dns_stub(gateway))
    assert b"%PDF-1.4" in second.data and b"DKIM-Signature:" in second.data


def test_bare_cr_refused(gateway, sink):
    sink.clear()
    reply = smuggle(gateway, b"Subject: first\r\n\r\nbody\r.\rMAIL FROM:<alice@acme.test>\r\n.\r\n")
    assert reply.startswith(b"550 5.6.0"), reply


def test_starttls_command_injection_discarded(gateway):
    sock = socket.create_connection(("127.0.0.1", gateway.submission_port), timeout=20)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"EHLO client.example\r\n")
    while f.readline()[3:4] == b"-":
        pass
    sock.sendall(b"STARTTLS\r\nMAIL FROM:<alice@acme.test>\r\n")
    assert f.readline().startswith(b"220")
    tls = tls_ctx(gateway).wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"NOOP\r\n")
    tf = tls.makefile("rb")
    # If the injected MAIL FROM had survived, its reply would come first.
    assert tf.readline().startswith(b"250")
    tls.sendall(b"RCPT TO:<x@unknown-buyer.com>\r\n")
    reply = tf.readline()
    assert reply[:3] in (b"503", b"530"), reply
    tls.close()


@pytest.mark.parametrize("helo", ["bad\x00host", "bad host", "a" * 300])
def test_bad_helo_refused(gateway, helo):
    tls, read = raw_session(gateway)
    read()
    tls.sendall(b"EHLO " + helo.encode() + b"\r\n")
    assert read()[:1] == b"5"
    tls.close()


def test_overlong_line_and_oversize(gateway):
    tls, read = raw_session(gateway)
    read()
    tls.sendall(b"EHLO client.example\r\n")
    ehlo = read()
    size = int(re.search(rb"SIZE (\d+)", ehlo).group(1))
    tls.sendall(b"MAIL FROM:<alice@acme.test> SIZE=" + str(size + 1).encode() + b"\r\n")
    assert read()[:1] == b"5"
    tls.sendall(b"NOOP " + b"x" * 70000 + b"\r\n")
    assert read()[:3] == b"500"
    tls.close()


def test_metrics_endpoint_counts(gateway, sink):
    sink.clear()
    submit(gateway, "alice@acme.test", "alice-pw", message("alice@acme.test", "m@unknown-buyer.com", "metrics"))
    sink.wait_for(1, timeout=20)
    submit(gateway, "alice@acme.test", "alice-pw", message("alice@acme.test", "lagos.imports@gmail.com", "no"))
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    deadline = time.monotonic() + 10
    while True:  # the relay process counts right after the sink's 250: scrape until it shows
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        if 'mailgate_relay_messages_total{result="relayed"}' in body or time.monotonic() > deadline:
            break
    assert 'mailgate_smtp_messages_total{verdict="accepted"}' in body
    assert 'mailgate_smtp_messages_total{verdict="refused"}' in body
    assert "mailgate_queue_depth" in body
    # Counted in the relay's own process, merged into this endpoint.
    relayed = re.search(r'mailgate_relay_messages_total\{result="relayed"\} (\d+)', body)
    assert relayed and float(relayed.group(1)) >= 1


def test_transaction_log_line_has_no_secrets(gateway):
    log = gateway.log_text()
    assert re.search(r"[0-9A-F]{17}: from=<alice@acme.test> employee=alice@acme.test nrcpt=1 size=\d+ "
                     r"verdict=accept delay=", log)
    assert "alice-pw" not in log and "AGFsaWNl" not in log


def test_accepted_mail_sets_the_customers_last_contact(gateway, sink):
    from gateway.db.models import CompanyDomain, Customer, utcnow

    customer = CompanyDomain.get(CompanyDomain.domain == "hamburg-tools.de").customer
    Customer.update(last_contact_at=None).where(Customer.id == customer.id).execute()
    before = utcnow()
    code, text = submit(gateway, "alice@acme.test", "alice-pw",
                        message("alice@acme.test", "someone.new@hamburg-tools.de", "Contact"))
    assert code == 250, text
    touched = Customer.get_by_id(customer.id).last_contact_at
    assert touched is not None and touched >= before.replace(microsecond=0)


def _smtp_login(gw, user: str, password: str) -> int:
    with smtplib.SMTP_SSL("127.0.0.1", gw.smtps_port, context=tls_ctx(gw), timeout=30) as conn:
        try:
            return conn.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code


def _imap_login(gw, user: str, password: str) -> str:
    import imaplib

    with imaplib.IMAP4_SSL("127.0.0.1", gw.imaps_port, ssl_context=tls_ctx(gw), timeout=30) as conn:
        try:
            return conn.login(user, password)[0]
        except imaplib.IMAP4.error as exc:
            return str(exc)


def test_deactivated_employee_can_no_longer_log_in(gateway):
    """The upstream still takes the password of someone who left; the gateway must not:
    logged in as a non-employee, the send-conflict block would not apply to them either."""
    from gateway.customers import set_employee_active
    from gateway.db.models import Employee
    from tests.harness import wait_until

    bob = Employee.get(Employee.email == "bob@acme.test")
    assert _smtp_login(gateway, "bob@acme.test", "bob-pw") == 235
    set_employee_active(bob, False)
    try:
        wait_until(lambda: _smtp_login(gateway, "bob@acme.test", "bob-pw") == 535, what="SMTP login refused")
        assert "deactivated" in _imap_login(gateway, "bob@acme.test", "bob-pw")
        assert _smtp_login(gateway, "alice@acme.test", "alice-pw") == 235  # nobody else
    finally:
        set_employee_active(bob, True)
    wait_until(lambda: _smtp_login(gateway, "bob@acme.test", "bob-pw") == 235, what="SMTP login back")
    assert _imap_login(gateway, "bob@acme.test", "bob-pw") == "OK"
