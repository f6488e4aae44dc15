"""Archive records: every accepted, refused or held message, with its bytes.

Blobs are content-addressed (``archive/ab/cd/<sha256>``) and written durably
once; records point at them with the verdict and the rule trace.  The archive
issue adds compression, encryption, the hash chain and search on top.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gateway.db.models import ArchiveRecord
from gateway.spool import write_durably


class Archive:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.directory / sha256[:2] / sha256[2:4] / sha256

    def store_blob(self, raw: bytes) -> str:
        digest = hashlib.sha256(raw).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(path, raw)
        return digest

    def record(
        self,
        raw: bytes,
        *,
        direction: str,
        verdict: str,
        mail_from: str = "",
        recipients: list[str] | None = None,
        subject: str = "",
        message_id: str = "",
        employee_id: int | None = None,
        reason: str = "",
        trace: list[dict] | None = None,
        queue_id: str = "",
    ) -> ArchiveRecord:
        digest = self.store_blob(raw)
        return ArchiveRecord.create(
            direction=direction,
            sha256=digest,
            blob_path=str(self.blob_path(digest).relative_to(self.directory)),
            size=len(raw),
            mail_from=mail_from,
            recipients=json.dumps(recipients or [], ensure_ascii=False),
            subject=subject[:2000],
            message_id=message_id[:998],
            employee=employee_id,
            verdict=verdict,
            reason=reason,
            trace=json.dumps(trace or [], ensure_ascii=False),
            queue_id=queue_id,
        )

    def read(self, record: ArchiveRecord) -> bytes:
        return (self.directory / record.blob_path).read_bytes()
