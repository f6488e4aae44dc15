"""Text extraction from raw MIME for the archive index."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.archive.documents import docid_for
from gateway.archive.extraction import extract, html_to_text
from gateway.archive.terms import short_grams, term_grams
from tests.unit.archive.mailfactory import b64, message


def test_plain_utf8_fields():
    ex = extract(message("Quotation for LED lamps", "Dear Hans,\nplease find the price list.",
                         sender=("Alice Wang", "alice@acme.test"), to=("Hans Müller", "hans@hamburg.de"),
                         cc=("Bob", "bob@acme.test")))
    assert ex.subject == "Quotation for LED lamps"
    assert "Alice Wang <alice@acme.test>" in ex.sender
    assert "Hans Müller <hans@hamburg.de>" in ex.rcpt and "bob@acme.test" in ex.rcpt
    assert ex.from_addrs == ["alice@acme.test"]
    assert ex.to_addrs == ["hans@hamburg.de", "bob@acme.test"]
    assert "price list" in ex.body
    assert not ex.has_attachment
    assert ex.date == dt.datetime(2026, 11, 23, 2, 0)


def test_gb2312_subject_names_and_body():
    raw = message("报价单 第二版", "您好，附件是最新报价。", sender=("王小明", "wang@acme.test"),
                  to=("李经理", "li@shenzhen.cn"), charset="gb2312")
    assert b"=?eucgb2312_cn?" in raw  # the label Python itself writes for gb2312
    ex = extract(raw)
    assert ex.subject == "报价单 第二版"
    assert "王小明" in ex.sender and "李经理 <li@shenzhen.cn>" in ex.rcpt
    assert "最新报价" in ex.body


def test_gbk_declared_gb2312_and_big5():
    # GBK-only character (镕) in a part labelled gb2312, as real mailers do
    raw = (b"Subject: =?GB2312?B?" + b64("朱镕基样品", "gbk").encode() + b"?=\r\nFrom: a@x.test\r\n"
           b"Content-Type: text/plain; charset=big5\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + b64("繁體中文樣品說明", "big5").encode() + b"\r\n")
    ex = extract(raw)
    assert ex.subject == "朱镕基样品"
    assert "繁體中文樣品說明" in ex.body


def test_raw_8bit_headers_utf8_and_gbk():
    raw = "Subject: 直接发送的主题\r\nFrom: 张三 <z@x.test>\r\n\r\nbody\r\n".encode()
    assert extract(raw).subject == "直接发送的主题"
    raw = "Subject: 国标主题\r\nFrom: z@x.test\r\n\r\nbody\r\n".encode("gbk")
    assert extract(raw).subject == "国标主题"


def test_attachment_names_written_as_bare_8bit_bytes_utf8_and_gbk():
    """A file name as bare UTF-8/GBK bytes in the part's headers (no RFC 2231/2047): found by
    name, the message has an attachment, and the text parts after it are still read (the walk
    used to stop at that header: compat32 answers an email.header.Header, without split())."""
    from gateway.archive.export import attachment, attachments

    for codec in ("utf-8", "gbk"):
        raw = ("From: a@acme.test\r\nTo: b@x.test\r\nSubject: q\r\nMIME-Version: 1.0\r\n"
               'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
               '--b\r\nContent-Type: application/pdf; name="报价单.pdf"\r\n'
               'Content-Disposition: attachment; filename="报价单.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
               "\r\nJVBERi0xLjQK\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               "after the attachment\r\n--b--\r\n").encode(codec)
        ex = extract(raw)
        assert ex.has_attachment and ex.attnames == "报价单.pdf", codec
        assert "after the attachment" in ex.body
        # the auditor's message view lists it and downloads it by its name
        [part] = attachments(raw)
        assert part.name == "报价单.pdf" and part.data == b"%PDF-1.4\n"
        assert attachment(raw, 0).name == "报价单.pdf"


def test_html_without_scripts_and_attachment_names():
    raw = message("Invoice", "plain part", html="<html><head><style>p{}</style><script>alert('x')</script>"
                  "</head><body><p>Total&nbsp;amount: <b>USD 5,000</b></p></body></html>",
                  attachments=("形式发票 PI-2026.pdf", "spec sheet.xlsx"))
    ex = extract(raw)
    assert "USD 5,000" in ex.body and "amount" in ex.body
    assert "alert" not in ex.body and "p{}" not in ex.body
    assert ex.has_attachment
    assert ex.attnames.splitlines() == ["形式发票 PI-2026.pdf", "spec sheet.xlsx"]


def test_body_is_bounded():
    ex = extract(message("big", "x" * 300_000))
    assert len(ex.body) <= 64 * 1024


def test_html_to_text_on_broken_markup():
    assert "kept" in html_to_text("<p>kept<div <<<</")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_extract_never_raises_on_garbage(raw):
    extract(raw)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_extract_never_raises_on_text_headers(text):
    extract(b"Subject: =?gb2312?B?" + text.encode("utf-8", "replace") + b"?=\r\nFrom: " + text.encode()
           + b"\r\nContent-Type: text/html; charset=" + text[:10].encode() + b"\r\n\r\n" + text.encode())


def test_short_grams():
    grams = short_grams("报价单 PI for CE 样")
    assert {"报", "价", "单", "报价", "价单", "pi", "ce", "样"} <= set(grams)
    assert "报价单" not in grams and "for" not in grams
    assert term_grams("报价") == ["报价"] and term_grams("PI") == ["pi"] and term_grams("单") == ["单"]


def test_docid_is_time_ordered():
    a = docid_for(dt.datetime(2026, 1, 1), 5)
    b = docid_for(dt.datetime(2026, 1, 1, 0, 0, 0, 1), 1)
    assert a < b
    assert docid_for(dt.datetime(2026, 1, 1, tzinfo=dt.UTC), 5) == a


def test_big_base64_attachments_are_cut_before_parsing_but_names_and_text_kept():
    import os
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = "大附件"
    msg["From"] = "a@x.test"
    msg.set_content("开头 " + "样品说明 " * 20000 + " 结尾标记", charset="utf-8", cte="base64")  # ~240 KB base64
    msg.add_attachment(os.urandom(600_000), maintype="application", subtype="pdf", filename="第一个.pdf")
    msg.add_attachment(b"x", maintype="application", subtype="pdf", filename="第二个.pdf")
    raw = msg.as_bytes()
    assert len(raw) > 1_000_000
    ex = extract(raw)
    assert ex.attnames.split("\n") == ["第一个.pdf", "第二个.pdf"]
    assert ex.body.startswith("开头 样品说明") and len(ex.body) > 20_000  # the head of a long base64 body


def test_base64_cut_keeps_text_parts_and_drops_attachment_bodies():
    import base64
    import os

    from gateway.archive.extraction import BASE64_KEEP_LINES, _cut_base64

    def b64(data: bytes) -> bytes:
        return base64.encodebytes(data).replace(b"\n", b"\r\n")

    text = ("first " + "quotation " * 12000 + " last").encode()
    raw = (b"From: a@x.test\r\nSubject: cut\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
           b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + b64(text) + b"--b1\r\nContent-Type: text/plain; name=\"notes.txt\"\r\nContent-Transfer-Encoding: base64"
           b"\r\n\r\n" + b64(b"secretword " * 3000) + b"--b1\r\nContent-Type: image/png\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(os.urandom(200_000)) + b"--b1--\r\n")
    cut = _cut_base64(raw)
    assert len(cut) < 78 * (BASE64_KEEP_LINES + 10) < len(raw)
    ex = extract(raw)
    assert ex.body.startswith("first quotation") and len(ex.body) > 60_000
    assert "secretword" not in ex.body and ex.attnames == "notes.txt" and ex.has_attachment
    assert _cut_base64(b"From: a@x.test\r\n\r\nshort body\r\n") == b"From: a@x.test\r\n\r\nshort body\r\n"
    # what the node keeps in memory for its indexer: the same text, a fraction of the bytes
    from gateway.archive.extraction import indexable

    small = indexable(raw)
    assert len(small) < len(raw) // 4 and extract(small) == ex and indexable(small) == small


def test_extraction_hands_over_the_header_fields_headers_of_would_parse():
    from gateway.archive import headers_of

    plain = (b"Subject: =?utf-8?b?5Lit5paH?=\r\nFrom: =?gb2312?b?1tDOxA==?= <b@y.test>\r\n"
             b"To: a@x.test, \"Q\" <q@z.test>\r\nCc: c@d.test\r\nMessage-ID: <m1@x.test>\r\n\r\nbody")
    folded = b"Subject: folded\r\n continued\r\nTo: a@x.test,\r\n b@x.test\r\n\r\nbody"
    raw8 = b"Subject: \xe4\xb8\xad raw 8bit\r\nFrom: \xe5\xbc\xa0 <z@x.test>\r\n\r\nbody"
    for raw in (plain, folded, raw8):
        assert extract(raw).headers == headers_of(raw) and headers_of(raw)["subject"]
    assert extract(plain).headers["to"] == ["a@x.test", "q@z.test", "c@d.test"]
    # where a full parse may see another header section than headers_of, it is left to headers_of
    for raw in (b"From: a@x.test\r\nSubject: mixed\n\nX-Late: 1\r\n\r\nbody",  # bare-LF blank line first
                b"From: a@x.test\r\nSubject: lone\rcr\r\n\r\nbody",
                b"From: a@x.test\r\nSubject: no blank line",
                b"Subject: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\nbody"):
        assert extract(raw).headers is None


def test_extract_without_headers_reads_the_same_text_and_skips_only_the_record_fields():
    raw = (b"From: =?utf-8?b?5byg5LiJ?= <zhang@cust.example>\r\nTo: Alice <alice@acme.test>, bob@acme.test\r\n"
           b"Cc: carol@acme.test\r\nSubject: =?utf-8?b?5oql5Lu35Y2V?= PI-778\r\nMessage-ID: <m1@cust.example>\r\n"
           b"Date: Mon, 02 Mar 2026 10:00:00 +0800\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           + "请查收附件 quotation for 200 LED panels\r\n".encode())
    full, light = extract(raw), extract(raw, headers=False)
    assert full.headers is not None and full.headers["message_id"] == "<m1@cust.example>"
    assert light.headers is None
    assert {**vars(light), "headers": full.headers} == vars(full)


def _short_grams_as_first_written(text: str) -> list[str]:
    """short_grams as it was when the first documents were written: the same tokens in the same
    order, or remove_records would delete other tokens than were inserted (a contentless table)."""
    from gateway.archive.terms import _WORD, CJK

    seen: dict[str, None] = {}
    for run in CJK.findall(text):
        for i, ch in enumerate(run):
            seen[ch] = None
            if i + 1 < len(run):
                seen[run[i:i + 2]] = None
    for word in _WORD.findall(CJK.sub(" ", text)):
        if len(word) <= 2:
            seen[word.lower()] = None
    return list(seen)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="报价单样品 PIceCE和的\n_-.1ab\u3042\uac00\U00020001", max_size=60))
def test_short_grams_keep_their_tokens_and_order(text):
    assert short_grams(text) == _short_grams_as_first_written(text)


def test_documents_out_of_time_order_go_into_one_fts_segment_per_transaction(db):
    """FTS5 writes its pending terms out whenever a rowid is not above the previous one: rows
    are inserted in docid order, whatever order the records come in (the SMTP handler stamps
    them in parallel threads), so a transaction leaves one segment, not one per step back."""
    import datetime as dt

    from gateway.archive.doctables import write_rows
    from gateway.archive.extraction import Extracted

    rows = [(1000 + i, i, dt.datetime(2026, 1, 1), "out", None,
             Extracted(subject=f"subject {i} 报价", body="price list " * 20), None) for i in range(1, 61)]
    with db.atomic():
        write_rows(list(reversed(rows)))
    for table in ("archivefts_idx", "archivegrams_idx"):
        assert db.execute_sql(f"SELECT count(DISTINCT segid) FROM {table}").fetchone()[0] == 1
    assert db.execute_sql("SELECT count(*) FROM archivefts WHERE archivefts MATCH '\"price list\"'").fetchone()[0] == 60


def test_copy_lines_are_read_in_chunks_as_they_are_made():
    """doctables._Lines (PostgreSQL COPY input): read(size) hands out at most size characters,
    together exactly the lines, and makes a line only when it is needed."""
    from gateway.archive.doctables import _Lines

    made: list[int] = []

    def lines():
        for i in range(50):
            made.append(i)
            yield f"{i}\t" + "报价x" * (i * 7) + "\n"

    reader = _Lines(lines())
    first = reader.read(100)
    assert len(first) == 100 and len(made) < 10
    chunks = [first]
    while chunk := reader.read(100):
        assert len(chunk) <= 100
        chunks.append(chunk)
    assert "".join(chunks) == "".join(f"{i}\t" + "报价x" * (i * 7) + "\n" for i in range(50))
    assert _Lines(iter(["a\n", "b\n"])).read() == "a\nb\n"


def test_folded_subject_keeps_the_space_after_an_encoded_word():
    # Python's email package folds "报价单：扭力扳手 2000 套" (the approval notice's subject)
    # so that a continuation line starts with the plain "2000"; the space there is text.
    raw = (b"Subject: =?utf-8?b?5oql5Lu35Y2V77ya5omt5Yqb5omz5omL?=\r\n 2000 =?utf-8?b?5aWX?=\r\n"
           b"From: =?utf-8?b?546L5YWI55Sf?=\r\n <wang@x.test>\r\nTo: b@y.test\r\n\r\nbody\r\n")
    ex = extract(raw)
    assert ex.subject == "报价单：扭力扳手 2000 套"
    assert "王先生 <wang@x.test>" in ex.sender
