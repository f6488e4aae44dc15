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


def test_concurrent_writers_of_the_same_content(tmp_path):
    """Node, relay process, import threads: the same message at the same moment."""
    import threading

    store = BlobStore(tmp_path / "a", tmp_path / "keys")
    blobs = [store.prepare(b"Subject: same\r\n\r\nsame bytes\r\n") for _ in range(8)]
    start, errors = threading.Barrier(8), []

    def write(blob) -> None:
        start.wait()
        try:
            store.write(blob, sync_dir=False)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.read(blobs[0].name, blobs[0].sha256) == b"Subject: same\r\n\r\nsame bytes\r\n"
    assert [p.name for p in (tmp_path / "a").rglob("*") if p.is_file()] == [blobs[0].name]


def test_headers_of_decodes_encoded_and_raw_utf8_headers():
    from gateway.archive import headers_of

    raw = (b"From: =?utf-8?b?5byg5LiJ?= <zhang@x.cn>\r\nSubject: \xe6\x8a\xa5\xe4\xbb\xb7 =?gb2312?b?wO7LxA==?=\r\n"
           b" offer\r\nTo: a@b.test,\r\n =?gb2312?b?wO7LxA==?= <li@y.de>\r\nCc: c@d.test\r\n"
           b"Message-ID: <m1@x.cn>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0800\r\n\r\nbody\r\n")
    h = headers_of(raw)
    assert h["subject"] == "报价 李四 offer"
    assert (h["from"], h["to"], h["message_id"]) == ("zhang@x.cn", ["a@b.test", "li@y.de", "c@d.test"], "<m1@x.cn>")
    assert h["date"].isoformat() == "2026-11-23T02:00:00"
    assert headers_of(b"garbage without headers")["subject"] == ""


def test_inbound_mail_from_a_customer_counts_as_contact(archive):
    """The public pool's 'days without contact' clock runs on received mail too."""
    from gateway.customers import create_customer
    from gateway.db.models import Customer

    lagos = create_customer("Lagos Imports", contacts=["buyer@lagos-imports.ng"], domains=["lagos-imports.ng"])
    gmail = create_customer("Private buyer", contacts=["someone@gmail.com"])
    assert Customer.get_by_id(lagos.id).last_contact_at is None
    rfq = b"From: Sales <Orders@Lagos-Imports.ng>\r\nTo: alice@acme.test\r\nSubject: RFQ\r\n\r\nhi\r\n"
    archive.record(rfq,
                   direction="inbound", verdict="seen", place="imap:alice@acme.test/INBOX")
    assert Customer.get_by_id(lagos.id).last_contact_at is not None  # by company domain
    archive.record(b"From: x@gmail.com\r\nTo: alice@acme.test\r\nSubject: hi\r\n\r\nhi\r\n",
                   direction="inbound", verdict="seen", place="imap:alice@acme.test/INBOX")
    assert Customer.get_by_id(gmail.id).last_contact_at is None  # never by a public mail domain
    archive.record(b"From: alice@acme.test\r\nTo: someone@gmail.com\r\nSubject: offer\r\n\r\nhi\r\n",
                   direction="outbound", verdict="seen", place="imap:alice@acme.test/Sent")
    assert Customer.get_by_id(gmail.id).last_contact_at is None  # outbound contact comes from the SMTP path


def test_blob_names_follow_the_one_rule_of_the_files_on_disk(tmp_path):
    """A blob's file name is HMAC-SHA256(HMAC-SHA256(oldest key, context), content hash): the
    names of the files already written must never change (the derived key is remembered,
    not the rule), whichever key is current and when a keyring gains a key."""
    import hmac

    from gateway.archive.keys import _NAME_CONTEXT, Keyring

    def rule(oldest: bytes, sha: str) -> str:
        return hmac.new(hmac.new(oldest, _NAME_CONTEXT, hashlib.sha256).digest(), sha.encode(),
                        hashlib.sha256).hexdigest()

    ring = Keyring(tmp_path / "k", {3: b"c" * 32, 5: b"e" * 32})
    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    assert [ring.name_for(s) for s in shas] == [rule(b"c" * 32, s) for s in shas]
    ring.keys[7] = b"g" * 32  # rotation: a newer key; names unchanged
    assert [ring.name_for(s) for s in shas] == [rule(b"c" * 32, s) for s in shas]
    other = Keyring(tmp_path / "k2", {1: b"a" * 32})
    assert other.name_for(shas[0]) == rule(b"a" * 32, shas[0]) != ring.name_for(shas[0])


def test_a_file_found_already_there_is_made_durable_before_it_is_trusted(tmp_path, monkeypatch):
    """Another writer's file, written without an fsync for a transaction that then failed (no
    pending row keeps its bytes): the next message with the same content must not trust it
    as it is — its 250 would go out with the archive copy in the page cache only."""
    store = BlobStore(tmp_path / "a", tmp_path / "archive.keys")
    orphan = store.prepare(RAW)
    store.write(orphan, sync_dir=False, durable=False)  # the failed batch's file
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    again = store.prepare(RAW)
    assert again.data is None  # deduplicated: not sealed again
    folder = store.write(again, sync_dir=False)
    path = store.path_of(again.name)
    assert synced == [str(path)]  # the file itself; its folder is the caller's (one per batch)
    assert folder == path.parent
    synced.clear()
    store.write(store.prepare(RAW))
    assert synced == [str(path), str(path.parent)]


def test_a_file_gone_since_it_was_prepared_is_not_an_error(tmp_path):
    store = BlobStore(tmp_path / "a", tmp_path / "archive.keys")
    blob = store.put(RAW)
    again = store.prepare(RAW)
    os.unlink(store.path_of(blob.name))  # a retention purge in between
    assert store.write(again, sync_dir=False) is None
