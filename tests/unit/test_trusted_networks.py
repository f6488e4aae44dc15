"""``smtp.trusted_networks`` (relay without AUTH, off by default): the per-address memo gives
the same answers as the networks, for every address, and stays bounded."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

from gateway.smtp import handler as handler_mod
from gateway.smtp.handler import SubmissionHandler


def _handler(*nets: str) -> SimpleNamespace:
    return SimpleNamespace(trusted=tuple(ipaddress.ip_network(n) for n in nets), _trusted_memo={})


def _asks(h: SimpleNamespace, peer: object) -> bool:
    return SubmissionHandler.is_trusted(h, SimpleNamespace(peer=peer))


def test_trusted_answers_are_the_networks_and_repeat_the_same(monkeypatch) -> None:
    h = _handler("127.0.0.0/8", "2001:db8::/32")
    for _ in range(2):  # the second round comes from the memo
        assert _asks(h, ("127.0.0.1", 1025)) and _asks(h, ("127.9.9.9", 1))
        assert _asks(h, ("2001:db8::5", 1))
        assert not _asks(h, ("10.0.0.1", 1025)) and not _asks(h, ("::1", 1))
    assert not _asks(h, ("not-an-address", 1)) and not _asks(h, ()) and not _asks(h, None)
    assert not _asks(_handler(), ("127.0.0.1", 1))  # none configured: nobody
    monkeypatch.setattr(handler_mod, "TRUSTED_MEMO", 3)
    small = _handler("127.0.0.0/8")
    answers = [_asks(small, (f"127.0.0.{i}", 1)) for i in range(10)]
    assert all(answers) and len(small._trusted_memo) <= 3
    assert not _asks(small, ("192.0.2.1", 1))
