"""DKIM: RSA-2048 + Ed25519 dual signatures that dkimpy verifies against a DNS stub."""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest

from gateway.config import Config
from gateway.dkim import DkimSign, DkimSigner, from_domain, load_keys, signing_mutation
from gateway.keys import make_dkim_keys
from gateway.mutate import Outgoing

MESSAGE = (
    b"From: Alice <alice@acme.test>\r\nTo: buyer@own.example\r\nSubject: Offer\r\n"
    b"Date: Wed, 05 Mar 2025 10:00:00 +0000\r\nMessage-ID: <1@acme.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    + b"Dear buyer,\r\n\r\nplease find our offer.\r\n" * 300
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("dkim")
    return d, make_dkim_keys(d, "mailgate", "acme.test")


@pytest.fixture
def dns(keys):
    _, records = keys

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        table = {
            b"mailgate-rsa._domainkey.acme.test.": records["rsa"].encode(),
            b"mailgate-ed25519._domainkey.acme.test.": records["ed25519"].encode(),
        }
        return table.get(name)

    return dnsfunc


@pytest.fixture
def signer(keys) -> DkimSigner:
    return DkimSigner({"acme.test": load_keys(keys[0], "mailgate", ["rsa", "ed25519"])})


def verify_all(data: bytes, dnsfunc) -> list[bool]:
    d = dkim.DKIM(data)
    n = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    results = []
    for i in range(n):
        try:
            results.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            results.append(False)
    return results


def test_dual_signature_verifies(signer, dns):
    pytest.importorskip("nacl")  # dkimpy verifies Ed25519 with PyNaCl
    signed = signer.sign(MESSAGE, "acme.test")
    assert signed.endswith(MESSAGE)
    assert signed.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in signed and b"a=ed25519-sha256" in signed
    assert verify_all(signed, dns) == [True, True]


def test_rsa_signature_verifies_without_nacl(signer, dns):
    signed = signer.sign(MESSAGE, "acme.test")
    d = dkim.DKIM(signed)
    rsa_index = [i for i, (n, v) in enumerate(h for h in d.headers if h[0].lower() == b"dkim-signature")
                 if b"rsa-sha256" in v][0]
    assert d.verify(idx=rsa_index, dnsfunc=dns)


def test_from_is_oversigned_and_d_aligns(signer):
    signed = signer.sign(MESSAGE, "acme.test")
    sig = dkim.DKIM(signed).headers[0][1]
    h_tag = [p for p in sig.replace(b"\r\n", b"").replace(b" ", b"").replace(b"\t", b"").split(b";")
             if p.startswith(b"h=")][0]
    names = h_tag[2:].split(b":")
    assert names.count(b"from") == 2  # once present, once more: no second From can be added
    assert b"d=acme.test" in sig


def test_tampering_breaks_the_signature(signer, dns):
    signed = signer.sign(MESSAGE, "acme.test")
    assert verify_all(signed.replace(b"our offer", b"our 0ffer", 1), dns)[0] is False
    extra_from = b"From: Mallory <m@evil.example>\r\n" + signed
    assert verify_all(extra_from, dns)[0] is False


def test_unknown_domain_is_left_unsigned(signer):
    assert signer.sign(MESSAGE, "other.example") == MESSAGE
    out = Outgoing("a@other.example", ["b@x.example"], MESSAGE.replace(b"alice@acme.test", b"a@other.example"))
    DkimSign(signer).apply(out, None)
    assert b"DKIM-Signature" not in out.data and "no key for other.example" in out.notes[0]


def test_mutation_signs_for_the_from_domain(signer, dns):
    out = Outgoing("alice@acme.test", ["buyer@own.example"], MESSAGE)
    mutation = DkimSign(signer)
    assert mutation.stage == "sign"
    mutation.apply(out, None)
    assert from_domain(out.data) == "acme.test"
    assert verify_all(out.data, dns)[0] is True


def test_signing_mutation_from_config(keys, tmp_path):
    cfg = Config()
    cfg.dkim.key_dir = keys[0]
    assert signing_mutation(cfg).signer.keys["acme.test"][0].selector == "mailgate-rsa"
    cfg.dkim.enabled = False
    assert signing_mutation(cfg) is None
    cfg.dkim.enabled = True
    cfg.dkim.key_dir = tmp_path  # no keys there
    assert signing_mutation(cfg) is None


def test_fast_relaxed_body_equals_dkimpy():
    import random

    from gateway.dkim import canonical_body

    canon = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    rnd = random.Random(3)
    pieces = [b"a", b" ", b"\t", b"\r\n", b"x", b"  ", b"\r\n\r\n", "é".encode()]
    for _ in range(5000):
        body = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 30)))
        assert canonical_body(canon, body) == canon.canonicalize_body(body), body


def test_a_header_line_that_is_no_field_is_signed_as_postfix_reads_it(signer, dns):
    """The line starts the body (Postfix's cleanup puts a blank line before it): signed with
    that blank line, so the signature verifies on what the upstream relays."""
    raw = MESSAGE.replace(b"Subject: Offer\r\n", b"Subject: Offer\r\nno colon here\r\n")
    out = Outgoing("alice@acme.test", ["buyer@own.example"], raw)
    DkimSign(signer).apply(out, None)
    assert out.notes[-1] == "DKIM-signed for acme.test"
    assert b"Subject: Offer\r\n\r\nno colon here\r\nDate: " in out.data
    assert verify_all(out.data, dns) == [True, True]
