"""The blob store: compressed, encrypted, content-addressed message files.

Blob file layout (version 1)::

    b"MGA1" | key id (4 bytes, big-endian) | nonce (12 bytes) | AES-256-GCM(zstd(raw)) + tag

The 8-byte header is the GCM associated data, so a changed key id or magic does not
open.  The content address is SHA-256 of the raw message; the file name is
``HMAC(name key, sha256)`` (gateway/archive/keys.py) under ``<dir>/<name[:2]>/`` — one
level of 256 folders, so a batch's directory fsyncs stay few.  Files are written
atomically (a temporary name unique per writer) and fsynced; writing the same content twice
writes the same name, so concurrent writers (node, relay process, import) need no lock.

Legacy blobs (before migration 100: plaintext at ``ab/cd/<sha256>``, key id 0) are
still read.  Blocking: call from a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.archive import keys as keyring_mod
from gateway.spool import fsync_dir

MAGIC = b"MGA1"
HEADER = struct.Struct(">4sI")
NONCE_SIZE = 12
_RELOAD_EVERY = 10.0  # seconds between checks of the keyring file for a rotation


class BlobError(Exception):
    """A blob is missing, does not decrypt, or does not match its content hash."""


@dataclass
class PreparedBlob:
    """A message ready to be recorded: hash, file name and encrypted bytes (None if the file exists)."""

    sha256: str
    name: str
    size: int
    key_id: int
    data: bytes | None
    stored_size: int


class BlobStore:
    def __init__(self, directory: Path, key_file: Path, level: int = 3):
        self.directory = Path(directory)
        self._dir_str = str(self.directory)
        self.key_file = Path(key_file)
        self.level = level
        self._ring: keyring_mod.Keyring | None = None
        self._ring_checked = 0.0
        self._ring_mtime = 0.0
        self._lock = threading.Lock()
        self._local = threading.local()  # zstd contexts are not thread-safe

    # -- keys ------------------------------------------------------------------

    @property
    def keyring(self) -> keyring_mod.Keyring:
        now = time.monotonic()
        ring = self._ring
        if ring is not None and now - self._ring_checked < _RELOAD_EVERY:
            return ring
        with self._lock:
            self._ring_checked = now
            try:
                mtime = self.key_file.stat().st_mtime
            except FileNotFoundError:
                mtime = -1.0
            if self._ring is None or mtime != self._ring_mtime:
                self._ring = keyring_mod.load(self.key_file)
                self._ring_mtime = self.key_file.stat().st_mtime
            return self._ring

    def _key(self, key_id: int) -> bytes:
        ring = self.keyring
        if key_id not in ring.keys:  # rotated by another process a moment ago
            self._ring_checked = 0.0
            ring = self.keyring
        return ring.key(key_id)

    # -- paths -----------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        return Path(self.path_str(name))

    def path_str(self, name: str) -> str:
        """``path_of`` as a string: what the per-message paths (``prepare``'s stat, ``open``)
        use, without building Path objects twice a message."""
        if "/" in name:  # legacy ab/cd/<sha256>
            return f"{self._dir_str}/{name}"
        return f"{self._dir_str}/{name[:2]}/{name}"

    def name_for(self, sha256: str) -> str:
        return self.keyring.name_for(sha256)

    # -- write -----------------------------------------------------------------

    def prepare(self, raw: bytes, sha256: str | None = None) -> PreparedBlob:
        """Hash, and compress + encrypt unless the blob file already exists (CPU only, no I/O
        beyond one stat)."""
        digest = sha256 or hashlib.sha256(raw).hexdigest()
        name = self.name_for(digest)
        path = self.path_str(name)
        try:
            stored = os.stat(path).st_size
            return PreparedBlob(digest, name, len(raw), self._existing_key_id(path), None, stored)
        except (FileNotFoundError, BlobError):
            pass
        key_id, data = self.seal(raw)
        return PreparedBlob(digest, name, len(raw), key_id, data, len(data))

    def seal(self, raw: bytes) -> tuple[int, bytes]:
        """``raw`` compressed and encrypted in the blob format (``decode`` opens it): the key id
        used and the sealed bytes.  Also for sealed data kept in the database."""
        ring = self.keyring
        key_id = ring.current_id
        header = HEADER.pack(MAGIC, key_id)
        nonce = os.urandom(NONCE_SIZE)
        body = AESGCM(ring.current).encrypt(nonce, self._compressor().compress(raw), header)
        return key_id, header + nonce + body

    def write(self, blob: PreparedBlob, sync_dir: bool = True, durable: bool = True) -> Path | None:
        """Write a prepared blob durably; returns its folder (for a later fsync; None if the
        file is gone, see ``_make_durable``).  ``durable=False``: no fsync at all — for a blob whose
        sealed bytes are kept durable elsewhere until its file is synced
        (gateway/archive/pending.py).

        A blob whose file already existed when it was prepared (``data`` None) is made durable
        too: the file may be another writer's that is not yet — or never will be — durable:
        written without an fsync for a transaction that then failed (so no pending row keeps
        its bytes), or whose folder was to be fsynced by a batch that failed first.  Trusting
        such a file would let this message's 250 go out with its archive copy in the page
        cache only.  An fsync of a file already on disk costs ~0.05 ms (measured here)."""
        path = self.path_of(blob.name)
        if blob.data is None:
            return self._make_durable(path, sync_dir)
        if path.exists():  # another writer's, since ``prepare``: made durable as above
            return self._make_durable(path, sync_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(path, blob.data, sync=durable)
        if sync_dir and durable:
            fsync_dir(path.parent)
        return path.parent

    @staticmethod
    def _make_durable(path: Path, sync_dir: bool) -> Path | None:
        """fsync an existing blob file (and its folder if ``sync_dir``); returns the folder, or
        None if the file is gone (a retention purge: ``Archive.chain_batch`` writes it again)."""
        try:
            fsync_dir(path)  # (opened read-only: a file's data too)
        except FileNotFoundError:
            return None
        if sync_dir:
            fsync_dir(path.parent)
        return path.parent

    def put(self, raw: bytes) -> PreparedBlob:
        blob = self.prepare(raw)
        self.write(blob)
        return blob

    @staticmethod
    def sync_dirs(dirs: set[Path]) -> None:
        for d in dirs:
            fsync_dir(d)

    # -- read ------------------------------------------------------------------

    def read(self, name: str, sha256: str, key_id: int | None = None) -> bytes:
        """The original bytes; raises BlobError if missing, unreadable or not matching ``sha256``."""
        return self.read_blob(name, sha256)[0]

    def read_blob(self, name: str, sha256: str) -> tuple[bytes, PreparedBlob | None]:
        """``read``, and the blob as ``prepare`` would describe these bytes now that its file
        exists (None for a legacy plaintext blob): who archives the same bytes again (the relay's
        "relay:sent" copy) need not hash, stat and open the file once more."""
        try:
            with open(self.path_str(name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BlobError(f"blob {name} is missing") from None
        raw = self.decode(data, name)
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise BlobError(f"blob {name} does not match its content hash (altered)")
        if data[:4] != MAGIC:
            return raw, None
        return raw, PreparedBlob(sha256, name, len(raw), HEADER.unpack_from(data)[1], None, len(data))

    def decode(self, data: bytes, name: str = "") -> bytes:
        if data[:4] != MAGIC:
            if "/" in name:  # a legacy plaintext blob
                return data
            raise BlobError(f"blob {name}: unknown format (altered?)")
        if len(data) < HEADER.size + NONCE_SIZE + 16:
            raise BlobError(f"blob {name}: truncated")
        _, key_id = HEADER.unpack_from(data)
        try:
            key = self._key(key_id)
        except keyring_mod.KeyringError as exc:
            raise BlobError(f"blob {name}: {exc}") from None
        nonce = data[HEADER.size : HEADER.size + NONCE_SIZE]
        try:
            packed = AESGCM(key).decrypt(nonce, data[HEADER.size + NONCE_SIZE :], data[: HEADER.size])
        except InvalidTag:
            raise BlobError(f"blob {name} does not decrypt (altered, or another key)") from None
        try:
            return self._decompressor().decompress(packed)
        except zstandard.ZstdError as exc:
            raise BlobError(f"blob {name}: bad compressed data ({exc})") from None

    def key_id_of(self, name: str) -> int:
        return self._existing_key_id(self.path_of(name))

    def delete(self, name: str) -> bool:
        try:
            os.unlink(self.path_of(name))
            return True
        except FileNotFoundError:
            return False

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    def _existing_key_id(path: Path) -> int:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        if head[:4] != MAGIC:
            raise BlobError(f"{path}: not a blob")
        return HEADER.unpack(head)[1]

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            # write_content_size: the decompressor needs it for one-shot decompress().
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d


def _write_durably(path: Path, data: bytes, sync: bool = True) -> None:
    """Write ``path`` atomically and fsync it (``sync``).  The temporary name is unique per writer: the
    node, the relay process, an import and parallel threads may write the same content at
    the same moment (the same name; whichever rename comes last replaces equal bytes)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
