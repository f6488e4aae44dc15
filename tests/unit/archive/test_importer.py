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


# -- Progress: what `mailgate archive import` (and verify's blob pass) shows ----------------


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    from gateway.archive import importer

    c = Clock()
    monkeypatch.setattr(importer, "time", c)
    return c


def screen(text: str) -> list[str]:
    """What a terminal shows: ``\\r`` returns to the line's start and overwrites."""
    lines, cur, col = [], [], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        else:
            cur[col:col + 1] = [ch]
            col += 1
    if cur:
        lines.append("".join(cur).rstrip())
    return lines


def test_plain_progress_prints_periodic_counts_with_totals_and_a_final_line(clock):
    out = io.StringIO()
    p = Progress("import", stream=out, every=5.0)
    for n in range(1, 13):  # one message a second
        clock.t = float(n)
        p.update(n, 12)
    p.finish()
    assert out.getvalue().splitlines() == [
        "import: 5/12 messages (1/s)",
        "import: 10/12 messages (1/s)",
        "import: 12/12 messages (1/s), done",
    ]
    assert "\r" not in out.getvalue()


def test_plain_progress_without_a_total_and_with_nothing_done(clock):
    out = io.StringIO()
    p = Progress("import", stream=out, every=5.0)
    clock.t = 6.0
    p.update(3)
    clock.t = 6.5
    p.finish()
    assert out.getvalue() == "import: 3 messages (0/s)\nimport: 3 messages (0/s), done\n"
    empty = io.StringIO()
    Progress("import", stream=empty).finish()
    assert empty.getvalue() == "import: 0 messages (0/s), done\n"  # even then: the log shows the end


def test_tty_progress_redraws_one_line_and_ends_it(clock):
    out = Tty()
    p = Progress("import", stream=out)
    clock.t = 0.05
    p.update(1, 400)  # within 0.1 s of the start: not drawn
    assert out.getvalue() == ""
    clock.t = 0.2
    p.update(200, 400)  # 1000/s
    clock.t = 50.0
    p.update(300, 400)  # 6/s: a shorter line, drawn over the longer one
    p.update(400, 400)  # same instant: not drawn
    clock.t = 100.0
    p.finish()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 3
    assert screen(text) == ["import [##############################] 400/400 (4/s)"]
    frames = [f.rstrip("\n") for f in text.split("\r")[1:]]
    assert frames[0] == "import [###############---------------] 200/400 (1000/s)"
    assert frames[1].rstrip() == "import [######################--------] 300/400 (6/s)"
    assert len(frames[1]) >= len(frames[0])  # padded: no "…/s)" left over from the longer line


def test_tty_progress_without_a_total_and_close_after_an_error(clock):
    out = Tty()
    p = Progress("import", stream=out)
    clock.t = 1.0
    p.update(7)
    p.close()  # an error: the line is ended, no final count
    assert screen(out.getvalue()) == ["import 7 (7/s)"] and out.getvalue().endswith("\n")
    quiet = Tty()
    Progress("import", stream=quiet).close()
    assert quiet.getvalue() == ""  # nothing on screen: nothing to end
