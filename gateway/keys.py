"""Key material made by ``mailgate init``: a self-signed TLS certificate and
DKIM key pairs (RSA-2048 and Ed25519), all with ``cryptography``."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_self_signed(cert_path: Path, key_path: Path, hostname: str, days: int = 825) -> None:
    """A self-signed server certificate for ``hostname``, localhost and 127.0.0.1."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    alt = [x509.DNSName(hostname), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_dkim_keys(directory: Path, selector: str, domain: str) -> dict[str, str]:
    """RSA-2048 and Ed25519 private keys plus the DNS TXT records to publish.

    Returns {algorithm: txt record}.  Files: <selector>-rsa.key, <selector>-ed25519.key
    and <selector>.dns (the records, one per line).
    """
    records = {}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_private(
        directory / f"{selector}-rsa.key",
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
    )
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    records["rsa"] = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    ed_key = ed25519.Ed25519PrivateKey.generate()
    raw_priv = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    _write_private(directory / f"{selector}-ed25519.key", base64.b64encode(raw_priv) + b"\n")
    raw_pub = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    records["ed25519"] = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_pub).decode()}"
    lines = [
        f'{selector}-rsa._domainkey.{domain}. IN TXT "{records["rsa"]}"',
        f'{selector}-ed25519._domainkey.{domain}. IN TXT "{records["ed25519"]}"',
    ]
    (directory / f"{selector}.dns").write_text("\n".join(lines) + "\n")
    return records
