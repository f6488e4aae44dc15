"""``[node] event_loop``: the standard library's loop by default, uvloop on request."""

import asyncio

import pytest
import uvloop

from gateway import config
from gateway.eventloop import new_event_loop


@pytest.mark.parametrize(("kind", "expected"), [("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)])
def test_the_configured_loop_runs_coroutines(kind, expected):
    loop = new_event_loop(kind)
    try:
        assert isinstance(loop, expected)
        assert loop.run_until_complete(asyncio.sleep(0, result="ran")) == "ran"
    finally:
        loop.close()


def test_asyncio_is_the_default_and_a_wrong_name_is_a_config_problem():
    assert config.from_dict({"relay": {"username": "u", "password": "p"}}).node.event_loop == "asyncio"
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"node": {"event_loop": "trio"}, "relay": {"username": "u", "password": "p"}})
    assert any(p.startswith("[node] event_loop: uvloop or asyncio") for p in err.value.problems)
    with pytest.raises(ValueError, match="unknown event loop"):
        new_event_loop("trio")
