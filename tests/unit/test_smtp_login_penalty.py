"""The SMTP AUTH penalty (SubmissionHandler._login with LoginGuard): a refused password counts
as a failure, an upstream that could not decide does not."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gateway.smtp.auth import UpstreamUnavailable
from gateway.smtp.guard import LoginGuard
from gateway.smtp.handler import SubmissionHandler


class Authenticator:
    def __init__(self, answer: bool | None):
        self.answer = answer

    async def verify(self, username: str, password: str, client_ip: str) -> bool:
        if self.answer is None:
            raise UpstreamUnavailable("connection refused")
        return self.answer


def login(answer: bool | None, guard: LoginGuard) -> object:
    handler = SimpleNamespace(guard=guard, authenticator=Authenticator(answer),
                              directory=SimpleNamespace(employee_for_address=lambda a: None))
    server = SimpleNamespace(session=SimpleNamespace(peer=("192.0.2.9", 5000)))
    return asyncio.run(SubmissionHandler._login(handler, server, b"alice@acme.test", b"pw"))


def test_a_refused_password_counts_and_an_unavailable_upstream_does_not():
    guard = LoginGuard(base_delay=0.001, max_delay=0.001)
    result = login(None, guard)
    assert not result.success and result.message.startswith("454")
    assert guard.delay("192.0.2.9", "alice@acme.test") == 0  # nothing counted, nothing left in flight
    assert not login(False, guard).success
    assert guard.delay("192.0.2.9", "alice@acme.test") > 0  # the failure counts
    # ... for the address too, where a second user name failing from it shows it.
    assert guard.delay("192.0.2.9", "someone-else") == 0
    guard.end("192.0.2.9", "mallory@acme.test", False)
    assert guard.delay("192.0.2.9", "someone-else") > 0
