import pytest

from gateway.smtp.checks import address_problem, has_bare_cr, helo_problem, normalize_bare_lf


@pytest.mark.parametrize("addr", ["a@b.com", "first.last+tag@sub.example.co.uk", "张三@例子.中国", "x@[127.0.0.1]"])
def test_good_addresses(addr):
    assert address_problem(addr) is None


@pytest.mark.parametrize("addr", [
    "a%b@c.com", "b!a", "@r.com:a@b.com", '"a@b"@c.com', "a\r\n@b.com", "a\x00@b.com", "noatsign",
    ".a@b.com", "a..b@c.com", "a@-bad.com", "a@b", "x" * 400 + "@b.com",
])
def test_bad_addresses(addr):
    assert address_problem(addr) is not None


@pytest.mark.parametrize("data,bare", [
    (b"a\r\nb\r\n", False), (b"a\nb\r\n", False), (b"a\rb\r\n", True), (b"a\r\r\n", True), (b"", False),
    (b"x\r\n.\r", True),
])
def test_bare_cr(data, bare):
    assert has_bare_cr(data) is bare


@pytest.mark.parametrize("data,normal", [
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\nb\r\n", b"a\r\nb\r\n"),
    (b"body\n.\nMAIL FROM:<x@y>\n", b"body\r\n.\r\nMAIL FROM:<x@y>\r\n"),
])
def test_bare_lf_normalised(data, normal):
    assert normalize_bare_lf(data) == normal


def test_helo():
    assert helo_problem("mail.example.com") is None
    assert helo_problem("[192.0.2.1]") is None
    assert helo_problem("bad host") and helo_problem("bad\rhost") and helo_problem("")


def test_the_fast_address_parser_agrees_with_aiosmtpds():
    """SubmissionSMTP._getaddr takes plain <local@domain> itself; every answer must be the one
    aiosmtpd's own parser gives (the fallback handles everything else)."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    from gateway.smtp.server import SubmissionSMTP

    class Handler:
        pass

    loop = asyncio.new_event_loop()
    try:
        stock, ours = SMTP(Handler(), loop=loop), SubmissionSMTP(Handler(), loop=loop)
        for arg in ["<a@b.c>", " <a@b.c> SIZE=5", "<a.b+c@x-y.example.com> BODY=8BITMIME", "<a..b@c>",
                    '<"q"@b.c>', "<@r:a@b.c>", "a@b.c", "<a@[1.2.3.4]>", "<a@b.c>SIZE=1", "<a@b.c.>",
                    "<a@b.c>  x", "<a@b.c> (comment) SIZE=1", "<>", "<ä@b.c>", "<a@b.c", "<a%b@c.d>",
                    "<a!b@c.d>", "<" + "x" * 80 + "@b.c>"]:
            assert ours._getaddr(arg) == stock._getaddr(arg), arg
    finally:
        loop.close()


def test_cached_class_dir_finds_every_command_and_hook():
    """SubmissionSMTP/SubmissionHandler answer dir() from a per-class cache (aiosmtpd calls it
    on every connection): the commands, hooks and AUTH mechanisms found stay the same."""
    import asyncio

    from gateway.smtp.handler import SubmissionHandler
    from gateway.smtp.server import SubmissionSMTP

    handler = SubmissionHandler.__new__(SubmissionHandler)  # dir() needs no configured instance
    loop = asyncio.new_event_loop()
    try:
        server = SubmissionSMTP(handler, loop=loop)
        assert set(server._smtp_methods) == {n[5:] for n in type.__dir__(SubmissionSMTP) if n.startswith("smtp_")}
        assert set(server._handle_hooks) == {n[7:] for n in type.__dir__(SubmissionHandler) if n.startswith("handle_")}
        assert {"DATA", "MAIL", "RCPT", "EHLO"} <= set(server._handle_hooks)
        assert {"PLAIN", "LOGIN"} <= set(server._auth_methods)
        assert server._smtp_methods["DATA"].__self__ is server  # bound to this connection
    finally:
        loop.close()


# -- From/Sender spoofing: addresses and display names -----------------------------------------

OWN = {"alice@acme.test", "alice.wang@acme.test"}


def senders(block: bytes) -> list[tuple[str, str]]:
    """foreign_header_senders of a header ``block`` as the SMTP handler parses it."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    from gateway.archive.mime_walk import parse_headers
    from gateway.smtp.checks import foreign_header_senders

    lean, full = parse_headers(block), BytesHeaderParser(policy=compat32).parsebytes(block)
    found = foreign_header_senders(lean, OWN)
    assert foreign_header_senders(full, OWN) == found  # either parser the handler may use
    return [(f.address, f.display_name) for f in found]


@pytest.mark.parametrize("field, address, name", [
    (b'From: "bob@acme.test" <alice@acme.test>', "bob@acme.test", "bob@acme.test"),
    (b"From: bob@acme.test <alice@acme.test>", "bob@acme.test", ""),  # unquoted: two mailboxes
    (b'From: "Bob Li (BOB@Acme.Test)" <alice@acme.test>', "bob@acme.test", "Bob Li (BOB@Acme.Test)"),
    (b'From: "Boss <boss@acme.test>" <alice@acme.test>', "boss@acme.test", "Boss <boss@acme.test>"),
    (b"From: alice@acme.test (bob@acme.test)", "bob@acme.test", "bob@acme.test"),  # a comment, shown too
    (b"From: =?utf-8?q?bob=40acme=2Etest?= <alice@acme.test>", "bob@acme.test", "bob@acme.test"),
    (b"From: =?UTF-8?B?Ym9iQGFjbWUudGVzdA==?= <alice@acme.test>", "bob@acme.test", "bob@acme.test"),
    (b'From: "=?utf-8?q?bob?= =?utf-8?q?=40acme.test?=" <alice@acme.test>', "bob@acme.test", "bob@acme.test"),
    (b"From: =?x-unknown?q?bob=40acme.test?= <alice@acme.test>", "bob@acme.test", "bob@acme.test"),
    (b"From: =?utf-8?b?Ym9i77ygYWNtZe+8jnRlc3Q=?= <alice@acme.test>", "bob@acme.test", "bob\uff20acme\uff0etest"),
    ('From: "Bob \uff42\uff4f\uff42\uff20\uff41\uff43\uff4d\uff45.test" <alice@acme.test>'.encode(),
     "bob@acme.test", "Bob \uff42\uff4f\uff42\uff20\uff41\uff43\uff4d\uff45.test"),  # raw UTF-8, full-width
    ('From: "bob\ufe6bacme\u3002test" <alice@acme.test>'.encode(), "bob@acme.test", "bob\ufe6bacme\u3002test"),
    ('From: "bob\u200b@\u200bacme.test" <alice@acme.test>'.encode(), "bob@acme.test", "bob\u200b@\u200bacme.test"),
    (b"Sender: =?utf-8?q?ceo=40elsewhere.example?= <alice@acme.test>", "ceo@elsewhere.example",
     "ceo@elsewhere.example"),
])
def test_an_address_in_the_display_name_that_is_not_the_users_is_found(field, address, name):
    assert (address, name) in senders(field + b"\r\nSubject: x\r\n\r\n")


@pytest.mark.parametrize("field", [
    b'From: "alice@acme.test" <alice@acme.test>',
    b'From: "ALICE.WANG@ACME.TEST" <alice@acme.test>',  # an alias, any case
    b"From: =?utf-8?q?alice=2Ewang=40acme.test?= <alice.wang@acme.test>",
    "From: \"\uff41lice\uff20acme.test\" <alice@acme.test>".encode(),
    b'From: "Sales @ ACME" <alice@acme.test>',  # an "@" in another sense
    b'From: "Alice Wang @ acme.test" <alice@acme.test>',
    b'From: "Team@ACME" <alice@acme.test>',  # no dotted domain: no address
    b'From: "@acme.test" <alice@acme.test>',
    b'From: "Alice (Sales)" <alice@acme.test>',
    b"From: =?utf-8?b?546L5Li9?= <alice.wang@acme.test>",
    "From: \"\u738b\u4e3d\" <alice@acme.test>".encode(),
    b"From: alice@acme.test",
    b"From: =?utf-8?q?broken <alice@acme.test>",
])
def test_a_display_name_without_a_foreign_address_passes(field):
    assert senders(field + b"\r\nSubject: x\r\n\r\n") == []


def test_the_fields_own_address_comes_first_and_nothing_twice():
    block = (b'From: "bob@acme.test" <carol@acme.test>\r\nSender: "bob@acme.test" <carol@acme.test>\r\n'
             b'From: "dave@acme.test" <alice@acme.test>\r\n\r\n')
    assert senders(block) == [("carol@acme.test", ""), ("bob@acme.test", "bob@acme.test"),
                              ("dave@acme.test", "dave@acme.test")]


def test_display_name_addresses_read_what_a_reader_sees():
    from gateway.smtp.checks import SHOWN_CHARS, display_name_addresses

    assert display_name_addresses("write to Bob@Acme.Test. or carol@acme.test!") == ["bob@acme.test",
                                                                                     "carol@acme.test"]
    assert display_name_addresses("bob@acme.test@evil.example") == ["bob@acme.test", "acme.test@evil.example"]
    assert display_name_addresses("\u200b" * 5000 + " " * 5000 + "bob@acme.test") == ["bob@acme.test"]
    assert display_name_addresses("x" * SHOWN_CHARS + " bob@acme.test") == []  # beyond what is shown
    assert display_name_addresses("a@" * 100_000) == []


def test_encoded_words_are_decoded_as_a_mail_program_shows_them():
    from gateway.smtp.checks import decode_encoded_words

    assert decode_encoded_words("=?utf-8?q?a?= =?utf-8?q?b?= c =?iso-8859-1?q?=E9?=") == "ab c \u00e9"
    assert decode_encoded_words("x=?utf-8?b?QA==?=y") == "x@y"
    assert decode_encoded_words("=?utf-8?b?Q?= x") == "=?utf-8?b?Q?= x"  # undecodable: left as it is


def test_an_absurdly_long_sender_field_is_refused_without_parsing_it():
    """getaddresses takes seconds for a megabyte of "a@a@…" — on the event loop, every
    session waiting.  No mail program writes such a field: refused as it stands."""
    from gateway.smtp.checks import MAX_SENDER_FIELD

    block = b"From: alice@acme.test, " + b"a@" * MAX_SENDER_FIELD + b"\r\nSubject: x\r\n\r\n"
    # One entry, the field's text as it stands: parsed, it would be its addresses.
    assert senders(block) == [(("alice@acme.test, " + "a@" * MAX_SENDER_FIELD)[:200], "")]
    assert senders(b"From: alice@acme.test\r\n\r\n") == []
