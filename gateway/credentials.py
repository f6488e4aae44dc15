"""Sealing of an employee's submission credentials (relay.mode = employee_credentials).

The SMTP side seals the username and password the employee logged in with
into the queue row; the relay worker unseals them to authenticate upstream
and erases them once the message is finished.  AES-256-GCM with a random
96-bit nonce; the row's queue id is the associated data, so a sealed blob
copied onto another row does not open.

Blob layout: ``version (1 byte) | nonce (12 bytes) | ciphertext + tag``.
The key file (``certs/queue.key``) holds the 32-byte key, base64-encoded,
mode 0600.  Every node that relays the same queue needs the same key file.

Nothing here logs, and no value returned here has a repr showing a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

KEY_SIZE = 32
NONCE_SIZE = 12
_VERSION = b"\x01"
_AAD_PREFIX = b"mailgate-credentials-v1:"


class CredentialsError(Exception):
    """A key file is unusable, or a sealed blob does not open (wrong key or row)."""


def load_or_create_key(path: Path) -> bytes:
    """Return the 32-byte key stored at ``path``, creating it (mode 0600) if missing."""
    path = Path(path)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=KEY_SIZE * 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process created the key meanwhile: use theirs.
        os.link(tmp, path)
    except FileExistsError:
        return _read_key(path)
    finally:
        os.unlink(tmp)
    return key


def _read_key(path: Path) -> bytes:
    data = path.read_bytes()
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); setting 0600", path, mode)
        os.chmod(path, 0o600)
    if len(data) == KEY_SIZE:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise CredentialsError(f"{path}: not a {KEY_SIZE}-byte key")
    return key


def seal(key: bytes, username: str, password: str, queue_id: str) -> bytes:
    """Encrypt ``username``/``password`` for the queue row ``queue_id``."""
    _check_key(key)
    nonce = os.urandom(NONCE_SIZE)
    plaintext = json.dumps({"u": username, "p": password}).encode("utf-8")
    return _VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(queue_id))


def unseal(key: bytes, blob: bytes, queue_id: str) -> tuple[str, str]:
    """Return ``(username, password)``; raise CredentialsError if the blob does not open."""
    _check_key(key)
    blob = bytes(blob)
    if len(blob) < 1 + NONCE_SIZE + 16 or blob[:1] != _VERSION:
        raise CredentialsError("sealed credentials: unknown format")
    nonce, ciphertext = blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, _aad(queue_id))
    except InvalidTag:
        raise CredentialsError("sealed credentials do not open (other key or other row)") from None
    try:
        fields = json.loads(plaintext)
        return str(fields["u"]), str(fields["p"])
    except (ValueError, KeyError, TypeError):
        raise CredentialsError("sealed credentials: bad content") from None


def _aad(queue_id: str) -> bytes:
    return _AAD_PREFIX + queue_id.encode("utf-8")


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise CredentialsError(f"the queue key must be {KEY_SIZE} bytes")
