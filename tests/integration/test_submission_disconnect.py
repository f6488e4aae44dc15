"""A client that sends DATA and hangs up before the reply, through a running gateway: aiosmtpd
cancels the handler while the group commit is pending.  The message is then either fully
stored — queue row, spool file, and relayed to the Internet — or not at all; never a queue
row without its file.  (node.shared_spool: accepted mail has a spool file of its own, the one
the old handler removed while its row still committed.)"""

from __future__ import annotations

import os
import smtplib
import ssl

import pytest

from gateway.archive.schema import ArchiveRecord
from gateway.db.models import OutboundMessage
from tests.harness.gateway import start_hooked

pytestmark = pytest.mark.integration

# Loaded by the gateway's interpreter at start-up (PYTHONPATH).  SubmissionHandler._commit_many
# (the group commit's job, in its writer thread) holds back a message whose subject says GATED:
# it prints "TEST commit held <queue id>", then blocks opening the FIFO named by
# MAILGATE_TEST_COMMIT_GATE until the test writes "ok" (commit) or "fail" (raise) into it.
# aiosmtpd's connection_lost prints "TEST connection lost": the handler task is cancelled.
SITECUSTOMIZE = '''
import importlib.machinery
import os
import sys

GATE = os.environ["MAILGATE_TEST_COMMIT_GATE"]
FAILED = set()


def _say(text):
    print("TEST " + text, file=sys.stderr, flush=True)


def _patch_handler(module):
    real = module.SubmissionHandler._commit_many

    def gated(self, jobs):
        ids = [p.queue_id for (prepared,) in jobs for p in prepared if "GATED" in (p.ctx.subject or "")]
        if ids:
            if FAILED.intersection(ids):  # the committer's retry, job by job: fails again at once
                raise OSError(5, "injected commit failure")
            _say("commit held " + " ".join(ids))
            with open(GATE) as gate:
                word = gate.read().strip()
            if word == "fail":
                FAILED.update(ids)
                raise OSError(5, "injected commit failure")
        return real(self, jobs)

    module.SubmissionHandler._commit_many = gated


def _patch_smtp(module):
    real = module.SMTP.connection_lost

    def connection_lost(self, error):
        _say("connection lost")
        return real(self, error)

    module.SMTP.connection_lost = connection_lost


PATCHES = {"gateway.smtp.handler": _patch_handler, "aiosmtpd.smtp": _patch_smtp}


class _Patch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch)
'''

RCPT = "einkauf@hamburg-tools.de"


@pytest.fixture
def gated_gateway(tmp_path, dovecot, sink, monkeypatch):
    gate = tmp_path / "commit-gate"
    os.mkfifo(gate)
    gw = start_hooked(tmp_path, dovecot, monkeypatch, SITECUSTOMIZE, {"MAILGATE_TEST_COMMIT_GATE": str(gate)},
                      overrides={"node": {"shared_spool": True}})
    gw.gate = gate
    yield gw
    gw.stop()


def send_and_hang_up(gw, subject: str) -> str:
    """AUTH, MAIL, RCPT, DATA and the message's final dot — then close the connection once
    the commit is held, before reading the reply.  Returns the held message's queue id."""
    raw = (f"From: alice@acme.test\r\nTo: {RCPT}\r\nSubject: {subject}\r\n\r\nPrices inside.\r\n").encode()
    mark = len(gw.log_lines)
    conn = smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30)
    conn.starttls(context=ssl.create_default_context(cafile=str(gw.cert_path)))
    conn.login("alice@acme.test", "alice-pw")
    assert conn.mail("alice@acme.test")[0] == 250
    assert conn.rcpt(RCPT)[0] == 250
    conn.putcmd("data")
    assert conn.getreply()[0] == 354
    conn.send(raw + b".\r\n")
    line = gw.wait_for_log("TEST commit held ", after=mark)
    conn.close()  # the reply (250 or 451) is never read
    gw.wait_for_log("TEST connection lost", after=mark)
    return line.split("TEST commit held ", 1)[1].split()[0]


def release(gw, word: str) -> None:
    with open(gw.gate, "w") as gate:  # the committer's thread is blocked opening it for reading
        gate.write(word)


def spool_file(gw, queue_id: str) -> list:
    return list(gw.base_dir.rglob(f"{queue_id}.eml"))


def test_a_client_hanging_up_during_the_commit_gets_its_message_stored_whole_or_not_at_all(gated_gateway, sink):
    gw = gated_gateway
    sink.clear()

    # The commit fails after the client left: nothing of the message is left behind.
    mark = len(gw.log_lines)
    failed = send_and_hang_up(gw, "GATED quote Q-1")
    assert spool_file(gw, failed)  # still there while the commit may succeed
    release(gw, "fail")
    gw.wait_for_log(f"{failed}: the client went away before the 250 and the store failed", after=mark)
    assert OutboundMessage.select().where(OutboundMessage.queue_id == failed).count() == 0
    assert ArchiveRecord.select().where(ArchiveRecord.queue_id == failed).count() == 0
    assert spool_file(gw, failed) == []

    # The commit succeeds after the client left: stored whole, and relayed.
    mark = len(gw.log_lines)
    stored = send_and_hang_up(gw, "GATED quote Q-2")
    assert spool_file(gw, stored)
    release(gw, "ok")
    gw.wait_for_log(f"{stored}: client went away before the 250; the message is stored", after=mark)
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == [RCPT] and b"Subject: GATED quote Q-2" in got.data
    [row] = OutboundMessage.select().where(OutboundMessage.queue_id == stored)
    assert row.spool_path == f"{stored}.eml"
    [record] = ArchiveRecord.select().where(ArchiveRecord.queue_id == stored)
    assert record.verdict == "accepted"
    assert OutboundMessage.select().count() == 1 and ArchiveRecord.select().count() == 1
    assert "spool file missing" not in gw.log_text()
