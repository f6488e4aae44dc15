"""Hot reload: a good edit is swapped in, a broken edit keeps the old rules enforcing."""

from __future__ import annotations

import asyncio
import os

from gateway.config import Config
from gateway.policy import Policy
from gateway.rules.watcher import RuleReloader, RuleStatus, read_status, watch_rules

GOOD = "rules:\n  - name: no-col\n    conditions: {recipient: '*@col.example'}\n    actions: [{reject: blocked}]\n"
GOOD2 = "rules:\n  - name: no-pool\n    conditions: {recipient: '*@pool.example'}\n    actions: [{reject: pool}]\n"
BROKEN = "rules:\n  - name: no-pool\n    conditions: {recipient: '*@pool.example'}\n    actions: [{rejekt: x}]\n"


def bump(path, text):
    """Write and move the mtime forward, so the change is seen without waiting."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))


def test_broken_edit_keeps_old_rules(tmp_path, world, ctx_factory):
    d = tmp_path / "rules"
    d.mkdir()
    f = d / "10.yaml"
    f.write_text(GOOD)
    policy = Policy(world.directory, [])
    status = RuleStatus()
    reloader = RuleReloader(policy, d, status=status, status_path=tmp_path / "status.json", env=world.env)
    assert reloader.poll() is True
    assert policy.decide(ctx_factory(to=("x@col.example",))).action == "reject"
    assert reloader.poll() is None  # nothing changed

    bump(f, BROKEN)
    assert reloader.poll() is False
    assert not status.ok and "10.yaml:4" in status.errors[0]
    # The old rule still enforces; the broken one is not in force.
    assert policy.decide(ctx_factory(to=("x@col.example",))).action == "reject"
    assert policy.decide(ctx_factory(to=("x@pool.example",))).action == "accept"

    bump(f, GOOD2)
    assert reloader.poll() is True and status.ok and status.rule_names == ["no-pool"]
    assert policy.decide(ctx_factory(to=("x@pool.example",))).action == "reject"
    assert policy.decide(ctx_factory(to=("x@col.example",))).action == "accept"


def test_deleting_a_file_is_a_change(tmp_path, world):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "10.yaml").write_text(GOOD)
    (d / "20.yaml").write_text(GOOD2)
    policy = Policy(world.directory, [])
    reloader = RuleReloader(policy, d, status=RuleStatus(), env=world.env)
    reloader.poll()
    assert len(policy.rules) == 2
    (d / "20.yaml").unlink()
    assert reloader.poll() is True and [r.name for r in policy.rules] == ["no-col"]


def test_watch_rules_loop(tmp_path, world, ctx_factory):
    d = tmp_path / "rules"
    d.mkdir()
    f = d / "10.yaml"
    f.write_text(GOOD)
    cfg = Config()
    cfg.rules.dir = d
    cfg.node.data_dir = tmp_path / "var"
    policy = Policy(world.directory, [])
    status = RuleStatus()
    reloader = RuleReloader(policy, d, status=status, status_path=cfg.node.data_dir / "rules-status.json",
                            env=world.env)
    reloader.reload()
    results = []

    async def main():
        stop = asyncio.Event()

        def on_poll(result):
            results.append(result)
            if len(results) == 1:
                bump(f, BROKEN)  # the next poll sees a broken edit
            elif len(results) == 2:
                bump(f, GOOD2)
            else:
                stop.set()

        await asyncio.wait_for(watch_rules(policy, cfg, stop, interval=0, reloader=reloader, on_poll=on_poll), 10)

    asyncio.run(main())
    assert results == [None, False, True]
    assert [r.name for r in policy.rules] == ["no-pool"]
    assert read_status(cfg)["ok"] is True
