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
