"""panel/preview.py: safe message previews from hostile or broken input."""

from __future__ import annotations

import base64
from email.message import EmailMessage

from hypothesis import given, settings
from hypothesis import strategies as st

from panel.preview import HTML_CSP, build_preview, decode_header_value, decode_text, html_document, sanitize_html


def b64word(text: str, charset: str) -> str:
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


def mime(html: bytes, charset: str = "utf-8", extra_parts: bytes = b"", headers: str = "") -> bytes:
    return (f"From: a@acme.test\r\nTo: b@example.com\r\nSubject: s\r\n{headers}MIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
            f"Content-Type: text/html; charset={charset}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode() \
        + html + b"\r\n" + extra_parts + b"--XX--\r\n"


def test_headers_text_and_attachments():
    msg = EmailMessage()
    msg["From"] = "Alice Wang 王丽 <alice@acme.test>"
    msg["To"] = "buyer@example.com"
    msg["Subject"] = "报价单 Quotation"
    msg.set_content("您好，请查收报价。\n")
    msg.add_attachment(b"%PDF-1.4 xx", maintype="application", subtype="pdf", filename="报价-2026.pdf")
    msg.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="list.csv")
    p = build_preview(msg.as_bytes())
    headers = dict(p.headers)
    assert headers["From"] == "Alice Wang 王丽 <alice@acme.test>"
    assert p.subject == "报价单 Quotation"
    assert p.text.strip() == "您好，请查收报价。"
    assert [(a.name, a.content_type, a.size) for a in p.attachments] == [
        ("报价-2026.pdf", "application/pdf", 11), ("list.csv", "text/csv", 8)]
    assert p.html is None and p.notes == []


def test_chinese_charsets_and_rfc2047():
    # gb2312 label with a GBK-only character (镕), big5 subject, gb18030 body
    raw = (f"From: {b64word('王丽', 'gb2312')} <a@acme.test>\r\nSubject: {b64word('報價單', 'big5')}\r\n"
           "Content-Type: text/plain; charset=gb2312\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode() \
        + "朱镕基 您好".encode("gbk")
    p = build_preview(raw)
    assert dict(p.headers)["From"] == "王丽 <a@acme.test>"
    assert p.subject == "報價單"
    assert p.text == "朱镕基 您好"
    assert "charset" not in p.notes


def test_raw_8bit_headers_and_unknown_charset():
    raw = "Subject: 你好 GBK\r\n".encode("gbk") + "X: y\r\nFrom: 王 <a@b.c>\r\n".encode() \
        + b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nhello \xe4\xbd\xa0\r\n"
    p = build_preview(raw)
    assert p.subject == "你好 GBK"
    assert dict(p.headers)["From"] == "王 <a@b.c>"
    assert p.text.startswith("hello 你")


def test_decode_helpers_never_raise():
    assert decode_text(b"\xff\xfe\xfa", "gb2312").count("\ufffd") >= 1 or decode_text(b"\xff\xfe\xfa", "gb2312")
    assert decode_header_value("=?utf-8?B?!!!broken?=") is not None
    assert decode_header_value("=?no-such?Q?abc?=") == "abc"
    assert decode_header_value(None) == ""


def test_folded_header_keeps_the_space_after_an_encoded_word():
    # How Python's email package folds "报价单：扭力扳手 2000 套" (the approval notices' subject).
    folded = "=?utf-8?b?5oql5Lu35Y2V77ya5omt5Yqb5omz5omL?=\r\n 2000 =?utf-8?b?5aWX?="
    assert decode_header_value(folded) == "报价单：扭力扳手 2000 套"


def test_html_is_sanitized():
    html = (b"<p onclick='steal()' style='color:red; background:url(http://evil/t.png)'>Hi</p>"
            b"<script>alert(1)</script><style>body{background:url(http://evil/)}</style>"
            b"<img src='http://evil/track.gif' onerror='x()'><img src='https://evil/2.png'>"
            b"<iframe src='http://evil/'></iframe><form action='http://evil/'><input name=p></form>"
            b"<a href='javascript:alert(1)'>j</a><a href='http://phish.example/login'>Log in</a>"
            b"<object data='x.swf'></object><svg onload='x()'><script>1</script></svg>"
            b"<div style='width:10px'>ok</div><base href='http://evil/'><meta http-equiv=refresh content='0;url=x'>"
            b"<link rel=stylesheet href='http://evil/x.css'><table bgcolor='#fff' background='http://evil/bg'>"
            b"<tr><td>cell</td></tr></table>")
    p = build_preview(mime(html))
    out = p.html
    low = out.lower()
    for bad in ("script", "onclick", "onerror", "onload", "iframe", "<form", "<input", "object", "svg", "url(",
                "http://evil", "https://evil", "javascript:", "<base", "<meta", "<link", "href=", "background="):
        assert bad not in low, (bad, out)
    assert "Hi" in out and "cell" in out and 'style="width:10px"' in out and 'bgcolor="#fff"' in out
    assert p.links == ["http://phish.example/login"]  # listed as text; javascript: never
    assert p.blocked_images == 2 and "remote_images" in p.notes
    assert p.text_from_html and "Log in" in p.text and "alert" not in p.text


def test_cid_images_inline_but_svg_does_not():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    parts = (f"--XX\r\nContent-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             f"{png}\r\n--XX\r\nContent-Type: image/svg+xml\r\nContent-ID: <svg@x>\r\n\r\n"
             "<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>\r\n").encode()
    p = build_preview(mime(b"<img src='cid:logo@x'><img src='CID:svg@x'>", extra_parts=parts))
    assert f'src="data:image/png;base64,{png}"' in p.html
    assert "svg" not in p.html.lower() and p.blocked_images == 1
    assert {a.content_type for a in p.attachments} == {"image/png", "image/svg+xml"}


def test_document_carries_csp():
    p = build_preview(mime(b"<b>x</b>"))
    doc = html_document(p, title="<t>")
    assert "Content-Security-Policy" in doc and "default-src &#x27;none&#x27;" in doc
    assert "<b>x</b>" in doc and "<t>" not in doc
    assert "default-src 'none'" in HTML_CSP and "script" not in HTML_CSP


def test_gb2312_html_part():
    p = build_preview(mime("<p>报价 镕</p>".encode("gbk"), charset="gb2312"))
    assert p.html == "<p>报价 镕</p>"


def test_malformed_mime_gives_a_note_and_what_there_is():
    raw = b"Subject: x\r\nContent-Type: multipart/mixed; boundary=\"never\r\n\r\n--never\r\nthe body text"
    p = build_preview(raw)
    assert "defects" in p.notes or "malformed" in p.notes
    assert "the body text" in p.text
    p = build_preview(b"")
    assert "empty" in p.notes
    p = build_preview(b"\x00\xff\xfe\r\n\r\n\x80\x81")
    assert isinstance(p.text, str)


def test_bounded():
    big = b"Subject: big\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 5000
    p = build_preview(big, max_parse_bytes=1000, max_text_chars=100)
    assert "too_large" in p.notes and "text_truncated" in p.notes and len(p.text) == 100
    assert p.size == len(big)
    many = EmailMessage()
    many.set_content("x")
    for i in range(12):
        many.add_attachment(b"x", maintype="application", subtype="octet-stream", filename=f"f{i}.bin")
    p = build_preview(many.as_bytes(), max_attachments=10)
    assert len(p.attachments) == 10 and "too_many_attachments" in p.notes


def test_sanitize_keeps_only_safe_data_images():
    out, links, blocked = sanitize_html("<img src='data:text/html;base64,PHNjcmlwdD4='>"
                                        "<img src='data:image/gif;base64,R0lGOD=='>")
    assert "text/html" not in out and "data:image/gif" in out and blocked == 1 and links == []


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(data):
    p = build_preview(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + data)
    assert isinstance(p.text, str)
    p = build_preview(data)
    assert isinstance(p.notes, list)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=500))
def test_arbitrary_html_never_has_script(text):
    out, _, _ = sanitize_html(text + "<script>x</script><img src=x onerror=y>")
    assert "<script" not in out.lower() and "onerror" not in out.lower()
