"""An SMTP sink that stores every accepted message as a file, for tests and demos.

Each message becomes ``NAME.eml`` (the exact DATA bytes, dot-unstuffed) plus a
``NAME.json`` sidecar (mail_from, rcpt_tos, peer, received, helo, mail_options, size).
Both are written atomically (temp file + rename), the sidecar last, so a ``.json``
always has a complete ``.eml`` next to it.  Names sort in arrival order.

Failures for tests: ``fail_rcpt`` maps an address to its RCPT reply, (code, text) or a
whole line; ``defer_next = n`` answers the end of DATA of the next n messages with 451.
It announces PIPELINING (RFC 2920; aiosmtpd reads pipelined commands one by one) unless
``pipelining`` is set False, so both ways of a client can be tested.  A slow upstream:
``hold("RCPT")`` holds every RCPT reply, ``hold("DATA")`` the reply to every end of data
(the message stored first, as a server that is slow to answer after taking it), until
``release()``; the ``held`` event says one is being held.

Run in-process with :class:`SinkServer` or as ``python -m gateway.demo.sink --port P --dir D``
(``--port 0`` picks a free port; the line ``READY <port>`` on stdout says it listens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
DATA_SIZE_LIMIT = 100 * 1024 * 1024
DEFER_REPLY = "451 4.3.0 Try again later"


@dataclass(frozen=True)
class SinkMessage:
    """One accepted message, as recorded in its ``.json`` sidecar."""

    path: Path  # the .eml file
    mail_from: str
    rcpt_tos: list[str]
    peer: tuple[str, int]
    received: float  # Unix time
    helo: str
    mail_options: list[str]
    size: int

    @property
    def data(self) -> bytes:
        """The message bytes exactly as received."""
        return self.path.read_bytes()

    @classmethod
    def load(cls, sidecar: Path) -> SinkMessage:
        meta = json.loads(sidecar.read_text())
        return cls(
            path=sidecar.with_suffix(".eml"),
            mail_from=meta["mail_from"],
            rcpt_tos=list(meta["rcpt_tos"]),
            peer=(meta["peer"][0], meta["peer"][1]),
            received=meta["received"],
            helo=meta["helo"],
            mail_options=list(meta["mail_options"]),
            size=meta["size"],
        )


def read_messages(directory: Path) -> list[SinkMessage]:
    """All messages stored in `directory`, in arrival order."""
    return [SinkMessage.load(p) for p in sorted(Path(directory).glob("*.json"))]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class SinkHandler:
    """aiosmtpd handler: stores messages in `directory`, answers configured failures.

    ``fail_rcpt`` maps an address (case-insensitive) to the RCPT reply, as (code, text)
    or as a whole reply line; ``defer_next`` counts the next messages whose DATA is
    answered with ``defer_reply`` (451 by default).  Both may be changed from any thread.
    """

    def __init__(self, directory: Path, on_message: Callable[[SinkMessage], None] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.on_message = on_message
        self.fail_rcpt: dict[str, tuple[int, str] | str] = {}
        self.defer_reply = DEFER_REPLY
        self._defer_next = 0
        self._lock = threading.Lock()
        self._seq = 0
        self.pipelining = True  # announce PIPELINING in the EHLO reply
        self.hold_at: str | None = None  # "RCPT" or "DATA": see hold()
        self.held = threading.Event()  # set when a reply is being held
        self._holding: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def handle_EHLO(  # aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    @property
    def defer_next(self) -> int:
        return self._defer_next

    @defer_next.setter
    def defer_next(self, count: int) -> None:
        with self._lock:
            self._defer_next = count

    def reset_failures(self) -> None:
        self.fail_rcpt.clear()
        self.defer_next = 0
        self.defer_reply = DEFER_REPLY
        self.pipelining = True
        self.release()

    def hold(self, command: str) -> None:
        """Hold every reply to ``command`` ("RCPT", or "DATA": the reply to the end of data)
        until ``release()``: a slow upstream.  Any thread."""
        with self._lock:
            self.held.clear()
            self.hold_at = command

    def release(self) -> None:
        """Answer the held replies, and hold no more.  Any thread."""
        with self._lock:
            self.hold_at = None
            holding, self._holding = self._holding, []
        for loop, event in holding:
            loop.call_soon_threadsafe(event.set)

    async def _hold(self, command: str) -> None:
        with self._lock:
            if self.hold_at != command:
                return
            event = asyncio.Event()
            self._holding.append((asyncio.get_running_loop(), event))
            self.held.set()
        await event.wait()

    async def handle_RCPT(  # aiosmtpd hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        wanted = address.lower()
        await self._hold("RCPT")
        for key, reply in list(self.fail_rcpt.items()):
            if key.lower() == wanted:
                return reply if isinstance(reply, str) else f"{reply[0]} {reply[1]}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        with self._lock:
            if self._defer_next > 0:
                self._defer_next -= 1
                return self.defer_reply
        message = self._store(session, envelope)
        if self.on_message is not None:
            self.on_message(message)
        await self._hold("DATA")
        return "250 OK stored"

    def _store(self, session: Session, envelope: Envelope) -> SinkMessage:
        data = envelope.original_content or b""
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}"
        host, port = session.peer[:2] if isinstance(session.peer, tuple) else (str(session.peer), 0)
        meta: dict[str, Any] = {
            "mail_from": envelope.mail_from or "",
            "rcpt_tos": list(envelope.rcpt_tos),
            "peer": [host, port],
            "received": time.time(),
            "helo": session.host_name or "",
            "mail_options": list(envelope.mail_options),
            "size": len(data),
        }
        eml = self.directory / f"{name}.eml"
        _write_atomic(eml, data)
        sidecar = eml.with_suffix(".json")
        _write_atomic(sidecar, json.dumps(meta, indent=1).encode())
        return SinkMessage.load(sidecar)


def _smtp_factory(handler: SinkHandler, data_size_limit: int) -> Callable[[], SMTP]:
    def factory() -> SMTP:
        return SMTP(
            handler,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,  # also makes aiosmtpd announce 8BITMIME
            hostname="sink.localhost",
            ident="Mailgate test sink",
        )

    return factory


async def _serve(
    handler: SinkHandler,
    host: str,
    port: int,
    stopped: asyncio.Event,
    ready: Callable[[int], None],
    data_size_limit: int = DATA_SIZE_LIMIT,
) -> None:
    """Listen on host:port, call ready(actual_port), serve until `stopped` is set.

    Owns the running loop: on the way out it cancels every other task in it.
    """
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_smtp_factory(handler, data_size_limit), host, port)
    ready(server.sockets[0].getsockname()[1])
    try:
        await stopped.wait()
    finally:
        server.close()
        await server.wait_closed()
        current = asyncio.current_task()
        sessions = [t for t in asyncio.all_tasks() if t is not current]
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)


class SinkServer:
    """The sink in a background thread with its own event loop."""

    def __init__(
        self,
        directory: Path,
        host: str = HOST,
        port: int = 0,
        data_size_limit: int = DATA_SIZE_LIMIT,
        start_timeout: float = 10.0,
        on_message: Callable[[SinkMessage], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.on_message = on_message  # called (in the sink's thread) after each stored message
        self.host = host
        self._port = port
        self.data_size_limit = data_size_limit
        self.start_timeout = start_timeout
        self.handler = SinkHandler(self.directory, self._on_message)
        self._messages: list[SinkMessage] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="smtp-sink", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise TimeoutError("SMTP sink did not start")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> SinkServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- failures (see SinkHandler) -----------------------------------------

    @property
    def fail_rcpt(self) -> dict[str, tuple[int, str] | str]:
        """Address -> RCPT reply, (code, text) or a whole line; mutate it freely."""
        return self.handler.fail_rcpt

    @property
    def defer_next(self) -> int:
        """How many of the next messages get a 4xx (``handler.defer_reply``) after DATA."""
        return self.handler.defer_next

    @defer_next.setter
    def defer_next(self, count: int) -> None:
        self.handler.defer_next = count

    @property
    def held(self) -> threading.Event:
        """Set when a reply is being held (see ``hold``)."""
        return self.handler.held

    def hold(self, command: str) -> None:
        """Hold every reply to ``command`` ("RCPT" or "DATA") until ``release()``."""
        self.handler.hold(command)

    def release(self) -> None:
        self.handler.release()

    # -- messages ------------------------------------------------------------

    def messages(self) -> list[SinkMessage]:
        """Messages accepted since start (or the last clear()), in arrival order."""
        with self._cond:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Block until at least `count` messages arrived; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(f"{len(self._messages)} of {count} messages after {timeout} s")
            return list(self._messages)

    def clear(self) -> None:
        """Forget and delete all messages and drop all configured failures."""
        self.handler.reset_failures()
        with self._cond:
            for message in self._messages:
                message.path.with_suffix(".json").unlink(missing_ok=True)
                message.path.unlink(missing_ok=True)
            self._messages.clear()

    def _on_message(self, message: SinkMessage) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()
        if self.on_message is not None:
            self.on_message(message)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            await _serve(self.handler, self.host, self._port, self._stopped, self._on_ready, self.data_size_limit)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to start() if it happens before ready
            self._error = exc
            self._ready.set()

    def _on_ready(self, port: int) -> None:
        self._port = port
        self._ready.set()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo.sink", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--dir", type=Path, required=True, help="where messages are stored")
    parser.add_argument("--data-size-limit", type=int, default=DATA_SIZE_LIMIT)
    args = parser.parse_args(argv)

    async def run() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)

        def ready(port: int) -> None:
            print(f"READY {port}", flush=True)

        await _serve(SinkHandler(args.dir), args.host, args.port, stopped, ready, args.data_size_limit)

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
