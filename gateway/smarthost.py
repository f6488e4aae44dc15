"""One SMTP session to the upstream smarthost (used by the relay workers, gateway/relay.py).

``SmarthostConnection`` opens STARTTLS/TLS (or plain on loopback only), logs in, and
reuses the session while the credentials stay the same: no RSET after a clean 250.
``Reply`` classifies an answer (sent / deferred / bounced) and its enhanced status.
Blocking: call from a worker thread.

A stop (``stop_sending``, ``stop_waiting``: called from another thread, the relay worker's
stop deadlines) cuts a transaction by shutting its socket down — from before its TCP connect
on (``_open_socket``), so a connect or greeting still pending is cut too.  The end of data (the final
"." line) is the point of no return: before it nothing can have been delivered, so a cut
there raises ``DeliveryAborted`` and the message may simply be tried again; after it the
upstream may have taken the message, so ``stop_sending`` lets the transaction wait for its
reply, and only ``stop_waiting`` ends that wait (``ReplyAbandoned``: the outcome is unknown).
Which side of the dot a transaction is on is decided under one lock, so a cut never lands
on a transaction whose dot went out after the cut was decided.
"""

from __future__ import annotations

import ipaddress
import re
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from gateway.config import ConfigError, UpstreamConfig

Credentials = tuple[str, str]
T = TypeVar("T")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_MAX_ERROR = 1000


@dataclass(frozen=True)
class Reply:
    """An SMTP reply (``code`` None: no reply at all — connection error, timeout …)."""

    code: int | None
    text: str

    @classmethod
    def of(cls, code: int | None, text: bytes | str) -> Reply:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return cls(code, " ".join(str(text).split()))

    @property
    def outcome(self) -> str:
        if self.code is not None and 200 <= self.code < 300:
            return "sent"
        if self.code is not None and 500 <= self.code < 600:
            return "bounced"
        return "deferred"

    @property
    def status(self) -> str:
        """Enhanced status code: from the reply text, or derived from the basic code."""
        match = _ENHANCED.match(self.text)
        if match and self.code is not None and match.group(1) == str(self.code)[0]:
            return match.group(0)
        return {"sent": "2.0.0", "bounced": "5.0.0"}.get(self.outcome, "4.0.0")

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code is not None else self.text


class DeliveryAborted(Exception):
    """A stop cut the transaction before its end of data was sent: nothing was delivered."""


class ReplyAbandoned(Exception):
    """A stop ended the wait for the reply to the end of data: the upstream may have taken
    the message, or not."""


# Where a transaction stands (``SmarthostConnection._phase``).
_IDLE, _SENDING, _WAITING, _ANSWERED = "idle", "sending", "waiting", "answered"
# How far a stop has gone (``SmarthostConnection._halt``).
_RUNNING, _NO_MORE_DOTS, _NO_MORE_WAITING = 0, 1, 2


class RelayError(Exception):
    """The session could not be set up; ``reply`` says why (all recipients share it)."""

    def __init__(self, reply: Reply, *, auth: bool = False):
        super().__init__(str(reply))
        self.reply = reply
        self.auth = auth


def tls_context(upstream: UpstreamConfig) -> ssl.SSLContext:
    """Verify with ``ca_file`` (or the system CAs); ``verify_tls = false`` skips the
    host name check — and, without a ``ca_file``, the certificate check too."""
    ca_file = str(upstream.ca_file) if upstream.ca_file else None
    context = ssl.create_default_context(cafile=ca_file)
    if not upstream.verify_tls:
        context.check_hostname = False
        if ca_file is None:
            context.verify_mode = ssl.CERT_NONE
    return context


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SmarthostConnection:
    """One SMTP session, reused while the credentials stay the same (RSET between)."""

    def __init__(
        self,
        host: str,
        port: int,
        security: str,
        *,
        timeout: float,
        context: ssl.SSLContext,
        local_hostname: str,
    ) -> None:
        if security not in ("starttls", "tls", "none"):
            raise ConfigError([f"[relay] security: unknown value {security!r}"])
        if security == "none" and not is_loopback(host):
            raise ConfigError(
                [f"[relay] security = none is allowed only for a loopback host, not {host!r}"]
            )
        self.host, self.port, self.security = host, port, security
        self.timeout = timeout
        self.context = context
        self.local_hostname = local_hostname
        self._smtp: smtplib.SMTP | None = None
        self._credentials: Credentials | None = None
        self._clean = False  # the last transaction ended with a 250: no RSET needed
        self.sessions_opened = 0  # for tests and debugging: reuse shows here
        # A stop's cut (another thread) against the transaction's own steps: see the module doc.
        self._guard = threading.Lock()
        self._phase = _IDLE
        self._halt = _RUNNING
        # A duplicate of the socket of the session being opened or open (``_open_socket``):
        # what a cut shuts down, whatever the session object holds meanwhile (a TCP connect
        # still pending, a TLS handshake, the greeting …).
        self._handle: socket.socket | None = None

    @property
    def relay(self) -> str:
        return f"{self.host}:{self.port}"

    def send(
        self, credentials: Credentials | None, mail_from: str, recipients: list[str], data: bytes
    ) -> dict[str, Reply]:
        """One transaction; the reply for each recipient.  Raises RelayError, OSError,
        smtplib.SMTPException when no transaction could be made or the session broke;
        ``DeliveryAborted`` / ``ReplyAbandoned`` when a stop cut it (``stop_sending``,
        ``stop_waiting``)."""
        with self._guard:
            if self._halt != _RUNNING:
                raise DeliveryAborted("the relay is stopping")
            self._phase = _SENDING
        try:
            return self._transaction(credentials, mail_from, recipients, data)
        except (DeliveryAborted, ReplyAbandoned):
            raise
        except Exception as exc:
            with self._guard:
                phase, halt = self._phase, self._halt
            if phase == _SENDING and halt != _RUNNING:
                raise DeliveryAborted(f"cut before the end of data: {describe(exc)}") from exc
            if phase == _WAITING and halt == _NO_MORE_WAITING:
                raise ReplyAbandoned(f"no reply to the end of data: {describe(exc)}") from exc
            raise
        finally:
            with self._guard:
                self._phase = _IDLE

    def stop_sending(self) -> str:
        """From any thread: no transaction sends its end of data from now on.  One that has
        not sent it yet is cut at once (``DeliveryAborted``: nothing delivered, and its
        ``send`` returns soon even if the upstream is stuck); one past it waits for its reply.
        Returns "cut", "waiting" (for a reply) or "" (no transaction)."""
        with self._guard:
            self._halt = max(self._halt, _NO_MORE_DOTS)
            if self._phase == _SENDING:
                self._cut()
                return "cut"
            return "waiting" if self._phase == _WAITING else ""

    def stop_waiting(self) -> None:
        """From any thread: as ``stop_sending``, and a transaction waiting for the reply to its
        end of data stops waiting (``ReplyAbandoned``)."""
        with self._guard:
            self._halt = _NO_MORE_WAITING
            if self._phase in (_SENDING, _WAITING):
                self._cut()

    def _cut(self) -> None:
        """Shut the session's socket down (the guard held): the thread blocked on it gets EOF
        or an error at once — a connect still pending too (Linux aborts it: ECONNRESET).
        Through the duplicate ``_handle``, a plain socket: an SSLSocket's state stays, and
        ``close`` still runs in that thread."""
        if self._handle is not None:
            try:
                self._handle.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _open_socket(self, host: str, port: int, timeout: float,
                     source_address: tuple[str, int] | None) -> socket.socket:
        """``socket.create_connection`` with a cut handle: each socket is registered before its
        connect, so a stop can abort the connect (no greeting yet: nothing sent).  Name
        resolution is not cut (the relay host is an address or a name the resolver knows)."""
        error: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            with self._guard:
                if self._halt != _RUNNING:
                    sock.close()
                    raise DeliveryAborted("the relay is stopping")
                self._drop_handle()
                self._handle = sock.dup()
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(address)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
                with self._guard:
                    self._drop_handle()
        raise error or OSError(f"no address for {host!r}")

    def _drop_handle(self) -> None:
        """Close the cut handle (the guard held, or the session's own thread when no cut can
        come: the handle is swapped under the guard)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def _transaction(
        self, credentials: Credentials | None, mail_from: str, recipients: list[str], data: bytes
    ) -> dict[str, Reply]:
        smtp = self._session(credentials)
        options = []
        if smtp.has_extn("size"):
            options.append(f"SIZE={len(data)}")
        if not data.isascii() and smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (mail_from.isascii() and all(r.isascii() for r in recipients)):
            if not smtp.has_extn("smtputf8"):
                reply = Reply(553, "5.6.7 the upstream server does not support SMTPUTF8 addresses")
                return dict.fromkeys(recipients, reply)
            options.append("SMTPUTF8")
        reused = self._clean
        self._clean = False
        if smtp.has_extn("pipelining") and _plain(mail_from, recipients):
            return self._reopened_if_stale(
                smtp, credentials, reused, lambda s: self._pipelined(s, mail_from, recipients, options, data))
        code, text = self._reopened_if_stale(smtp, credentials, reused, lambda s: _mail(s, mail_from, options))
        smtp = self._smtp  # the fresh session, if one was opened
        if code != 250:
            self._reset()
            return dict.fromkeys(recipients, Reply.of(code, text))
        replies: dict[str, Reply] = {}
        accepted = []
        for rcpt in recipients:
            replies[rcpt] = Reply.of(*smtp.rcpt(rcpt))
            if replies[rcpt].outcome == "sent":
                accepted.append(rcpt)
        if not accepted:
            self._reset()
            return replies
        go_ahead = Reply.of(*smtp.docmd("data"))
        # DATA itself refused (no 354): that answer is every accepted recipient's.
        final = self._end_of_data(smtp, data) if go_ahead.code == 354 else go_ahead
        if final.outcome != "sent":
            self._reset()
        else:
            self._clean = True  # the next transaction may follow without an RSET
        replies.update(dict.fromkeys(accepted, final))
        return replies

    def _reopened_if_stale(self, smtp: smtplib.SMTP, credentials: Credentials | None, reused: bool,
                           attempt: Callable[[smtplib.SMTP], T]) -> T:
        """``attempt(smtp)``; if a kept session turns out gone before its first reply (it went
        away while idle), once more on a fresh session — the same transaction, never sent."""
        try:
            return attempt(smtp)
        except _Stale as exc:
            if not reused:
                raise exc.cause from None
        self.close()
        try:
            return attempt(self._session(credentials))
        except _Stale as exc:
            raise exc.cause from None

    def _pipelined(
        self, smtp: smtplib.SMTP, mail_from: str, recipients: list[str], options: list[str], data: bytes
    ) -> dict[str, Reply]:
        """The transaction with PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write,
        their replies read in order; the message after a 354 only.  One round trip less per
        recipient, and one send instead of one per command.  ``data`` has CRLF line ends
        (the relay normalizes them), so dot-stuffing is a plain replace."""
        params = "".join(f" {o}" for o in options)
        commands = [f"MAIL FROM:<{mail_from}>{params}\r\n", *(f"RCPT TO:<{r}>\r\n" for r in recipients), "DATA\r\n"]
        try:
            smtp.send("".join(commands))
            mail = Reply.of(*smtp.getreply())
        except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
            raise _Stale(exc) from None  # gone before it answered anything: safe to try again
        replies = {rcpt: Reply.of(*smtp.getreply()) for rcpt in recipients}
        go_ahead = Reply.of(*smtp.getreply())
        if mail.code != 250:  # the RCPTs and DATA were refused for it (503)
            replies = dict.fromkeys(recipients, mail)
        accepted = [r for r in recipients if replies[r].outcome == "sent"] if mail.code == 250 else []
        if go_ahead.code == 354 and not accepted:
            smtp.send(".\r\n")  # a server that took DATA anyway: end it empty, then reset
            smtp.getreply()
        if go_ahead.code != 354 or not accepted:
            self._reset()
            if accepted:  # DATA itself refused: that answer is every accepted recipient's
                replies.update(dict.fromkeys(accepted, go_ahead))
            return replies
        final = self._end_of_data(smtp, data)
        if final.outcome != "sent":
            self._reset()
        else:
            self._clean = True
        replies.update(dict.fromkeys(accepted, final))
        return replies

    def _end_of_data(self, smtp: smtplib.SMTP, data: bytes) -> Reply:
        """After the 354: the message and its end of data in one write, then the reply.  The
        point of no return: a stop that came first aborts here (nothing delivered); once past
        it, only ``stop_waiting`` cuts the wait.  ``data`` has CRLF line ends (the relay
        normalizes them), so dot-stuffing is a plain replace."""
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        with self._guard:
            if self._halt != _RUNNING:
                raise DeliveryAborted("the relay is stopping: the end of data was not sent")
            self._phase = _WAITING
        smtp.send(stuffed + b".\r\n")
        reply = Reply.of(*smtp.getreply())
        with self._guard:
            self._phase = _ANSWERED  # known: a cut from now on changes nothing
        return reply

    def close(self) -> None:
        smtp, self._smtp, self._credentials = self._smtp, None, None
        self._clean = False
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()
        with self._guard:
            self._drop_handle()

    def _reset(self) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def _session(self, credentials: Credentials | None) -> smtplib.SMTP:
        if self._smtp is not None and self._credentials == credentials:
            if self._clean:
                return self._smtp
            try:
                if self._smtp.rset()[0] == 250:
                    return self._smtp
            except (smtplib.SMTPException, OSError):
                pass
        self.close()
        try:
            self._smtp = self._connect(credentials)
        except BaseException:
            with self._guard:
                self._drop_handle()
            raise
        self._credentials = credentials
        return self._smtp

    def _connect(self, credentials: Credentials | None) -> smtplib.SMTP:
        """A new session: connect (a stop's cut reaches the socket from before its connect on,
        ``_open_socket``), greeting, EHLO, STARTTLS, AUTH."""
        smtp: smtplib.SMTP
        if self.security == "tls":
            smtp = _CuttableSMTP_SSL(local_hostname=self.local_hostname, timeout=self.timeout, context=self.context)
        else:
            smtp = _CuttableSMTP(local_hostname=self.local_hostname, timeout=self.timeout)
        smtp.open_socket = self._open_socket  # type: ignore[attr-defined]
        smtp._host = self.host  # the TLS server name (smtplib sets it only when given the host at once)
        try:
            code, text = smtp.connect(self.host, self.port)
        except BaseException:
            smtp.close()
            raise
        if code != 220:
            smtp.close()
            raise RelayError(Reply.of(code, text))
        self.sessions_opened += 1
        with self._guard:
            halted = self._halt != _RUNNING
        if halted:  # the stop came while connecting: no greeting, no login
            smtp.close()
            raise DeliveryAborted("the relay is stopping")
        try:
            self._hello(smtp)
            if self.security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise RelayError(Reply(None, "upstream does not offer STARTTLS; not sending in clear"))
                code, text = smtp.starttls(context=self.context)
                if code != 220:
                    raise RelayError(Reply.of(code, text))
                self._hello(smtp)
            if credentials is not None and smtp.has_extn("auth"):
                self._login(smtp, credentials)
        except BaseException:
            smtp.close()
            raise
        return smtp

    @staticmethod
    def _hello(smtp: smtplib.SMTP) -> None:
        code, text = smtp.ehlo()
        if code != 250:
            raise RelayError(Reply.of(code, text))

    @staticmethod
    def _login(smtp: smtplib.SMTP, credentials: Credentials) -> None:
        try:
            smtp.login(*credentials)
        except smtplib.SMTPAuthenticationError as exc:
            raise RelayError(Reply.of(exc.smtp_code, exc.smtp_error), auth=True) from None
        except smtplib.SMTPException as exc:  # e.g. no common mechanism: not a reply
            raise RelayError(Reply(None, f"authentication impossible: {exc}"), auth=True) from None



class _CuttableSMTP(smtplib.SMTP):
    """smtplib.SMTP whose socket comes from ``SmarthostConnection._open_socket`` (``open_socket``,
    set before ``connect``): registered for a stop's cut before its TCP connect."""

    open_socket: Callable[[str, int, float, tuple[str, int] | None], socket.socket]

    def _get_socket(self, host, port, timeout):  # noqa: ANN001, ANN202 — smtplib's signature
        if timeout is not None and not timeout:
            raise ValueError("Non-blocking socket (timeout=0) is not supported")
        return self.open_socket(host, port, timeout, self.source_address)


class _CuttableSMTP_SSL(smtplib.SMTP_SSL, _CuttableSMTP):  # noqa: N801
    """The same for implicit TLS: SMTP_SSL wraps the socket ``_CuttableSMTP`` opened."""


class _Stale(Exception):
    """The session was gone before the first reply of a transaction (safe to try again)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _mail(smtp: smtplib.SMTP, mail_from: str, options: list[str]) -> tuple[int, bytes]:
    """MAIL FROM, one command at a time; a session found gone raises ``_Stale``."""
    try:
        return smtp.mail(mail_from, options)
    except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
        raise _Stale(exc) from None


_PLAIN = re.compile(r"[!#-;=?-~]*\Z")  # printable ASCII without space, "<", ">" (and "\"" nowhere)


def _plain(mail_from: str, recipients: list[str]) -> bool:
    """Addresses that go between angle brackets as they are (every queued address passed the
    submission's checks; anything unusual takes smtplib's own quoting, unpipelined)."""
    return all(_PLAIN.match(a) for a in (mail_from, *recipients))


def describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        return str(Reply.of(exc.smtp_code, exc.smtp_error))
    if isinstance(exc, TimeoutError):
        return "timed out talking to the upstream server"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused by the upstream server"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {exc.reason or exc}"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:_MAX_ERROR]
