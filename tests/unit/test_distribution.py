"""Distribution pieces without a server: rule files, matching, parsing, the employee's copy,
reject/mapping keys, FETCH chunking and the IDLE arrival stash."""

from __future__ import annotations

import email
from pathlib import Path

import pytest

from gateway.distribute import manage, rules
from gateway.distribute.deliver import build_copy
from gateway.distribute.inquiry import parse
from gateway.distribute.language import detect
from gateway.distribute.router import domain_suffixes, list_keys
from gateway.distribute.watcher import _chunks, _pop_arrivals

REPO = Path(__file__).resolve().parents[2]


def raw(sender: str = "Buyer <buyer@firma.de>", subject: str = "Anfrage", body: str = "Hallo.",
        **headers: str) -> bytes:
    lines = [f"From: {sender}", "To: sales@acme.test", f"Subject: {subject}", "Message-ID: <m1@firma.de>",
             "Content-Type: text/plain; charset=utf-8"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


def test_shipped_example_rules_load() -> None:
    ruleset, errors = rules.load(REPO / "rules" / "distribution")
    assert errors == []
    assert set(ruleset.groups) == {"europe", "inquiries"}
    assert ruleset.rules == []  # the examples are all switched off


def test_rules_order_and_matching(tmp_path: Path) -> None:
    ruleset, errors = rules.load(write(tmp_path, """
groups:
  eu: {members: [Alice@acme.test, bob@acme.test], pick: least-loaded}
rules:
  - name: later
    when: {keyword: [quotation]}
    to: carol@acme.test
  - name: first
    priority: 5
    when: {country: [de], language: [de]}
    group: eu
"""))
    assert errors == []
    assert [r.name for r in ruleset.rules] == ["first", "later"]
    assert ruleset.groups["eu"].pick == "least-loaded"
    q = parse(raw(body="Wir brauchen ein Angebot für die Pumpen und die Lieferung nach Hamburg."))
    ok, why = ruleset.rules[0].matches(q)
    assert ok and "country .de" in why and "language de" in why
    assert not ruleset.rules[1].matches(q)[0]
    assert ruleset.rules[1].matches(parse(raw(subject="Quotation please")))[0]


def test_rule_errors_name_file_and_line(tmp_path: Path) -> None:
    _, errors = rules.load(write(tmp_path, """rules:
  - name: bad
    when: {contry: [de]}
    to: carol@acme.test
  - name: nogroup
    when: {keyword: [x]}
    group: asia
"""))
    text = "\n".join(errors)
    assert f"{tmp_path / 'r.yaml'}:3:" in text and "contry" in text
    assert "asia" in text


def test_reloader_keeps_last_good_set(tmp_path: Path) -> None:
    write(tmp_path, "rules:\n  - name: one\n    when: {keyword: [a]}\n    to: a@acme.test\n")
    loaded = []
    reloader = rules.RuleReloader(tmp_path, on_load=loaded.append)
    assert reloader.initial() == [] and len(loaded) == 1
    write(tmp_path, "rules:\n  - name: one\n    when: {nonsense: [a]}\n    to: a@acme.test\n  - x\n")
    assert reloader.check() is False and reloader.errors
    assert [r.name for r in reloader.ruleset.rules] == ["one"]


@pytest.mark.parametrize(("domain", "country"), [("firma.de", "de"), ("shop.co.uk", "gb"), ("acme.com", ""),
                                                 ("x.xn--p1ai", "")])
def test_country_of(domain: str, country: str) -> None:
    assert rules.country_of(domain) == country


@pytest.mark.parametrize(("text", "lang"), [
    ("请问这个产品的报价是多少？我们需要一百台。", "zh"),
    ("Wir brauchen ein Angebot für die Pumpen und die Lieferung nach Hamburg.", "de"),
    ("We would like a quotation for the pumps and the delivery to Hamburg.", "en"),
])
def test_language(text: str, lang: str) -> None:
    assert detect(text) == lang


def test_parse_is_defensive_and_finds_thread_ids() -> None:
    q = parse(raw(In_Reply_To="<a@acme.test>", References="<b@acme.test> <a@acme.test>"))
    assert q.from_addr == "buyer@firma.de" and q.from_name == "Buyer" and q.message_id == "<m1@firma.de>"
    assert set(q.thread_ids) == {"<a@acme.test>", "<b@acme.test>"}
    broken = parse(b"\xff\xfe garbage without headers")
    assert broken.from_addr == "" and broken.thread_ids == []
    assert parse(raw(X_Mailgate_Distribution_Id="abc.1.mg")).looped


def test_copy_keeps_the_original_and_adds_resent_headers() -> None:
    original = raw()
    q = parse(original)
    copy = build_copy(original, q, "sales@acme.test", "bob@acme.test", "tok.7.mg", "gw.acme.test")
    assert copy.endswith(original)
    msg = email.message_from_bytes(copy)
    assert msg["Resent-From"] == "sales@acme.test" and msg["Resent-To"] == "bob@acme.test"
    assert msg["From"] == "Buyer <buyer@firma.de>" and msg["Reply-To"] == "buyer@firma.de"
    assert msg["X-Mailgate-Distribution-Id"] == "tok.7.mg" and msg["Resent-Message-ID"].endswith("@gw.acme.test>")
    # a Reply-To of the sender's own is kept, not overridden; header injection is neutralised
    own = raw(Reply_To="orders@firma.de")
    copy = build_copy(own, parse(own), "sales@acme.test", "bob@acme.test\r\nBcc: evil@x.example", "t.1.mg")
    msg = email.message_from_bytes(copy)
    assert msg.get_all("Reply-To") == ["orders@firma.de"] and msg["Bcc"] is None


def test_keys() -> None:
    assert domain_suffixes("a.b.example") == ["a.b.example", "b.example", "example"]
    assert list_keys("X@Sub.Firma.DE") == ["x@sub.firma.de", "sub.firma.de", "firma.de", "de"]
    assert list_keys("") == []
    assert manage.normalize_key(" <Buyer@Firma.de> ") == "buyer@firma.de"
    assert manage.normalize_key("@firma.de") == "firma.de"
    for bad in ("firma", "@", "a b@c.de", "*.firma.de", "x@"):
        with pytest.raises(manage.ManageError):
            manage.normalize_key(bad)


def test_chunks_bound_fetch_bytes() -> None:
    meta = {1: {b"RFC822.SIZE": 60}, 2: {b"RFC822.SIZE": 60}, 3: {b"RFC822.SIZE": 10_000}, 4: {b"RFC822.SIZE": 30}}
    assert _chunks([1, 2, 3, 4], meta, budget=100, max_size=1000) == [[1], [2, 3, 4]]


def test_pop_arrivals_reads_imaplibs_stash() -> None:
    class Imap:
        untagged_responses = {"EXISTS": [b"5"], "FETCH": [b"x"]}

    class Client:
        _imap = Imap()

    client = Client()
    assert _pop_arrivals(client) is True
    assert "EXISTS" not in Imap.untagged_responses and "FETCH" in Imap.untagged_responses
    assert _pop_arrivals(client) is False
    assert _pop_arrivals(object()) is False


GROUP_RULES = """
groups:
  rr: {members: [alice@acme.test, bob@acme.test, gone@acme.test], pick: round-robin}
  ll: {members: [alice@acme.test, bob@acme.test], pick: least-loaded}
rules:
  - name: to-gone
    priority: 1
    when: {keyword: [gone]}
    to: gone@acme.test
  - name: least
    priority: 2
    when: {keyword: [least]}
    group: ll
  - name: turns
    priority: 3
    when: {keyword: [turn]}
    group: rr
"""


def test_router_groups_and_inactive_targets(db, tmp_path: Path) -> None:
    from gateway import customers
    from gateway.directory import Directory
    from gateway.distribute.router import Router
    from gateway.distribute.schema import DistDelivery, DistReject, Distribution

    alice = customers.create_employee("alice@acme.test", "Alice")
    bob = customers.create_employee("bob@acme.test", "Bob")
    gone = customers.create_employee("gone@acme.test", "Gone")
    gone.active = False
    gone.save()
    directory = Directory(["acme.test"], ())
    directory.load()
    ruleset, errors = rules.load(write(tmp_path, GROUP_RULES))
    assert errors == []
    router = Router(directory, ruleset)

    def to(subject: str, sender: str = "x@lead.example") -> tuple[str, list[int]]:
        d = router.route(parse(raw(sender=sender, subject=subject))).decision
        return d.step, list(d.employees)

    # an inactive employee is skipped: the next rule may decide (none here)
    assert to("gone") == ("none", [])
    # round-robin over the active members, in turn; the counter is in the DB (a new router continues)
    assert [to("turn")[1] for _ in range(3)] == [[alice.id], [bob.id], [alice.id]]
    assert Router(directory, ruleset).route(parse(raw(subject="turn"))).decision.employees == (bob.id,)
    # least-loaded: alice has a copy already, so bob
    rec = Distribution.create(mailbox="s@acme.test", folder="INBOX", uidvalidity=1, uid=1, token="t1",
                              state="distributed")
    DistDelivery.create(distribution=rec, employee=alice, method="forward")
    assert to("least") == ("rule", [bob.id])
    # the reject list wins over rules, by address or any domain above it
    DistReject.create(key="lead.example")
    step, people = to("turn", sender="x@sub.lead.example")
    assert (step, people) == ("reject", [])
