"""A line-level client for what imaplib and smtplib cannot say (injected bytes, half commands,
huge lines): plain or TLS, from a chosen source address, reading whole CRLF lines."""

from __future__ import annotations

import socket
import ssl


class LineClient:
    def __init__(self, host: str, port: int, context: ssl.SSLContext | None = None, source: str | None = None,
                 timeout: float = 30.0) -> None:
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        self.sock = context.wrap_socket(sock, server_hostname="localhost") if context else sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, without its CRLF (EOFError with what was read if the peer closes)."""
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def until(self, tag: bytes) -> list[bytes]:
        """IMAP: every line up to and including the one tagged ``tag``."""
        lines = []
        while True:
            ln = self.line()
            lines.append(ln)
            if ln.startswith(tag + b" "):
                return lines

    def reply(self) -> bytes:
        """SMTP: one reply, its lines joined by LF."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"\n".join(lines)

    def close(self) -> None:
        self.sock.close()
