"""Sealed employee credentials: AES-256-GCM bound to the queue row."""

from __future__ import annotations

import stat

import pytest

from gateway.credentials import (
    KEY_SIZE,
    CredentialsError,
    load_or_create_key,
    seal,
    unseal,
)


@pytest.fixture
def key(tmp_path):
    return load_or_create_key(tmp_path / "queue.key")


def test_key_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "certs" / "queue.key"
    key = load_or_create_key(path)
    assert len(key) == KEY_SIZE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_raw_32_byte_key_file_is_accepted(tmp_path):
    path = tmp_path / "raw.key"
    path.write_bytes(b"k" * 32)
    path.chmod(0o600)
    assert load_or_create_key(path) == b"k" * 32


def test_loose_permissions_are_tightened(tmp_path):
    path = tmp_path / "queue.key"
    load_or_create_key(path)
    path.chmod(0o644)
    load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_garbage_key_file_is_refused(tmp_path):
    path = tmp_path / "queue.key"
    path.write_text("not a key\n")
    with pytest.raises(CredentialsError):
        load_or_create_key(path)


def test_round_trip_with_unicode(key):
    blob = seal(key, "alice@acme.test", "pässwörd 密码 :;\n", "0190A1B2C3DABCDEF")
    assert unseal(key, blob, "0190A1B2C3DABCDEF") == ("alice@acme.test", "pässwörd 密码 :;\n")


def test_blob_hides_the_secret_and_uses_a_fresh_nonce(key):
    one = seal(key, "alice@acme.test", "alice-pw", "Q1")
    two = seal(key, "alice@acme.test", "alice-pw", "Q1")
    assert one != two
    assert b"alice-pw" not in one and b"alice@acme.test" not in one


def test_blob_cannot_move_to_another_row(key):
    blob = seal(key, "alice@acme.test", "alice-pw", "Q1")
    with pytest.raises(CredentialsError):
        unseal(key, blob, "Q2")


def test_other_key_or_tampering_is_refused(key, tmp_path):
    blob = seal(key, "alice@acme.test", "alice-pw", "Q1")
    other = load_or_create_key(tmp_path / "other.key")
    with pytest.raises(CredentialsError):
        unseal(other, blob, "Q1")
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(CredentialsError):
        unseal(key, flipped, "Q1")
    with pytest.raises(CredentialsError):
        unseal(key, b"\x01short", "Q1")


def test_errors_do_not_show_the_secret(key):
    blob = seal(key, "alice@acme.test", "alice-pw", "Q1")
    with pytest.raises(CredentialsError) as info:
        unseal(key, blob, "Q2")
    assert "alice-pw" not in repr(info.value) and "alice-pw" not in str(info.value)


def test_wrong_key_size_is_refused():
    with pytest.raises(CredentialsError):
        seal(b"short", "u", "p", "Q1")
