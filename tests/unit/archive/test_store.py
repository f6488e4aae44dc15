from __future__ import annotations

import hashlib
import os

import pytest

from gateway.archive import keys
from gateway.archive.store import MAGIC, BlobError, BlobStore

RAW = b"Subject: quarterly prices\r\n\r\n" + b"FOB Ningbo 12.50 USD per unit\r\n" * 200


def test_blob_is_compressed_encrypted_and_named_without_the_hash(tmp_path):
    store = BlobStore(tmp_path / "a", tmp_path / "k" / "archive.keys")
    blob = store.put(RAW)
    data = store.path_of(blob.name).read_bytes()
    digest = hashlib.sha256(RAW).hexdigest()
    assert data.startswith(MAGIC) and b"FOB Ningbo" not in data
    assert len(data) < len(RAW) / 3  # zstd
    assert digest not in str(store.path_of(blob.name))  # the name does not leak the content hash
    assert store.read(blob.name, digest) == RAW
    assert (tmp_path / "k" / "archive.keys").stat().st_mode & 0o777 == 0o600


def test_same_content_same_file_written_once(tmp_path):
    store = BlobStore(tmp_path / "a", tmp_path / "archive.keys")
    first = store.put(RAW)
    again = store.prepare(RAW)
    assert again.name == first.name and again.data is None


def test_rotation_new_blobs_use_new_key_old_stay_readable(tmp_path):
    kf = tmp_path / "archive.keys"
    store = BlobStore(tmp_path / "a", kf)
    old = store.put(RAW)
    assert keys.rotate(kf) == 2
    store2 = BlobStore(tmp_path / "a", kf)
    new = store2.put(RAW + b"x")
    assert (old.key_id, new.key_id) == (1, 2)
    assert store2.read(old.name, old.sha256) == RAW
    assert store2.read(new.name, new.sha256) == RAW + b"x"
    assert old.name == store2.name_for(old.sha256)  # names stable across rotation


def test_altered_or_missing_blob_or_wrong_key_is_an_error(tmp_path):
    store = BlobStore(tmp_path / "a", tmp_path / "archive.keys")
    blob = store.put(RAW)
    path = store.path_of(blob.name)
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BlobError, match="does not decrypt"):
        store.read(blob.name, blob.sha256)
    other = BlobStore(tmp_path / "a", tmp_path / "other.keys")  # someone else's keyring
    blob2 = store.put(b"second")
    with pytest.raises(BlobError):
        other.decode(store.path_of(blob2.name).read_bytes(), blob2.name)
    os.unlink(path)
    with pytest.raises(BlobError, match="missing"):
        store.read(blob.name, blob.sha256)


def test_keyring_rejects_garbage(tmp_path):
    kf = tmp_path / "archive.keys"
    kf.write_text("1 not-base64!!\n")
    with pytest.raises(keys.KeyringError, match="archive.keys:1"):
        keys.load(kf)
    assert "not-base64" not in repr(keys.Keyring(kf, {1: b"k" * 32}))
