"""`mailgate archive import` from .eml files and mbox: records, sightings, idempotency, bad items, progress."""

from __future__ import annotations

import io
import mailbox

import pytest

from gateway.archive.importer import Progress, import_eml, import_mbox
from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.archive.verify import verify
from gateway.db.models import Employee

from .conftest import message


def test_eml_folder_import_is_idempotent_and_skips_bad_files(archive, tmp_path):
    folder = tmp_path / "mail"
    (folder / "sub").mkdir(parents=True)
    for n in range(3):
        (folder / f"m{n}.eml").write_bytes(message(n))
    (folder / "sub" / "copy.eml").write_bytes(message(0))  # same content, another file
    (folder / "sub" / "empty.eml").write_bytes(b"")
    (folder / "notes.txt").write_text("not looked at")
    out = io.StringIO()
    result = import_eml(archive, [folder], progress=Progress("import", stream=out, every=0))
    assert (result.seen, result.new_records, result.new_sightings) == (4, 3, 4)
    assert len(result.errors) == 1 and "empty.eml" in result.errors[0]
    assert "5/5 messages" in out.getvalue()  # progress counted every file, the bad one too
    again = import_eml(archive, [folder])
    assert (again.new_records, again.new_sightings) == (0, 0)
    assert ArchiveRecord.select().count() == 3 and ArchiveSighting.select().count() == 4
    rec = ArchiveRecord.get(ArchiveRecord.subject == "Offer 0")
    assert {s.place for s in rec.sightings} == {"import:eml"} and len(list(rec.sightings)) == 2
    assert archive.read(rec) == message(0)
    assert verify(archive.store) == []


def test_mbox_import_with_employee_and_sent_direction(archive, tmp_path):
    Employee.create(email="alice@acme.test", name="Alice")
    path = tmp_path / "sent.mbox"
    box = mailbox.mbox(path)
    for n in range(5):
        box.add(message(n, body="中文正文"))
    box.flush()
    box.close()
    result = import_mbox(archive, path, employee="alice@acme.test", direction="outbound")
    assert (result.seen, result.new_records, result.errors) == (5, 5, [])
    sightings = list(ArchiveSighting.select())
    assert {(s.direction, s.verdict, s.place, s.employee_email) for s in sightings} == {
        ("outbound", "imported", "import:mbox", "alice@acme.test")}
    assert sorted(s.ref.rsplit("#", 1)[1] for s in sightings) == ["1", "2", "3", "4", "5"]
    rec = ArchiveRecord.get(ArchiveRecord.subject == "Offer 3")
    assert "中文正文 3".encode() in archive.read(rec)
    assert import_mbox(archive, path, employee="alice@acme.test").new_sightings == 0


def test_unknown_employee_or_missing_mbox(archive, tmp_path):
    with pytest.raises(ValueError, match="no employee"):
        import_mbox(archive, tmp_path / "x.mbox", employee="nobody@acme.test")
    assert import_mbox(archive, tmp_path / "x.mbox").errors == [f"{tmp_path / 'x.mbox'}: not a file"]


def test_tty_progress_bar(tmp_path):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = Progress("import", total=10, stream=out)
    p.update(5)
    p.finish()
    assert "[###############---------------] 5/10" in out.getvalue()
