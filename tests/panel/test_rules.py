"""The rules area against the real panel process: the rule files read-only (escaped),
their validation state with file:line, the node's last reload, and the dry run (a true
dry run: nothing stored, changed or sent).  Only it_admin; every other role gets 403."""

from __future__ import annotations

import json

import pytest

from gateway.db.models import Approval, AuditLog, OutboundMessage

pytestmark = pytest.mark.integration


def dry(client, **fields: str):  # noqa: ANN201
    data = {"from": "", "to": "", "subject": "", "body": ""} | fields
    return client.post("/rules/dryrun", data)


@pytest.mark.parametrize("role", ["salesperson", "dept_head", "crm_admin", "auditor"])
def test_every_other_role_gets_403(http_as, role):
    client = http_as(role)
    assert client.get("/rules").status == 403
    r = dry(client, **{"from": "alice@acme.test", "to": "einkauf@hamburg-tools.de"})
    assert r.status == 403 and "dryrun-verdict" not in r.text


def test_files_shown_escaped_with_their_state(http_as, panel_server):
    page = http_as("it_admin").get("/rules")
    assert page.status == 200
    assert 'data-file="00-send-conflict.yaml"' in page.text and 'id="rules-ok"' in page.text
    assert "发信防冲突" in page.text  # the file's comment, shown as text
    assert "send-conflict" in page.text
    # nothing to edit: the only forms are the dry run and sign-out
    assert page.text.count("<form") == 2


def test_broken_file_is_reported_with_file_and_line(http_as, panel_server):
    broken = panel_server.rules_dir / "90-broken.yaml"
    broken.write_text("rules:\n  - name: oops <script>alert(1)</script>\n    priority: 50\n"
                      "    conditions:\n      no-such-condition: [x]\n    actions:\n      - reject: nope\n")
    try:
        admin = http_as("it_admin")
        page = admin.get("/rules")
        assert page.status == 200
        assert 'id="rules-errors"' in page.text and "90-broken.yaml:" in page.text
        assert "no-such-condition" in page.text
        assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;" in page.text
        r = dry(admin, **{"from": "alice@acme.test", "to": "einkauf@hamburg-tools.de"})
        assert r.status == 400 and "规则文件有错误" in r.text
    finally:
        broken.unlink()
    assert 'id="rules-ok"' in http_as("it_admin").get("/rules").text


def test_last_reload_and_refused_edit_from_the_node_status(http_as, panel_server):
    status = panel_server.data_dir / "rules-status.json"
    status.write_text(json.dumps({
        "loaded_at": "2026-11-30T03:00:00+00:00", "rule_count": 3,
        "rule_names": ["send-conflict", "examples-audit"], "ok": False,
        "errors": ["50-examples-audit.yaml:7: unknown action 'rejekt'"], "refused_at": "2026-11-30T03:05:09+00:00"}))
    try:
        page = http_as("it_admin").get("/rules")
        assert "2026-11-30 03:00:00 UTC" in page.text and 'id="rules-refused"' in page.text
        assert "2026-11-30 03:05:09 UTC" in page.text and "T03:0" not in page.text
        assert "50-examples-audit.yaml:7: unknown action" in page.text
    finally:
        status.unlink()
    assert "网关还没有报告加载状态" in http_as("it_admin").get("/rules").text


def test_dry_run_shows_the_trace_and_changes_nothing(http_as, panel_db):
    admin = http_as("it_admin")
    before = (OutboundMessage.select().count(), Approval.select().count(),
              AuditLog.select().where(AuditLog.action != "panel.signin").count())
    # Bob writes to Alice's customer: the shipped send-conflict rule refuses it
    r = dry(admin, **{"from": "bob@acme.test", "to": "einkauf@hamburg-tools.de", "subject": "Angebot"})
    assert r.status == 200
    assert 'id="dryrun-verdict"' in r.text and "verdict-reject" in r.text
    assert 'id="dryrun-steps"' in r.text and "send-conflict" in r.text and "00-send-conflict.yaml" in r.text
    # Alice writes to her own customer: accepted
    r = dry(admin, **{"from": "alice@acme.test", "to": "einkauf@hamburg-tools.de", "subject": "Angebot"})
    assert "verdict-accept" in r.text
    after = (OutboundMessage.select().count(), Approval.select().count(),
             AuditLog.select().where(AuditLog.action != "panel.signin").count())
    assert after == before


def test_dry_run_input_errors(http_as):
    admin = http_as("it_admin")
    r = dry(admin, **{"from": "alice@acme.test", "to": ""})
    assert r.status == 400 and "请填写发件人" in r.text
    r = dry(admin, **{"from": "alice@acme.test", "to": "not an address"})
    assert r.status == 400 and "地址无效" in r.text


def test_dry_run_needs_the_csrf_token(http_as):
    admin = http_as("it_admin")
    r = admin.post("/rules/dryrun", {"from": "bob@acme.test", "to": "einkauf@hamburg-tools.de"}, csrf=False)
    assert r.status == 403 and "dryrun-verdict" not in r.text
