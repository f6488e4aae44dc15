"""The SMTP sessions at a stop (``SessionDrain``, gateway/smtp/server.py): real sessions on
loopback with smtplib.  An idle one gets 421 at once; one in the middle of a command gets that
command's reply first (a hook that raises: its 451), then the 421; one still busy after the
grace is cut."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import threading

from gateway.smtp.server import SessionDrain, SubmissionSMTP

BYE = (421, b"4.3.2 Service shutting down")


class Handler:
    """RCPT waits until the test lets it answer (``answer``: "ok", "raise"; never set: stuck)."""

    def __init__(self) -> None:
        self.in_rcpt = threading.Event()
        self.answer: asyncio.Future | None = None

    async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: ANN001, ANN201
        self.answer = asyncio.get_running_loop().create_future()
        self.in_rcpt.set()
        if await self.answer == "raise":
            raise RuntimeError("directory lookup failed")
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def serve(handler: Handler, drain: SessionDrain) -> tuple[asyncio.AbstractServer, int]:
    def session() -> SubmissionSMTP:
        smtp = SubmissionSMTP(handler, hostname="gw.test")
        smtp.drain = drain
        return smtp

    server = await asyncio.get_running_loop().create_server(session, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def connect(port: int) -> smtplib.SMTP:
    conn = smtplib.SMTP("127.0.0.1", port, timeout=10)
    conn.ehlo("client.example")
    return conn


def rcpt_in_background(conn: smtplib.SMTP) -> tuple[threading.Thread, list]:
    """MAIL, then RCPT in a thread (its reply, and the next one, land in the list)."""
    assert conn.mail("alice@acme.test")[0] == 250
    replies: list = []

    def run() -> None:
        try:
            replies.append(conn.rcpt("buyer@customer.example"))
            replies.append(conn.getreply())
        except smtplib.SMTPServerDisconnected as exc:
            replies.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, replies


def test_idle_sessions_get_421_at_once_and_a_busy_one_its_reply_first(caplog):
    handler, drain = Handler(), SessionDrain()

    async def scenario() -> tuple:
        server, port = await serve(handler, drain)
        idle = await asyncio.to_thread(connect, port)
        busy = await asyncio.to_thread(connect, port)
        thread, replies = await asyncio.to_thread(rcpt_in_background, busy)
        assert await asyncio.to_thread(handler.in_rcpt.wait, 10)
        server.close()
        stopping = asyncio.create_task(drain.drain(grace=10))
        idle_reply = await asyncio.to_thread(idle.getreply)  # while the other is still busy
        assert not stopping.done()
        handler.answer.set_result("ok")
        cut = await stopping
        await asyncio.to_thread(thread.join, 10)
        return idle_reply, replies, cut

    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        idle_reply, replies, cut = asyncio.run(scenario())
    assert idle_reply == BYE
    assert replies == [(250, b"OK"), BYE]
    assert cut == 0 and not drain.live
    assert "waiting for 1 SMTP session(s) to finish their command" in caplog.text


def test_a_command_failing_during_the_stop_is_answered_451_then_421():
    handler, drain = Handler(), SessionDrain()

    async def scenario() -> tuple:
        server, port = await serve(handler, drain)
        busy = await asyncio.to_thread(connect, port)
        thread, replies = await asyncio.to_thread(rcpt_in_background, busy)
        assert await asyncio.to_thread(handler.in_rcpt.wait, 10)
        server.close()
        stopping = asyncio.create_task(drain.drain(grace=10))
        await asyncio.sleep(0)  # the drain has begun: the session is busy, nothing said yet
        handler.answer.set_result("raise")
        await stopping
        await asyncio.to_thread(thread.join, 10)
        return replies

    replies = asyncio.run(scenario())
    assert replies[0][0] == 451 and replies[1] == BYE


def test_a_session_still_busy_after_the_grace_is_cut(caplog):
    handler, drain = Handler(), SessionDrain()

    async def scenario() -> tuple:
        server, port = await serve(handler, drain)
        stuck = await asyncio.to_thread(connect, port)
        thread, replies = await asyncio.to_thread(rcpt_in_background, stuck)
        assert await asyncio.to_thread(handler.in_rcpt.wait, 10)  # its RCPT never answers
        server.close()
        cut = await drain.drain(grace=0.2)
        await asyncio.to_thread(thread.join, 10)
        return cut, replies

    with caplog.at_level(logging.WARNING, logger="mailgate.smtp"):
        cut, replies = asyncio.run(scenario())
    assert cut == 1
    assert len(replies) == 1 and isinstance(replies[0], smtplib.SMTPServerDisconnected)
    assert "1 SMTP session(s) still busy 0.2 s after the stop: cut" in caplog.text
