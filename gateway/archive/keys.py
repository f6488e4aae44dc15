"""The archive keyring: AES-256-GCM keys with ids, in one file (mode 0600).

File format, one key per line: ``<id> <base64 of 32 bytes>``; ``#`` comments allowed.
The line with the highest id is the *current* key (new blobs); every key stays usable
for reading, so rotation is: append a new line (``mailgate archive rotate-key``), keep
the old ones.  Removing a line makes every blob written under it unreadable —
``mailgate archive verify`` then reports those blobs.

Blob file names are ``HMAC-SHA256(name key, sha256 of the message)``, the name key
derived from the FIRST key (lowest id), so names stay stable across rotations and a
reader of the disk without the keyring cannot test whether a known message is archived.

The file is created lazily (like gateway/credentials.load_or_create_key) the first time
the archive writes; every node that shares the archive needs the same file.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("mailgate.archive")

KEY_SIZE = 32
_NAME_CONTEXT = b"mailgate-archive-blob-names-v1"


class KeyringError(Exception):
    """The keyring file is unusable, or a blob needs a key it does not hold."""


@dataclass
class Keyring:
    path: Path
    keys: dict[int, bytes] = field(default_factory=dict)
    # (the oldest key, the blob-name key derived from it): name_for runs once a message
    _name_key: tuple[bytes, bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def current_id(self) -> int:
        return max(self.keys)

    @property
    def current(self) -> bytes:
        return self.keys[self.current_id]

    def key(self, key_id: int) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise KeyringError(f"archive key {key_id} is not in {self.path}") from None

    def name_for(self, sha256_hex: str) -> str:
        first = self.keys[min(self.keys)]
        derived = self._name_key
        if derived is None or derived[0] is not first:  # derived once per (oldest) key
            derived = self._name_key = (first, hmac.digest(first, _NAME_CONTEXT, "sha256"))
        return hmac.digest(derived[1], sha256_hex.encode("ascii"), "sha256").hex()

    def __repr__(self) -> str:  # never show key material
        return f"Keyring({str(self.path)!r}, ids={sorted(self.keys)})"


def load(path: Path, create: bool = True) -> Keyring:
    """Read the keyring at ``path``; create it with key 1 when missing and ``create``."""
    path = Path(path)
    try:
        return _parse(path)
    except FileNotFoundError:
        if not create:
            raise KeyringError(f"{path}: archive keyring missing") from None
    _write_new(path, {1: AESGCM.generate_key(bit_length=KEY_SIZE * 8)}, exclusive=True)
    return _parse(path)


def rotate(path: Path) -> int:
    """Add a new key (the new current one); return its id.  Old keys stay."""
    ring = load(path)
    new_id = ring.current_id + 1
    keys = dict(ring.keys)
    keys[new_id] = AESGCM.generate_key(bit_length=KEY_SIZE * 8)
    _write_new(path, keys, exclusive=False)
    return new_id


def _parse(path: Path) -> Keyring:
    data = path.read_text("ascii")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); setting 0600", path, mode)
        os.chmod(path, 0o600)
    keys: dict[int, bytes] = {}
    for n, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            key_id = int(parts[0])
            key = base64.b64decode(parts[1], validate=True)
        except (IndexError, ValueError, binascii.Error):
            raise KeyringError(f"{path}:{n}: expected '<id> <base64 key>'") from None
        if len(key) != KEY_SIZE or key_id <= 0 or key_id in keys:
            raise KeyringError(f"{path}:{n}: bad key (id must be unique and > 0, key {KEY_SIZE} bytes)")
        keys[key_id] = key
    if not keys:
        raise KeyringError(f"{path}: no keys")
    return Keyring(path, keys)


def _write_new(path: Path, keys: dict[int, bytes], exclusive: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Mailgate archive keys: '<id> <base64>'. Never remove a line (old blobs need it).\n"
    text += "".join(f"{i} {base64.b64encode(k).decode()}\n" for i, k in sorted(keys.items()))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if exclusive:
            try:
                os.link(tmp, path)  # another process created it meanwhile: keep theirs
            except FileExistsError:
                pass
        else:
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            os.unlink(tmp)
