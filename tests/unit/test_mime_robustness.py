"""Hostile-but-plausible mail through every parser the gateway runs on client and Internet mail.

Messages are generated from a template (tests below): header values mixing ASCII, bare UTF-8
and GBK bytes, invalid UTF-8, RFC 2047 encoded-words (valid, unknown charset, bad base64),
RFC 2231 parameters (valid and broken), very long lines, NULs, missing and duplicated headers;
bodies multipart with broken or missing boundaries, nested message/rfc822, invalid base64 and
quoted-printable, wrong or unknown charsets.  The property: no parser raises (a parser may
return empty or partial results); where it makes sense, an invariant (an attachment's name,
written in any of the encodings clients use, is read back decoded).  Each failure the property
found has a plain regression example at the end of this file.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import os
import urllib.parse
from email.parser import BytesHeaderParser
from email.policy import compat32
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.archive import extraction, headers_of
from gateway.archive.export import ExportItem, attachment, attachments, read_mbox, write_mbox, write_zip
from gateway.archive.mime_walk import parse_headers
from gateway.archive.terms import short_grams
from gateway.directory import EmployeeInfo
from gateway.distribute import inquiry
from gateway.dkim import BLANK_LINE_NOTE, DkimSign
from gateway.imap import headers as imap_headers
from gateway.imap.decisions import Decision
from gateway.imap.parser import Parser, quote
from gateway.imap.rewrite import literal_bytes, rewrite_envelope
from gateway.mimeparts import decode_8bit, parse_bytes
from gateway.mutate import Outgoing
from gateway.policy.context import header_text
from gateway.rewrite import RewriteSender
from gateway.rules.actions import AddHeaderMutation, PrependSubjectMutation
from gateway.rules.conditions import CONDITIONS
from gateway.rules.content import may_have_attachments, parse_content
from gateway.rules.facts import facts_for
from gateway.rules.headerblock import HeaderBlock, as_postfix_reads
from gateway.smtp.checks import has_bare_cr, normalize_bare_lf
from gateway.smtp.handler import MAX_HEADER_BLOCK, SubmissionHandler
from tests.unit.rules import conftest as rules_conftest
from tests.unit.rules.conftest import make_ctx

rules_world = rules_conftest.world  # the rule tests' company (a fixture)

# MAILGATE_FUZZ_EXAMPLES=2000 for a longer hunt; 150 keeps the file near 20 s
FAST = settings(max_examples=int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# -- the template's pieces ---------------------------------------------------------------------

NAME = "报价单 第2版"
WORDS = st.sampled_from([b"Quotation", b"hello world", b"a", b"", b" ", b"x" * 1200, b"=?", b"?=", b"\"", b"\\",
                         b"(comment", b")", b"<", b">", b",", b";", b":", b"@", b"%", b"*"])
BARE = st.sampled_from([NAME.encode(), NAME.encode("gbk"), "Ærø".encode("latin-1"), "价格".encode("big5", "replace"),
                        b"\xff\xfe\xc3", b"\xe6\x8a", b"\x00", b"a\x00b", b"\x80\x81\x82", b"a\rb",
                        "\u2028\x85".encode(), b"\x0b\x0c\x1c"])


def _b64(text: str, charset: str = "utf-8") -> bytes:
    return base64.b64encode(text.encode(charset)).replace(b"\n", b"")


ENCODED = st.sampled_from([
    b"=?utf-8?b?" + _b64(NAME) + b"?=",
    b"=?GB2312?B?" + _b64("报价", "gbk") + b"?=",
    b"=?utf-8?q?=E6=8A=A5=E4=BB=B7?=",
    b"=?x-unknown-charset?b?" + _b64(NAME) + b"?=",
    b"=?utf-8?b?!!!not*base64?=",
    b"=?utf-8?b?5Lu?=",  # bad padding
    b"=?utf-8?q?=ZZ=E6?=",
    b"=?utf-8*zh?q?abc?=",
    b"=??b??=",
    b"=?utf-8?x?abc?=",
    b"=?utf-8?b?" + _b64("\x00nul") + b"?=",
    b"=?utf-8?b?" + _b64("a\r\nBcc: evil@x.test\rc") + b"?=",
    b"=?utf-8?q?a=0D=0AX-Injected:_1?=",
    b"=?utf-8?b?" + _b64('"quoted" <x@y>') + b"?=",
    b"=?gb18030?b?" + _b64(NAME, "gb18030") + b"?= =?utf-8?b?" + _b64("x") + b"?=",
])
TEXT = st.lists(st.one_of(WORDS, BARE, ENCODED), max_size=5).map(b" ".join)
DOMAINS = st.sampled_from([b"acme.test", b"own.example", b"col.example", b"gmail.com", b"\xe4\xbe\x8b.cn",
                           b"", b"[127.0.0.1]", b"x" * 300])
LOCALS = st.sampled_from([b"alice", b"buyer", b"bob", b"", b"a.b+c", b"\"quoted local\"", b"\xe7\x8e\x8b",
                          b"\x00"])


@st.composite
def address(draw: st.DrawFn) -> bytes:
    addr = draw(LOCALS) + draw(st.sampled_from([b"@", b"", b"@@"])) + draw(DOMAINS)
    shape = draw(st.integers(0, 5))
    name = draw(TEXT)
    if shape == 0:
        return addr
    if shape == 1:
        return name + b" <" + addr + b">"
    if shape == 2:
        return b'"' + name + b'" <' + addr + b">"
    if shape == 3:
        return addr + b" (" + name + b")"
    if shape == 4:
        return b"group: " + addr + b", " + name + b" <" + addr + b">;"
    return draw(st.sampled_from([name + b" <" + addr, b'"a <b@c>" <' + addr + b">", b"<@route:" + addr + b">",
                                 b"a@b@c", b"(nested (comment)) " + addr, b'"esc\\" \\"" <' + addr + b">"]))


ADDRESS_LIST = st.lists(address(), max_size=4).map(b", ".join)
CHARSETS = st.sampled_from([b"utf-8", b"gbk", b"gb2312", b"us-ascii", b"x-unknown", b"", b"\"utf-8",
                            b"iso-8859-1", b"utf-7", b"unicode-1-1-utf-7", b"utf-16", b"\xe6"])


@st.composite
def name_param(draw: st.DrawFn, key: bytes) -> bytes:
    """A file-name parameter in one of the ways clients write it."""
    kind = draw(st.integers(0, 9))
    quoted = urllib.parse.quote(NAME).encode()
    if kind == 0:
        return key + b'="' + draw(TEXT) + b'"'
    if kind == 1:
        return key + b"*=utf-8''" + quoted
    if kind == 2:
        return key + b"*0*=utf-8''" + quoted[:9] + b"; " + key + b"*1*=" + quoted[9:]
    if kind == 3:
        return key + b"*=bogus-charset''" + quoted
    if kind == 4:
        return key + b"*=utf-8''%ZZ%E6%"
    if kind == 5:
        return key + b"*1=only-the-second-part.pdf"
    if kind == 6:
        return key + b"*=''"
    if kind == 7:
        return key + b"*0=a; " + key + b"*0=b; " + key + b"*2*=%E6"
    if kind == 8:
        return key + draw(st.sampled_from([b"=", b"*=utf-8'zh-cn'", b"*=''"])) + draw(BARE)
    return key + b'="' + draw(ENCODED) + b'.pdf"'


CONTENT_TYPES = st.sampled_from([b"text/plain", b"text/html", b"application/pdf", b"application/octet-stream",
                                 b"image/png", b"text", b"", b"multipart/mixed", b"message/rfc822", b"x/y/z",
                                 b"TEXT/PLAIN", b"message/delivery-status", b"multipart/digest"])
ENCODINGS = st.sampled_from([b"base64", b"quoted-printable", b"7bit", b"8bit", b"binary", b"x-uuencode",
                             b"BASE64 ", b"bogus", b""])
BODIES = st.sampled_from([b"Hello", NAME.encode(), NAME.encode("gbk"), b"!!!not base64==", b"5Lu",
                          b"=ZZ=E6=\r\nsoft=", b"<p>Total <b>5</b>", b"<script>x", b"\x00\x01\xff",
                          _b64(NAME), b"A" * 5000, b"begin 644 x\r\n#0V%T\r\n`\r\nend", b"", b"lone\rCR",
                          b"From the start", b"--b1", b"--b1--"])


@st.composite
def params(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        out += b"; " + draw(st.one_of(
            st.builds(lambda c: b"charset=" + c, CHARSETS),
            st.builds(lambda c: b'charset="' + c + b'"', CHARSETS),
            name_param(b"name"),
            st.just(b"boundary="), st.just(b"format=flowed"), st.just(b"garbage"), st.just(b'x="unclosed'),
            st.just(b"charset*=''utf-8"), st.just(b"charset*=utf-8'en'gbk"), st.just(b"charset*0=gb; charset*1=k"),
        ))
    return out


@st.composite
def part(draw: st.DrawFn, depth: int = 0) -> bytes:
    """One MIME entity: header lines, a blank line (or not), a body."""
    nl = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    lines: list[bytes] = []
    ctype = draw(CONTENT_TYPES)
    if depth < 2 and draw(st.integers(0, 3)) == 0:
        ctype = draw(st.sampled_from([b"multipart/mixed", b"multipart/alternative", b"message/rfc822"]))
    boundary = draw(st.sampled_from([b"b1", b"==_b_" + b"x" * 60, b'"quoted b"', b"", b"\xe6\x8a"]))
    if draw(st.booleans()) or ctype.startswith(b"multipart"):
        extra = b"; boundary=" + boundary if ctype.startswith(b"multipart") and draw(st.integers(0, 5)) else b""
        lines.append(b"Content-Type: " + ctype + extra + draw(params()))
    if draw(st.booleans()):
        lines.append(b"Content-Disposition: " + draw(st.sampled_from([b"attachment", b"inline", b"ATTACHMENT",
                                                                       b"", b"weird", b"\xe9\x99\x84"]))
                     + draw(st.sampled_from([b"", b"; "])) + draw(st.one_of(st.just(b""), name_param(b"filename"))))
    if draw(st.booleans()):
        lines.append(b"Content-Transfer-Encoding: " + draw(ENCODINGS))
    for _ in range(draw(st.integers(0, 2))):
        lines.append(draw(st.sampled_from([b"Content-Type: text/plain; charset=gbk", b"X-Junk: \x00",
                                           b"Subj\xc3\xa9ct: 8-bit name", b"X-Long: " + b"y" * 3000,
                                           b"no colon here", b" leading continuation", b": empty name",
                                           b"Content-Disposition: attachment; filename=dup.txt"])))
    draw(st.randoms(use_true_random=False)).shuffle(lines)
    head = nl.join(lines) + (nl if lines else b"")
    sep = draw(st.sampled_from([nl, nl, b""]))
    if ctype == b"message/rfc822" and depth < 2:
        body = draw(message(depth + 1))
    elif ctype.startswith(b"multipart") and depth < 2:
        b = boundary.strip(b'"')
        marker = draw(st.sampled_from([b, b, b"other"]))
        children = draw(st.lists(part(depth + 1), max_size=3))
        body = draw(st.sampled_from([b"preamble" + nl, b""]))
        for child in children:
            body += b"--" + marker + nl + child + nl
        body += draw(st.sampled_from([b"--" + marker + b"--" + nl, b"", b"--" + marker + nl]))
    else:
        body = draw(st.lists(BODIES, max_size=3).map(nl.join))
    return head + sep + body


HEADERS = {
    b"Subject": TEXT, b"From": ADDRESS_LIST, b"To": ADDRESS_LIST, b"Cc": ADDRESS_LIST, b"Reply-To": ADDRESS_LIST,
    b"Sender": ADDRESS_LIST, b"Date": st.sampled_from([b"Tue, 1 Dec 2026 10:00:00 +0800", b"yesterday", b"",
                                                       b"Tue, 31 Feb 2026 25:61:00 +9999", b"1 Dec 99999",
                                                       b"\xe6\x98\x9f\xe6\x9c\x9f\xe4\xba\x8c"]),
    b"Message-ID": st.sampled_from([b"<m1@acme.test>", b"", b"<unclosed", b"<\xe6\x8a@x>", b"<a@b> <c@d>",
                                    b"<" + b"x" * 2000 + b">", b"\x00"]),
    b"In-Reply-To": st.sampled_from([b"<m0@acme.test>", b"garbage", b"<\x00@x>"]),
    b"References": st.sampled_from([b"<m0@acme.test> <m1@acme.test>", b"\xff"]),
    b"Content-Language": st.sampled_from([b"zh-CN", b"", b"\xe4\xb8\xad"]),
}


@st.composite
def message(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A whole message: the top-level headers (any missing, some twice, long lines folded or not)
    in front of a MIME entity."""
    nl = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    lines = []
    for name, values in HEADERS.items():
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
            value = draw(values)
            if draw(st.integers(0, 4)) == 0:  # folded
                value = value.replace(b" ", nl + b" ", 1)
            lines.append(draw(st.sampled_from([name, name.lower(), name.upper()])) + b": " + value)
    if draw(st.integers(0, 5)) == 0:
        lines.append(b"MIME-Version: 1.0")
    draw(st.randoms(use_true_random=False)).shuffle(lines)
    return nl.join(lines) + (nl if lines else b"") + draw(part(depth))


MESSAGES = message()

# -- the parsers ---------------------------------------------------------------------------------

TAGGED = ("from", "sender", "reply-to", "to", "cc")


def condition_values(world: SimpleNamespace) -> dict[str, object]:
    """A plausible argument for every rule condition."""
    return {
        "sender": "*@acme.test", "sender-department": "Sales", "sender-role": "salesperson",
        "sender-group": "team", "recipient-relationship": ["own", "unknown", "internal"],
        "recipient-stage": "deal", "recipient-tag": "VIP", "recipient-country": "DE",
        "recipient-domain": ["own.example", "*.cn"], "recipient": "*@own.example", "first-contact": "true",
        "subject-contains": ["报价", "quotation"], "body-contains": "报价", "subject-regex": r"报价|\d+",
        "body-regex": r"price\s+\d+", "attachment-type": ["pdf", "image"], "attachment-name": ["*.pdf", "报价*"],
        "attachment-count": "> 0", "attachment-size": "> 1KB", "message-size": "> 10KB",
        "time-of-day": "09:00-18:00", "day-of-week": "weekday",
    }


def policy_view(world: SimpleNamespace, raw: bytes) -> None:
    """What the SMTP handler's policy step reads: the header block as the handler parses it, the
    Subject and addresses, the content facts and every condition."""
    raw, body_at = as_postfix_reads(raw, MAX_HEADER_BLOCK)  # the handler's one reading, on arrival
    ctx = make_ctx(world, raw)
    block = raw[:body_at]
    ctx.headers = parse_headers(block) or BytesHeaderParser(policy=compat32).parsebytes(block)
    for name in ctx.headers.keys():
        assert isinstance(header_text(ctx.headers.get(name)), str)
    # what the SMTP handler stores (archive record, hold, queue row): no NUL, PostgreSQL refuses it
    assert "\x00" not in ctx.subject and "\x00" not in SubmissionHandler._message_id(ctx)
    ctx.all_recipients()
    if not may_have_attachments(ctx.headers):  # the short cut skips the parse: it must lose nothing
        assert parse_content(raw).attachments == []
    facts = facts_for(ctx, world.directory, world.env)
    values = condition_values(world)
    assert set(values) == set(CONDITIONS), "a new condition: give it a value here"
    for name, cls in CONDITIONS.items():
        hit, why = cls(values[name], world.env).test(facts)
        assert isinstance(hit, bool) and isinstance(why, str)


def mutations(raw: bytes, signer: object) -> None:
    """The header edits a verdict may apply, then DKIM signing — on DATA as the SMTP handler
    passes it on (bare LF normalised, bare CR refused); the body stays as it was."""
    raw = normalize_bare_lf(raw)
    if has_bare_cr(raw):
        return
    emp = EmployeeInfo(1, "alice@acme.test", "王丽", None, None, frozenset(), True)
    ctx = SimpleNamespace(mail_from="alice@acme.test", employee=emp)
    out = Outgoing("alice@acme.test", ["buyer@own.example"], raw)
    PrependSubjectMutation("[外部] ").apply(out, ctx)
    AddHeaderMutation("X-Mailgate", "checked 检查").apply(out, ctx)
    RewriteSender("sales@acme.test", "{name} | ACME", recorder=lambda *a: None).apply(out, ctx)
    hb = HeaderBlock(out.data)
    assert hb.get("From") == "王丽 | ACME <sales@acme.test>"
    before = out.data
    DkimSign(signer).apply(out, ctx)
    if out.notes[-1] == "DKIM-signed for acme.test":
        assert out.data.startswith(b"DKIM-Signature: ") and out.data.endswith(before)
    else:
        assert out.notes[-1].startswith("not DKIM-signed: a header line") and out.data == before
    end = raw.find(b"\r\n\r\n")
    if end >= 0:
        assert out.data.endswith(raw[end:])


def archive_view(raw: bytes) -> None:
    fields = headers_of(raw)
    assert "\x00" not in repr([fields["subject"], fields["message_id"], fields["from"], fields["to"]])
    for ex in (extraction.extract(raw), extraction.extract(raw, headers=False)):
        for text in (ex.subject, ex.sender, ex.rcpt, ex.body, ex.attnames):
            short_grams(text)
    assert extraction.extract(raw) == extraction.extract_reference(raw)  # mime_walk's promise
    assert extraction.extract(extraction.indexable(raw)) == extraction.extract(raw)
    parts = attachments(raw)
    for n in range(len(parts)):
        assert attachment(raw, n) == parts[n]
    item = ExportItem(1, dt.datetime(2026, 12, 1), "outbound", "alice@acme.test", "buyer@own.example",
                      header_text(parse_bytes(raw).get("Subject")), "0" * 64, raw)
    buf = io.BytesIO()
    write_mbox(buf, [item])
    body = raw.replace(b"\r\n", b"\n")
    assert read_mbox(buf.getvalue()) == [body if body.endswith(b"\n") else body + b"\n"]
    write_zip(io.BytesIO(), [item])


def imap_tagging(raw: bytes, tag: str) -> None:
    """The proxy's tagging of display names ([客户] …) in a message header."""
    length = imap_headers.header_length(raw)
    header = raw[:length] if length is not None else raw
    plan = imap_headers.plan(header, TAGGED, lambda address: tag)
    for sp in plan.splices:  # no line break or NUL decoded from an encoded-word into the raw field
        body = sp.new.removesuffix(b"\n").removesuffix(b"\r")
        for c in (b"\r", b"\n", b"\x00"):
            assert c in sp.old or c not in body, sp
    tagged = imap_headers.apply(header, plan.splices)
    assert len(tagged) - len(header) == imap_headers.delta(plan.splices)
    assert imap_headers.apply_by_content(header, plan.splices) == tagged
    # the ENVELOPE the upstream server gives for the same header (names as literals), retagged
    fields: dict[str, bytes] = {}
    seen: list[str] = []
    for f in imap_headers.iter_fields(header):  # the first of each field
        fields.setdefault(f.name, header[f.colon + 1:f.end])
        seen.append(f.name)
    lists = []
    for name in ("from", "sender", "reply-to", "to", "cc", "bcc"):
        pieces = imap_headers.parse_addresses(fields.get(name, b""))
        lists.append(b"(" + b"".join(b"(" + literal_bytes(p.display) + b" NIL " + b" ".join(
            quote(x.encode("utf-8", "replace")) for x in p.address.rpartition("@")[::2]) + b")"
            for p in pieces) + b")" if pieces else b"NIL")
    envelope = b'(NIL NIL ' + b" ".join(lists) + b" NIL NIL)"
    value = Parser(envelope).value()
    decision = Decision(len(header), plan.splices, plan.names)
    out = rewrite_envelope(envelope, value, decision, TAGGED)
    again = Parser(out).value()
    assert again.kind == value.kind and len(again.items) == 10
    names = [(f, a) for f, a, _ in plan.names]
    for f, a, phrase in plan.names:
        if names.count((f, a)) == 1 and seen.count(f) == 1:  # (an address twice gets its first name twice)
            assert quote(imap_headers.envelope_name(phrase)) in out


# -- the properties ----------------------------------------------------------------------------


@FAST
@given(raw=MESSAGES)
def test_policy_reads_any_message(rules_world: SimpleNamespace, raw: bytes) -> None:
    rules_world.env.groups = {"team": frozenset({"alice@acme.test"})}
    policy_view(rules_world, raw)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> object:
    from gateway.dkim import DkimSigner, load_keys
    from gateway.keys import make_dkim_keys

    d = tmp_path_factory.mktemp("dkim")
    make_dkim_keys(d, "mailgate", "acme.test")
    return DkimSigner({"acme.test": load_keys(d, "mailgate", ["ed25519"])})


@FAST
@given(raw=MESSAGES)
def test_mutations_take_any_message(signer: object, raw: bytes) -> None:
    mutations(raw, signer)


@FAST
@given(raw=MESSAGES)
def test_archive_reads_any_message(raw: bytes) -> None:
    archive_view(raw)


@FAST
@given(raw=MESSAGES)
def test_distribution_reads_any_message(raw: bytes) -> None:
    got = inquiry.parse(raw)
    assert got.language is not None and isinstance(got.thread_ids, list)
    stored = [got.message_id, got.from_addr, got.from_name, got.subject, got.preview, got.reply_to]
    assert "\x00" not in repr(stored)  # the distribution row: PostgreSQL refuses NUL


@FAST
@given(raw=MESSAGES, tag=st.sampled_from(["[客户]", "[Customer]"]))
def test_imap_tags_any_header(raw: bytes, tag: str) -> None:
    imap_tagging(raw, tag)


NAME_TEXT = st.text(alphabet="报价单第版样品发票合同形式ABCxyz019_-.", min_size=1, max_size=30).filter(
    lambda t: decode_8bit(t.encode("gbk")) == t)


@FAST
@given(name=NAME_TEXT, how=st.sampled_from(["utf-8", "gbk", "2231", "2231-continued", "2047", "type-name"]),
       nl=st.sampled_from([b"\r\n", b"\n"]))
def test_an_attachment_name_is_read_in_any_encoding_clients_use(name: str, how: str, nl: bytes) -> None:
    """The name of an attachment written bare (UTF-8 or GBK), as RFC 2231 (whole or in
    sections), as an RFC 2047 word or only in Content-Type: the rules, the index and the export
    all read it."""
    quoted = urllib.parse.quote(name).encode()
    params = {"utf-8": b'; filename="' + name.encode() + b'"', "gbk": b'; filename="' + name.encode("gbk") + b'"',
              "2231": b"; filename*=utf-8''" + quoted,
              "2231-continued": b"; filename*0*=utf-8''" + urllib.parse.quote(name[:1]).encode()
              + b"; filename*1*=" + urllib.parse.quote(name[1:]).encode(),
              "2047": b'; filename="=?utf-8?b?' + _b64(name) + b'?="', "type-name": b""}[how]
    ctype = b"application/octet-stream" + (b'; name="' + name.encode() + b'"' if how == "type-name" else b"")
    raw = nl.join([b"From: a@own.example", b"To: alice@acme.test", b"Subject: files", b"MIME-Version: 1.0",
                   b"Content-Type: multipart/mixed; boundary=b1", b"", b"--b1", b"Content-Type: text/plain", b"",
                   b"see the file", b"--b1", b"Content-Type: " + ctype,
                   b"Content-Disposition: attachment" + params, b"Content-Transfer-Encoding: base64", b"",
                   base64.b64encode(b"%PDF-1.4 data"), b"--b1--", b""])
    assert [a.name for a in parse_content(raw).attachments] == [name]
    assert extraction.extract(raw).attnames == name
    assert [(p.name, p.data) for p in attachments(raw)] == [(name, b"%PDF-1.4 data")]


# -- what the property found: plain examples -------------------------------------------------

MIXED_2231 = (b"From: a@own.example\r\nTo: alice@acme.test\r\nSubject: mixed\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=b1; name*=utf-8''%E6%8A%A5; name*0*=utf-8''%E6%8A%A5\r\n"
              b"\r\n--b1\r\nContent-Type: text/plain; charset=utf-8; x*=a; x*0=b\r\n\r\n"
              b"\xe6\x8a\xa5\xe4\xbb\xb7 price 5\r\n"
              b"--b1\r\nContent-Type: application/pdf\r\n"
              b"Content-Disposition: attachment; filename*=utf-8''%E6%8A%A5.pdf; filename*0*=utf-8''x\r\n"
              b"\r\n%PDF-1.4\r\n--b1--\r\n")


def test_a_mixed_rfc2231_parameter_list_is_read(rules_world: SimpleNamespace) -> None:
    """``name*=…`` and ``name*0*=…`` in one parameter list: the email package's RFC 2231
    decoding sorts None with 0 (TypeError) — from the parse itself for a multipart, from
    ``get_param`` of a part.  The rule content facts raised (450-then-451 forever while a body
    or attachment rule was loaded); the archive indexed the raw text and offered no attachment."""
    content = parse_content(MIXED_2231)
    assert "报价 price 5" in content.body_text
    assert [a.name for a in content.attachments] == ["报.pdf"]
    ctx = make_ctx(rules_world, MIXED_2231, sender="a@own.example", to=("alice@acme.test",))
    hit, _ = CONDITIONS["attachment-name"]("*.pdf", rules_world.env).test(facts_for(ctx, rules_world.directory,
                                                                                      rules_world.env))
    assert hit
    ex = extraction.extract(MIXED_2231)
    assert ex == extraction.extract_reference(MIXED_2231)
    assert ex.body.strip() == "报价 price 5" and ex.attnames == "报.pdf"
    assert [(p.name, p.data) for p in attachments(MIXED_2231)] == [("报.pdf", b"%PDF-1.4")]
    assert inquiry.parse(MIXED_2231).text == "报价 price 5"


@pytest.mark.parametrize("line", [b"no colon here", b": empty name"])
def test_a_header_line_that_is_no_field_is_signed_after_a_blank_line(signer: object, line: bytes) -> None:
    """dkimpy raises on a header line that is neither a field nor a continuation; the sign
    mutation raised (451 on every try), then sent such mail unsigned. Now it reads the line as
    Postfix's cleanup does, the first body line, and signs the message with the blank line
    Postfix would put before it."""
    raw = b"From: alice@acme.test\r\n" + line + b"\r\nTo: b@own.example\r\n\r\nbody\r\n"
    out = Outgoing("alice@acme.test", ["b@own.example"], raw)
    DkimSign(signer).apply(out, SimpleNamespace())
    assert out.notes == [BLANK_LINE_NOTE, "DKIM-signed for acme.test"]
    assert out.data.startswith(b"DKIM-Signature: ")
    assert out.data.endswith(b"\r\nFrom: alice@acme.test\r\n\r\n" + line + b"\r\nTo: b@own.example\r\n\r\nbody\r\n")


def test_a_continuation_before_any_field_leaves_no_from_to_sign_for(signer: object) -> None:
    raw = b" a continuation before any field\r\nFrom: alice@acme.test\r\n\r\nbody\r\n"
    out = Outgoing("alice@acme.test", ["b@own.example"], raw)
    DkimSign(signer).apply(out, SimpleNamespace())  # Postfix: all of it is the body
    assert out.data == raw and out.notes == ["not DKIM-signed: no key for (no From domain)"]


def test_an_obsolete_field_dkim_cannot_read_is_sent_unsigned(signer: object) -> None:
    """``name :`` (a blank before the colon, RFC 5322 §4.5.3) is a field to Postfix, not to
    dkimpy: sent unsigned rather than refused."""
    raw = b"From: alice@acme.test\r\nX-Old : value\r\nTo: b@own.example\r\n\r\nbody\r\n"
    out = Outgoing("alice@acme.test", ["b@own.example"], raw)
    DkimSign(signer).apply(out, SimpleNamespace())
    assert out.data == raw and out.notes == ["not DKIM-signed: a header line dkimpy cannot read as a field"]
    good = Outgoing("alice@acme.test", ["b@own.example"], b"From: alice@acme.test\r\nTo: b@own.example\r\n\r\nb\r\n")
    DkimSign(signer).apply(good, SimpleNamespace())
    assert good.notes == ["DKIM-signed for acme.test"]


def test_a_nul_in_a_header_stays_out_of_the_stored_fields(rules_world: SimpleNamespace) -> None:
    """A raw NUL in the Subject, or one an encoded-word decodes to, reached the archive record's
    and the hold's subject (and the Message-ID the queue row): PostgreSQL refuses a NUL in a
    text value, so the store failed and the message got 451 on every try."""
    raw = (b"From: =?utf-8?b?AGE=?= <a@own.example>\r\nTo: alice@acme.test\r\n"
           b"Subject: a\x00b =?utf-8?b?" + _b64("c\x00d") + b"?=\r\nMessage-ID: <m\x00@x>\r\n\r\nbody\r\n")
    ctx = make_ctx(rules_world, raw, sender="a@own.example", to=("alice@acme.test",))
    assert ctx.subject == "a b c d"
    assert SubmissionHandler._message_id(ctx) == "<m @x>"
    assert headers_of(raw) == {"subject": "a b c d", "message_id": "<m @x>", "from": "a@own.example",
                               "to": ["alice@acme.test"], "date": None}


@pytest.mark.parametrize("decoded", ["\x00nul", "a\r\nBcc: evil@x.test", "a\rb"])
def test_a_tagged_name_gets_no_control_character_from_an_encoded_word(decoded: str) -> None:
    """With an ASCII tag the tagged name is written as a quoted string: a NUL, CR or LF an
    encoded-word decoded to went into the header the mail client reads as a raw byte (a lone CR
    is a line break to some clients: a field of the sender's making)."""
    header = b"From: =?utf-8?b?" + _b64(decoded) + b"?= <buyer@own.example>\r\n\r\n"
    plan = imap_headers.plan(header, TAGGED, lambda address: "[Customer]")
    tagged = imap_headers.apply(header, plan.splices)
    assert tagged.count(b"\r") == 2 and tagged.count(b"\n") == 2 and b"\x00" not in tagged
    assert tagged.startswith(b'From: "[Customer] ' + " ".join(decoded.replace("\x00", " ").split()).encode())


def test_a_nul_stays_out_of_the_distribution_row() -> None:
    """The distribution row of a shared-mailbox message took Subject, From name, Message-ID and
    the text preview as they were: PostgreSQL refuses a NUL, the watcher's session failed on the
    message and met it again after every reconnect — the shared mailbox stopped there."""
    raw = (b"From: =?utf-8?b?" + _b64("Li\x00Wei") + b"?= <li@buyer.example>\r\nSubject: price\x00list\r\n"
           b"Message-ID: <a\x00b@buyer.example>\r\nContent-Type: text/plain\r\n\r\nneed\x00 price\r\n")
    got = inquiry.parse(raw)
    assert (got.from_name, got.subject, got.message_id, got.text) == ("Li Wei", "price list", "", "need price")
