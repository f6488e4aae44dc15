"""The lean MIME parser (gateway/archive/mime_walk.py) builds the email package's tree, and
``extract`` gives what the email package's parse gives (``extract_reference``)."""

from __future__ import annotations

import base64
import email
import email.message
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.archive import mime_walk
from gateway.archive.extraction import _filename, _filename_params, extract, extract_reference, indexable
from tests.unit.archive.mailfactory import message

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from bench_archive import Corpus  # noqa: E402


def tree(msg: email.message.Message) -> tuple:
    """Everything a parse leaves in a message tree (but the defects)."""
    payload = msg._payload  # noqa: SLF001
    return (msg._headers, msg._unixfrom, msg._default_type, msg.preamble, msg.epilogue,  # noqa: SLF001
            [tree(p) for p in payload] if isinstance(payload, list) else payload)


def same(raw: bytes, *, walked: bool | None = None) -> None:
    """The walker's tree is the email package's (or it declines), and so is ``extract``'s
    output; ``walked``: whether the walker must handle the message itself."""
    mine = mime_walk.parse(raw)
    if walked is not None:
        assert (mine is not None) == walked
    if mine is not None:
        assert tree(mine) == tree(email.message_from_bytes(raw))
    for part in email.message_from_bytes(raw).walk():  # extract's short cut for parts without a name
        assert _filename(part) == _filename_params(part)
    assert extract(raw) == extract_reference(raw)
    assert extract(raw, headers=False) == extract_reference(raw, headers=False)


def corpus_messages(seed: int, n: int) -> list[bytes]:
    """``n`` messages of the benchmark's generated corpus."""
    corpus = Corpus(seed=seed)
    corpus.n = n
    return [corpus.raw(i)[0] for i in range(n)]


def test_bench_corpus() -> None:
    for raw in corpus_messages(11, 400):
        same(raw, walked=True)
        same(indexable(raw), walked=True)


def test_mailfactory_messages() -> None:
    for raw in (message("Quotation", "Dear Hans"),
                message("报价单 第二版", "您好，附件是最新报价。", sender=("王小明", "w@acme.test"), charset="gb2312"),
                message("Invoice", "plain", html="<p>Total <b>5</b></p>", attachments=("形式发票 PI.pdf", "a.xlsx"))):
        same(raw, walked=True)
        same(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), walked=True)


B64 = base64.b64encode("价格 price 样品".encode()).decode()
MP = "Content-Type: multipart/mixed; boundary={b}\n"

# (name, message, whether the walker handles it itself)
CASES: list[tuple[str, str | bytes, bool]] = [
    ("plain LF", "Subject: hi\nFrom: a@x.test\n\nbody\n", True),
    ("plain CRLF", "Subject: hi\r\nFrom: a@x.test\r\n\r\nbody\r\n", True),
    ("no body", "Subject: hi\r\nFrom: a@x.test\r\n", True),
    ("no line break at the end", "Subject: hi\r\n\r\nbody", True),
    ("only a header, no line break", "Subject: hi", True),
    ("empty", "", True),
    ("body only", "\r\nbody\r\n", True),
    ("folded header", "Subject: =?utf-8?b?5Lu3?=\r\n =?utf-8?b?5qC8?=\r\n\tmore\r\nFrom: a@x.test\r\n\r\nb\r\n", True),
    ("empty value then folded", "Subject: \r\n folded\r\n\r\nb\r\n", True),
    ("blank-looking continuation", "Subject: a\r\n \r\nFrom: b@x.test\r\n\r\nb\r\n", True),
    ("no separator line", "Subject: hi\r\nthis is body\r\nmore\r\n", True),
    ("8-bit header name ends the headers", "Subject: hi\r\nSübject: x\r\n\r\nb\r\n", True),
    ("mbox envelope line", "From someone@x.test Mon Nov 30 10:00:00 2026\nSubject: hi\n\nbody\n", True),
    ("From line inside the headers", "Subject: hi\nFrom someone Mon\nTo: a@x.test\n\nbody\n", False),
    ("From line last", "Subject: hi\nFrom someone Mon\n\nbody\n", False),
    ("continuation first", " folded\r\nSubject: hi\r\n\r\nb\r\n", False),
    ("colon first", ":x\r\nSubject: hi\r\n\r\nb\r\n", False),
    ("lone CR", "Subject: hi\rFrom: a@x.test\r\n\r\nb\r\n", False),
    ("8-bit headers UTF-8", "Subject: 直接发送的主题\r\nFrom: 张三 <z@x.test>\r\n\r\nbody\r\n".encode(), True),
    ("8-bit headers GBK", "Subject: 国标主题\r\nFrom: 张三 <z@x.test>\r\n\r\n正文\r\n".encode("gbk"), True),
    ("base64 text", f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{B64}\r\n",
     True),
    ("broken base64", "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
     "5Lu35q@@@C8!!\r\n=5L\r\n", True),
    ("quoted-printable GB2312", "Content-Type: text/plain; charset=gb2312\r\n"
     "Content-Transfer-Encoding: quoted-printable\r\n\r\n=C4=FA=BA=C3 soft=\r\nbreak\r\n", True),
    ("multipart", MP.format(b="XYZ") + "\n--XYZ\nContent-Type: text/plain\n\none\n--XYZ\nContent-Type: text/html\n\n"
     "<p>two</p>\n--XYZ--\n", True),
    ("multipart CRLF, quoted boundary with spaces and specials",
     'Content-Type: multipart/mixed; boundary="=_a b(c)+?.XYZ"\r\n\r\n--=_a b(c)+?.XYZ\r\n\r\none\r\n'
     "--=_a b(c)+?.XYZ\r\nContent-Type: text/plain\r\n\r\ntwo\r\n--=_a b(c)+?.XYZ--\r\n", True),
    ("boundary with trailing blanks", MP.format(b="XYZ") + "\n--XYZ \t\n\none\n--XYZ--  \n", True),
    ("boundary in quotes, trailing space inside", 'Content-Type: multipart/mixed; boundary="XYZ  "\n\n--XYZ\n\none\n'
     "--XYZ--\n", True),
    ("preamble and epilogue", MP.format(b="XYZ") + "\nThis is a preamble.\r\nline two\n--XYZ\n\none\n--XYZ--\n"
     "epi\nlogue\n", True),
    ("close delimiter missing", MP.format(b="XYZ") + "\n--XYZ\n\none\n--XYZ\n\ntwo\n", True),
    ("close delimiter at the end, no line break", MP.format(b="XYZ") + "\n--XYZ\n\none\n--XYZ--", True),
    ("boundary-looking lines in a part", MP.format(b="XYZ") + "\n--XYZ\n\n--XYZZ\n --XYZ\n--XYZ--x\n-XYZ\n--XYZ--\n",
     True),
    ("empty part", MP.format(b="XYZ") + "\n--XYZ\n--XYZ--\n", False),
    ("no start boundary", MP.format(b="XYZ") + "\njust text\n", False),
    ("close before any part", MP.format(b="XYZ") + "\n--XYZ--\nepilogue\n", False),
    ("no boundary parameter", "Content-Type: multipart/mixed\n\n--XYZ\n\none\n--XYZ--\n", True),
    ("empty boundary", 'Content-Type: multipart/mixed; boundary=""\n\n--\n\none\n----\n', False),
    ("delimiter as the last line", MP.format(b="XYZ") + "\n--XYZ\n\none\n--XYZ", True),
    ("delimiter as the last line, with a line break", MP.format(b="XYZ") + "\n--XYZ\n\none\n--XYZ\n", True),
    ("nested multipart", MP.format(b="OUT") + "\n--OUT\n" + 'Content-Type: multipart/alternative; boundary="IN"\n\n'
     "--IN\nContent-Type: text/plain\n\nplain\n--IN\nContent-Type: text/html\n\n<b>html</b>\n--IN--\n"
     "inner epilogue\n\n--OUT\nContent-Type: application/pdf; name=\"a.pdf\"\nContent-Transfer-Encoding: base64\n\n"
     "JVBERi0x\n--OUT--\n", True),
    ("nested, inner close missing", MP.format(b="OUT") + "\n--OUT\n" + MP.format(b="IN") + "\n--IN\n\nplain\n"
     "--OUT\n\nsecond\n--OUT--\n", True),
    ("nested, outer boundary a prefix of the inner", MP.format(b="AB") + "\n--AB\n" + MP.format(b="ABC") + "\n--ABC\n\n"
     "x\n--ABC--\n--AB--\n", True),
    ("nested, the same boundary", MP.format(b="AB") + "\n--AB\n" + MP.format(b="AB") + "\n--AB\n\nx\n--AB--\n--AB--\n",
     False),
    ("message/rfc822", MP.format(b="XYZ") + "\n--XYZ\n\nfirst\n--XYZ\nContent-Type: message/rfc822\n\n"
     "Subject: inner\nFrom: in@x.test\n\ninner body\n--XYZ--\n", True),
    ("message/rfc822 holding a multipart", MP.format(b="XYZ") + "\n--XYZ\nContent-Type: message/rfc822\n\n"
     + MP.format(b="IN") + "\n--IN\n\ninner\n--IN--\nepi\n--XYZ--\n", True),
    ("message/rfc822 at the top", "Content-Type: message/rfc822\n\nSubject: inner\n\nbody\n", True),
    ("multipart/digest", 'Content-Type: multipart/digest; boundary="D"\n\n--D\n\nSubject: a\n\nx\n--D--\n', False),
    ("delivery status", "Content-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\nAction: failed\n", False),
    ("RFC 2231 file name", MP.format(b="XYZ") + "\n--XYZ\nContent-Type: application/pdf\n"
     "Content-Disposition: attachment;\n filename*=utf-8''%E5%BD%A2%E5%BC%8F%E5%8F%91%E7%A5%A8.pdf\n\nJVBE\n--XYZ--\n",
     True),
    ("RFC 2231 continuation file name", MP.format(b="XYZ") + "\n--XYZ\nContent-Type: application/pdf\n"
     "Content-Disposition: attachment; filename*0*=utf-8''%E5%BD%A2; filename*1*=%E5%BC%8F.pdf\n\nJVBE\n--XYZ--\n",
     True),
    ("RFC 2047 name parameter", MP.format(b="XYZ") + '\n--XYZ\nContent-Type: application/pdf; name="=?gb2312?B?'
     + base64.b64encode("报价单.pdf".encode("gb2312")).decode() + '?="\n\nJVBE\n--XYZ--\n', True),
    ("8-bit file name", (MP.format(b="XYZ") + '\n--XYZ\nContent-Disposition: attachment; filename="报价.pdf"\n\n'
                         "x\n--XYZ--\n").encode(), True),
    ("8-bit boundary (the email package finds no part either)",
     (MP.format(b="边界") + "\n--边界\n\none\n--边界--\n").encode(), False),
    ("8-bit boundary in GBK", (MP.format(b="边界") + "\n--边界\n\none\n--边界--\n").encode("gbk"), False),
    ("unknown charset", "Content-Type: text/plain; charset=x-nonsense\n\nbody\n", True),
    ("bad content type", "Content-Type: textplain\nContent-Transfer-Encoding: base64\n\n" + B64 + "\n", True),
    ("html part", "Content-Type: text/html; charset=utf-8\n\n<html><script>x</script><p>hi &amp; bye</p>\n", True),
    ("headers with NUL and controls", "Subject: a\x00b\x01c\r\nX-Odd: \x0b\x0c\r\n\r\nbody\x00\r\n", True),
]


@pytest.mark.parametrize(("raw", "walked"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_odd_and_hostile_cases(raw: str | bytes, walked: bool) -> None:
    data = raw.encode() if isinstance(raw, str) else raw
    same(data, walked=walked)
    if b"\r" not in data:
        same(data.replace(b"\n", b"\r\n"), walked=walked)


def test_huge_parts_cut_by_indexable() -> None:
    text = base64.encodebytes(("价格 price 样品 " * 20000).encode()).replace(b"\n", b"\r\n")
    att = base64.encodebytes(bytes(range(256)) * 2000).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    raw = (b'Content-Type: multipart/mixed; boundary="B"\r\nSubject: big\r\n\r\n--B\r\n'
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + text
           + b"--B\r\nContent-Type: application/zip; name=a.zip\r\nContent-Transfer-Encoding: base64\r\n\r\n" + att
           + b"--B--\r\n")
    cut = indexable(raw)
    assert len(cut) < len(raw) // 2
    same(raw, walked=True)
    same(cut, walked=True)
    assert extract(raw) == extract_reference(raw) == extract(cut)


# Generated messages: lines drawn from a small vocabulary of MIME pieces, so that boundary
# lines, header lines, continuation lines, blank lines and line-break styles meet in every order.
_PIECES = [
    "Subject: hello", "From: A <a@x.test>", "To: b@y.test, =?utf-8?b?5Lu3?= <c@z.test>", " folded",
    "\tfolded", "Content-Type: multipart/mixed; boundary=B", 'Content-Type: multipart/alternative; boundary="C D"',
    "Content-Type: text/plain; charset=gb2312", "Content-Type: text/html", "Content-Type: message/rfc822",
    "Content-Type: application/pdf; name=x.pdf", "Content-Disposition: attachment; filename*=utf-8''a%E5%BD%A2.pdf",
    "Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: quoted-printable", B64, "=C4=FA=BA=C3=",
    "", "", "", "--B", "--B--", "--B ", "--C D", "--C D--", "--B--x", "---B", "body text", "<p>x</p>",
    "From someone", ":bad", "X: ", "价格", "--", "Content-Type: multipart/mixed", "Subject: =?gb2312?B?xOO6ww==?=",
]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_PIECES), max_size=40), st.sampled_from(["\n", "\r\n", "mixed"]), st.booleans())
def test_generated_messages(lines: list[str], eol: str, last_eol: bool) -> None:
    same(generated(lines, eol, last_eol))


def generated(lines: list[str], eol: str, last_eol: bool) -> bytes:
    """The message of ``lines`` with line breaks of style ``eol`` ("mixed": CRLF and LF)."""
    if eol == "mixed":
        text = "".join(line + ("\r\n" if i % 3 else "\n") for i, line in enumerate(lines))
    else:
        text = "".join(line + eol for line in lines)
    if not last_eol:
        text = text.rstrip("\r\n")
    return text.encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_garbage(raw: bytes) -> None:
    same(raw)


# The headers-only parse (the SMTP handler's view of a submitted header block): the email
# package's ``BytesHeaderParser`` tree, defects included.

def same_headers(raw: bytes, *, walked: bool | None = None) -> None:
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    mine = mime_walk.parse_headers(raw)
    if walked is not None:
        assert (mine is not None) == walked
    if mine is not None:
        ref = BytesHeaderParser(policy=compat32).parsebytes(raw)
        assert tree(mine) == tree(ref)
        assert [type(d) for d in mine.defects] == [type(d) for d in ref.defects]


def test_headers_of_the_bench_corpus_and_their_header_blocks() -> None:
    from gateway.rules.headerblock import as_postfix_reads

    for raw in corpus_messages(12, 300):
        same_headers(raw, walked=True)
        read, body_at = as_postfix_reads(raw, 1 << 20)  # the SMTP handler's header block
        assert read is raw
        same_headers(raw[:body_at], walked=True)
        same_headers(raw.replace(b"\r\n", b"\n"), walked=True)


@pytest.mark.parametrize("raw", [
    b"Subject: x\r\nnot a header\r\nTo: a@b.test\r\n\r\nbody",  # no blank line: a defect
    b"From sender Mon Jan  1 00:00:00 2024\nSubject: x\n\nbody\n",  # an mbox envelope line
    b"Subject: x\r\n folded\r\n\tagain\r\nTo: a@b.test\r\n",  # continuation lines, no body
    b"Subject: x",  # no line end at all
    b"",
])
def test_headers_of_odd_shapes(raw: bytes) -> None:
    same_headers(raw, walked=True)


@pytest.mark.parametrize("raw", [b" leading continuation\r\n\r\n", b":no name\r\n\r\n", b"Subject: x\rlone CR\r\n",
                                 b"Subject: x\r\nFrom inside\r\n\r\n"])
def test_headers_the_feed_parser_repairs_go_to_the_email_package(raw: bytes) -> None:
    same_headers(raw, walked=False)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_PIECES), max_size=40), st.sampled_from(["\n", "\r\n", "mixed"]), st.booleans())
def test_headers_of_generated_messages(lines: list[str], eol: str, last_eol: bool) -> None:
    same_headers(generated(lines, eol, last_eol))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_headers_of_garbage(raw: bytes) -> None:
    same_headers(raw)


def test_headers_of_names_each_recipient_once() -> None:
    """A message whose To and Cc name one address (or To twice, as some mail programs write
    a reply-all) lists it once in the record, not "alice, alice"."""
    from gateway.archive import headers_of

    raw = (b"From: bob@acme.test\r\nTo: Alice <alice@acme.test>, carol@acme.test\r\n"
           b"Cc: alice@acme.test\r\nTo: carol@acme.test\r\n\r\nbody\r\n")
    assert headers_of(raw)["to"] == ["alice@acme.test", "carol@acme.test"]
