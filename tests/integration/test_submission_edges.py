"""Trusted networks, an upstream that is down, and many large messages at once."""

from __future__ import annotations

import smtplib
import ssl
import threading

import pytest

from tests.harness.gateway import seeded

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trusting_gateway(tmp_path_factory, dovecot, sink):
    """A node that lets 127.0.0.0/8 send without AUTH, with a small size limit."""
    gw = seeded(tmp_path_factory.mktemp("trusting"), dovecot, {
        "smtp": {"trusted_networks": ["127.0.0.0/8"], "max_message_size": 3 * 1024 * 1024},
    })
    gw.start()
    yield gw
    gw.stop()


def test_trusted_network_sends_without_auth(trusting_gateway, sink):
    sink.clear()
    with smtplib.SMTP("127.0.0.1", trusting_gateway.submission_port, timeout=30) as conn:
        conn.sendmail("erp@acme.test", ["einkauf@hamburg-tools.de"], b"Subject: invoice\r\n\r\nfrom the ERP\r\n")
    [got] = sink.wait_for(1, timeout=20)
    assert got.mail_from == "erp@acme.test"
    assert b"with ESMTP id" in got.data  # not ESMTPSA: no authentication


def test_trusted_network_still_gets_the_conflict_block_for_employees(trusting_gateway):
    with smtplib.SMTP("127.0.0.1", trusting_gateway.submission_port, timeout=30) as conn:
        with pytest.raises(smtplib.SMTPDataError) as err:
            conn.sendmail("alice@acme.test", ["lagos.imports@gmail.com"], b"Subject: x\r\n\r\ny\r\n")
    assert err.value.smtp_code == 550


def test_trusted_network_mail_with_ambiguous_mime_structure_is_refused_too(trusting_gateway, sink):
    """The rules run on mail from trusted networks too, so they must not guess there either;
    the same message without the second Content-Type goes out."""
    sink.clear()
    raw = (b"Subject: export\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
           b"--b1\r\nContent-Type: text/plain\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n--b1--\r\n")
    with smtplib.SMTP("127.0.0.1", trusting_gateway.submission_port, timeout=30) as conn:
        with pytest.raises(smtplib.SMTPDataError) as err:
            conn.sendmail("erp@acme.test", ["einkauf@hamburg-tools.de"], raw)
        assert (err.value.smtp_code, err.value.smtp_error) == (
            550, b"5.6.0 Ambiguous MIME structure: two different Content-Type fields in MIME part 1; refused")
        conn.sendmail("erp@acme.test", ["einkauf@hamburg-tools.de"],
                      raw.replace(b"Content-Type: application/octet-stream\r\n", b""))
    [got] = sink.wait_for(1, timeout=20)
    assert got.data.endswith(b"--b1\r\nContent-Type: text/plain\r\n\r\nx\r\n--b1--\r\n")


def test_many_large_messages_at_once_and_the_loop_stays_responsive(trusting_gateway, sink):
    """Twelve 2.5 MB messages in parallel plus one over the limit: each gets its own clear
    answer, and a NOOP on another session is answered while they stream."""
    sink.clear()
    body = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * (2_500_000 // 78)
    too_big = b"Subject: huge\r\n\r\n" + (b"y" * 76 + b"\r\n") * (3_300_000 // 78)
    results: list[object] = []
    started = threading.Barrier(14)

    def send(data: bytes) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", trusting_gateway.submission_port, timeout=60) as conn:
                conn.ehlo("big.example")
                started.wait()
                conn.sendmail("erp@acme.test", ["someone@unknown-buyer.com"], data)
                results.append("ok")
        except smtplib.SMTPException as exc:
            results.append(exc)

    threads = [threading.Thread(target=send, args=(body,)) for _ in range(12)]
    threads.append(threading.Thread(target=send, args=(too_big,)))
    for t in threads:
        t.start()
    with smtplib.SMTP("127.0.0.1", trusting_gateway.submission_port, timeout=60) as probe:
        probe.ehlo("probe.example")
        started.wait()
        assert probe.noop()[0] == 250
    for t in threads:
        t.join()
    assert results.count("ok") == 12
    [refused] = [r for r in results if r != "ok"]
    assert isinstance(refused, smtplib.SMTPException) and "552" in str(refused)
    assert len(sink.wait_for(12, timeout=60)) == 12


def test_upstream_down_auth_answers_454_quickly(tmp_path, dovecot):
    gw = seeded(tmp_path, dovecot, {"upstream": {"submission_port": 1}})
    gw.start()
    try:
        ctx = ssl.create_default_context(cafile=str(gw.cert_path))
        with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
            conn.starttls(context=ctx)
            conn.ehlo("client.example")
            code, text = conn.docmd("AUTH", "PLAIN AGFsaWNlQGFjbWUudGVzdABhbGljZS1wdw==")
            assert code == 454 and b"4.7.0" in text
    finally:
        gw.stop()
