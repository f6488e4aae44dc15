#!/usr/bin/env python3
"""DKIM signing cost: ms per message for 10 KB and 1 MB, RSA-2048 and Ed25519.

    python scripts/bench_dkim.py [--rounds 200]

Uses gateway.dkim (dkimpy canonicalisation, OpenSSL signatures through
cryptography) and, for comparison, dkimpy's own RSA signing (pure Python).
Target: RSA-2048 <= 2 ms for 10 KB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim  # noqa: E402

from gateway.dkim import DkimSigner, load_keys  # noqa: E402
from gateway.keys import make_dkim_keys  # noqa: E402


def message(size: int) -> bytes:
    head = (b"From: Alice <alice@acme.test>\r\nTo: buyer@own.example\r\nSubject: Offer\r\n"
            b"Date: Wed, 05 Mar 2025 10:00:00 +0000\r\nMessage-ID: <1@acme.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + line * ((size - len(head)) // len(line) + 1)


def timed(fn, rounds: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - started) / rounds * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_dkim_keys(d, "bench", "acme.test")
        keys = {k.algorithm: k for k in load_keys(d, "bench", ["rsa", "ed25519"])}
        signers = {
            "RSA-2048": DkimSigner({"acme.test": [keys["rsa-sha256"]]}),
            "Ed25519": DkimSigner({"acme.test": [keys["ed25519-sha256"]]}),
            "RSA+Ed25519 (dual)": DkimSigner({"acme.test": list(keys.values())}),
        }
        pem = (d / "bench-rsa.key").read_bytes()
        print(f"{'signer':<28}{'10 KB':>10}{'1 MB':>10}   (ms per message)")
        for size_name, size, rounds in (("10 KB", 10_000, args.rounds), ("1 MB", 1_000_000, max(5, args.rounds // 20))):
            msg = message(size)
            for name, signer in signers.items():
                ms = timed(lambda s=signer, m=msg: s.sign(m, "acme.test"), rounds)
                results.setdefault(name, {})[size_name] = ms
            ms = timed(lambda m=msg: dkim.sign(m, b"bench-rsa", b"acme.test", pem), max(3, rounds // 20))
            results.setdefault("dkimpy RSA-2048 (pure Python)", {})[size_name] = ms
        for name, row in results.items():
            print(f"{name:<28}{row['10 KB']:>10.2f}{row['1 MB']:>10.2f}")
        rsa10 = results["RSA-2048"]["10 KB"]
        print(f"RSA-2048, 10 KB: {rsa10:.2f} ms (target <= 2 ms) -> {'OK' if rsa10 <= 2 else 'SLOW'}")


results: dict[str, dict[str, float]] = {}

if __name__ == "__main__":
    main()
