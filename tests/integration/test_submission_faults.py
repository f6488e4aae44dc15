"""A rule that raises, through a running gateway: the client gets 451 (not aiosmtpd's 500),
nothing is stored, and once the fault is gone the same client's retry is delivered."""

from __future__ import annotations

import re
import smtplib
import ssl
import urllib.request

import pytest

from gateway.archive.schema import ArchiveRecord
from gateway.db.models import OutboundMessage
from tests.harness.gateway import start_hooked

pytestmark = pytest.mark.integration

# Loaded by the gateway's interpreter at start-up (PYTHONPATH): when gateway.rules.rule is
# imported, FileRule.evaluate is wrapped to raise while the file named by
# MAILGATE_TEST_RULE_FAULT exists — a rule's bug, switched on and off from the test.
SITECUSTOMIZE = '''
import importlib.machinery
import os
import sys

FLAG = os.environ["MAILGATE_TEST_RULE_FAULT"]


class _PatchRules:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "gateway.rules.rule":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            evaluate = module.FileRule.evaluate

            def faulty(self, ctx, directory):
                if os.path.exists(FLAG):
                    raise RuntimeError("injected rule fault in " + self.name + ": " + ctx.subject)
                return evaluate(self, ctx, directory)

            module.FileRule.evaluate = faulty

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchRules)
'''


@pytest.fixture
def faulty_gateway(tmp_path, dovecot, sink, monkeypatch):
    flag = tmp_path / "rule-fault"
    gw = start_hooked(tmp_path, dovecot, monkeypatch, SITECUSTOMIZE, {"MAILGATE_TEST_RULE_FAULT": str(flag)})
    gw.fault = flag
    yield gw
    gw.stop()


def tempfail_count(gw) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
    found = re.search(r'mailgate_smtp_messages_total\{verdict="tempfail"\} ([0-9.e+]+)', body)
    return float(found.group(1)) if found else 0.0


def test_a_raising_rule_answers_451_and_the_retry_is_delivered(faulty_gateway, sink):
    gw = faulty_gateway
    sink.clear()
    raw = (b"From: alice@acme.test\r\nTo: einkauf@hamburg-tools.de\r\nSubject: Quote Q-4711 secret terms\r\n"
           b"\r\nPrices inside.\r\n")
    gw.fault.touch()
    mark = len(gw.log_lines)
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=ssl.create_default_context(cafile=str(gw.cert_path)))
        conn.login("alice@acme.test", "alice-pw")
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            conn.sendmail("alice@acme.test", ["einkauf@hamburg-tools.de"], raw)
        assert deferred.value.smtp_code == 451
        assert deferred.value.smtp_error == b"4.3.0 Temporary policy error, try again later"  # no internals
        line = gw.wait_for_log("policy decision failed", after=mark)
        qid = re.search(r"([0-9A-F]{17}): policy decision failed user=alice@acme.test ip=127.0.0.1 "
                        r"error=RuntimeError at ", line)
        assert qid, line
        assert "Q-4711" not in gw.log_text() and "alice-pw" not in gw.log_text()
        # Nothing of it stored, archived or queued.
        assert OutboundMessage.select().count() == 0 and ArchiveRecord.select().count() == 0
        assert tempfail_count(gw) == 1

        gw.fault.unlink()  # the rule fixed: the same client sends the same message again
        assert conn.sendmail("alice@acme.test", ["einkauf@hamburg-tools.de"], raw) == {}
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["einkauf@hamburg-tools.de"] and b"Subject: Quote Q-4711" in got.data
    assert qid.group(1).encode() not in got.data  # the retry has its own queue id
    [row] = OutboundMessage.select()
    assert row.queue_id != qid.group(1)
    assert [r.verdict for r in ArchiveRecord.select()] == ["accepted"]
