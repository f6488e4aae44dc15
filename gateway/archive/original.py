"""The client's bytes as submitted, for outbound mail the gateway changed.

The archive's blob of an accepted or held outbound message holds the bytes that leave the
company (tags, sender rewrite, DKIM signature applied).  Auditors also need what the
salesperson's client submitted.  Every mutation the gateway makes is a header edit
(gateway/mutate.py), so the submitted message is usually the relayed one's body under
another header section: only that header section is kept, sealed like a blob (zstd +
AES-GCM, gateway/archive/store.py) in the record row (``ArchiveRecord.original``), with the
SHA-256 of the whole submitted message (``original_sha256``, covered by the hash chain).
Should a body ever differ, the whole submitted message is sealed instead.

Sealed payload: one kind byte, then the data — ``H`` + header section (the body is the
relayed blob's), or ``W`` + the whole message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gateway.archive.store import BlobError, BlobStore

HEAD_ONLY = b"H"
WHOLE = b"W"


@dataclass(frozen=True)
class OriginalCopy:
    sha256: str
    sealed: bytes


def body_start(raw: bytes) -> int:
    """Offset of the body: after the first empty line (CRLF or LF), or the end if none."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    if lf >= 0:
        return lf + 2
    return len(raw)


def capture(store: BlobStore, original: bytes, final: bytes) -> OriginalCopy | None:
    """The sealed copy of ``original`` (the submitted bytes) next to ``final`` (the stored
    blob), or None when they are the same bytes."""
    if original == final:
        return None
    o, f = body_start(original), body_start(final)
    if memoryview(original)[o:] == memoryview(final)[f:]:
        payload = HEAD_ONLY + original[:o]
    else:
        payload = WHOLE + original
    return OriginalCopy(hashlib.sha256(original).hexdigest(), store.seal(payload)[1])


def restore(store: BlobStore, sealed: bytes, sha256: str, final: bytes) -> bytes:
    """The submitted bytes from the sealed copy and the record's blob bytes ``final``; raises
    BlobError if it does not open or does not match ``sha256``."""
    payload = store.decode(bytes(sealed), "submitted original")
    kind, data = payload[:1], payload[1:]
    if kind == HEAD_ONLY:
        raw = data + final[body_start(final):]
    elif kind == WHOLE:
        raw = data
    else:
        raise BlobError("submitted original: unknown format (altered?)")
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise BlobError("submitted original does not match its hash (altered)")
    return raw
