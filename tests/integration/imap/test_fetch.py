"""Tagging through the proxy: byte identity, sizes, partial fetches, envelopes."""

from __future__ import annotations

from email.header import decode_header, make_header

from tests.integration.imap.helpers import direct, display_names, fetch_item, fetch_size, message, uid_of, via


def test_untagged_message_is_byte_identical(proxy, imap_upstream):
    mid, raw = message('"Someone" <someone@unknown.test>')
    imap_upstream.deliver("alice@acme.test", raw)
    d, p = direct(imap_upstream), via(proxy)
    uid = uid_of(d, mid)
    assert uid_of(p, mid) == uid
    for item in ("BODY.PEEK[]", "BODY.PEEK[HEADER]", "RFC822.HEADER", "BODY.PEEK[]<0.20>"):
        assert fetch_item(p, uid, item) == fetch_item(d, uid, item)
    assert fetch_size(p, uid) == fetch_size(d, uid)


def test_tagged_message_size_matches_body(proxy, imap_upstream):
    mid, raw = message('"Buyer" <buyer@buyer.test>', body="x" * 5000 + "\r\n")
    imap_upstream.deliver("alice@acme.test", raw)
    d, p = direct(imap_upstream), via(proxy)
    uid = uid_of(p, mid)
    uid_of(d, mid)
    body = fetch_item(p, uid, "BODY.PEEK[]")
    original = fetch_item(d, uid, "BODY.PEEK[]")
    assert fetch_size(p, uid) == len(body)
    assert display_names(body, "From") == ["[客户] Buyer <buyer@buyer.test>"]
    assert body.endswith(original[original.index(b"\r\n\r\n"):])


def _tagged_pair(proxy, imap_upstream, sender='"Buyer" <buyer@buyer.test>', body_size=5000):
    mid, raw = message(sender, body=("y" * 70 + "\r\n") * (body_size // 72 + 1))
    imap_upstream.deliver("alice@acme.test", raw)
    d, p = direct(imap_upstream), via(proxy)
    uid = uid_of(p, mid)
    uid_of(d, mid)
    return d, p, uid


def test_partial_fetches_are_slices_of_the_rewritten_message(proxy, imap_upstream):
    d, p, uid = _tagged_pair(proxy, imap_upstream)
    full = fetch_item(p, uid, "BODY.PEEK[]")
    header = fetch_item(p, uid, "BODY.PEEK[HEADER]")
    assert full.startswith(header) and "[客户]".encode() not in header  # encoded-word, not raw UTF-8
    assert b"=?UTF-8?B?" in header
    hl, total = len(header), len(full)
    cases = [(0, 10), (5, 40), (hl - 10, 30), (hl - 1, 1), (hl, 100), (hl + 7, 50), (total - 20, 20),
             (total - 5, 100), (total, 10), (total + 1000, 393216), (0, total), (0, total + 5)]
    for o, n in cases:
        got = fetch_item(p, uid, f"BODY.PEEK[]<{o}.{n}>") if o < total else _partial_empty(p, uid, o, n)
        assert got == full[o : o + n], (o, n, hl, total)
    # header partials
    assert fetch_item(p, uid, "BODY.PEEK[HEADER]<3.20>") == header[3:23]
    assert fetch_size(p, uid) == total


def _partial_empty(p, uid, o, n):
    typ, data = p.uid("FETCH", str(uid), f"(BODY.PEEK[]<{o}.{n}>)")
    assert typ == "OK"
    part = data[0]
    if isinstance(part, tuple):
        return part[1]
    assert b'BODY[]<%d> ""' % o in part or b"BODY[]<%d> {0}" % o in part, part
    return b""


def test_ios_style_393216_byte_chunks(proxy, imap_upstream):
    d, p, uid = _tagged_pair(proxy, imap_upstream, body_size=1_000_000)
    full = fetch_item(p, uid, "BODY.PEEK[]")
    size = fetch_size(p, uid)
    assert size == len(full)
    chunks = []
    o = 0
    while True:
        if o >= size:
            assert _partial_empty(p, uid, o, 393216) == b""
            break
        chunks.append(fetch_item(p, uid, f"BODY.PEEK[]<{o}.393216>"))
        o += 393216
    assert b"".join(chunks) == full
    original = fetch_item(d, uid, "BODY.PEEK[]")
    assert len(full) - len(original) == len(fetch_item(p, uid, "BODY.PEEK[HEADER]")) - len(
        fetch_item(d, uid, "BODY.PEEK[HEADER]"))


def test_header_fields_rfc822_and_binary_agree(proxy, imap_upstream):
    d, p, uid = _tagged_pair(proxy, imap_upstream, sender="Buyer <buyer@buyer.test>")
    full = fetch_item(p, uid, "BODY.PEEK[]")
    fields = fetch_item(p, uid, "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]")
    assert display_names(fields, "From") == ["[客户] Buyer <buyer@buyer.test>"]
    from_line = [ln for ln in full.split(b"\r\n") if ln.startswith(b"From:")][0]
    assert from_line + b"\r\n" in fields
    assert fetch_item(p, uid, "RFC822.HEADER") == fetch_item(p, uid, "BODY.PEEK[HEADER]")
    assert fetch_item(p, uid, "BINARY.PEEK[]") == full
    typ, data = p.uid("FETCH", str(uid), "(BINARY.SIZE[] RFC822.SIZE)")
    assert b"BINARY.SIZE[] %d" % len(full) in data[0] and b"RFC822.SIZE %d" % len(full) in data[0]
    # BINARY[HEADER…] (outside RFC 3516's grammar, but Dovecot answers it) is the tagged header too,
    # under the name the client asked for.
    header = fetch_item(p, uid, "BODY.PEEK[HEADER]")
    for item, name, want in (("BINARY.PEEK[HEADER]", b"BINARY[HEADER] ", header),
                             ("BINARY.PEEK[HEADER.FIELDS (FROM SUBJECT)]", b"BINARY[HEADER.FIELDS (FROM SUBJECT)] ",
                              fields),
                             ("BINARY.PEEK[HEADER]<2.30>", b"BINARY[HEADER]<2> ", header[2:32])):
        typ, data = p.uid("FETCH", str(uid), f"({item})")
        assert typ == "OK" and name in data[0][0] and data[0][1] == want, (item, data)
    typ, data = p.uid("FETCH", str(uid), "(BINARY.SIZE[HEADER])")
    assert b"BINARY.SIZE[HEADER] %d" % len(header) in data[0], data
    # FETCH by sequence number gives the same bytes
    typ, data = p.search(None, "UID", str(uid))
    seq = data[0].split()[0].decode()
    typ, data = p.fetch(seq, "(BODY.PEEK[] RFC822.SIZE)")
    assert data[0][1] == full and b"RFC822.SIZE %d" % len(full) in data[0][0]


def test_envelope_with_tag_parsed_by_imapclient(proxy, imap_upstream):
    from imapclient import IMAPClient

    mid, raw = message("=?UTF-8?B?5byg5Lyf?= <zhang@china.test>", cc="Other <other@unknown.test>")
    imap_upstream.deliver("alice@acme.test", raw)
    mid2, raw2 = message("colleague-customer@bobcust.test")
    imap_upstream.deliver("alice@acme.test", raw2)
    with IMAPClient(proxy.host, proxy.starttls_port, ssl=False) as c:
        c.login("alice@acme.test", "alice-pw")
        c.select_folder("INBOX")
        uid = c.search(["HEADER", "Message-ID", mid])[0]
        uid2 = c.search(["HEADER", "Message-ID", mid2])[0]
        res = c.fetch([uid, uid2], ["ENVELOPE", "BODY.PEEK[HEADER]", "RFC822.SIZE", "BODY.PEEK[]"])
        env = res[uid][b"ENVELOPE"]
        name = env.from_[0].name.decode()
        assert str(make_header(decode_header(name))) == "[客户] 张伟"
        assert env.sender[0].name == env.from_[0].name  # sender defaults to From
        assert env.cc[0].name == b"Other"
        assert display_names(res[uid][b"BODY[HEADER]"], "From") == ["[客户] 张伟 <zhang@china.test>"]
        env2 = res[uid2][b"ENVELOPE"]
        assert str(make_header(decode_header(env2.from_[0].name.decode()))) == \
            "[同事客户] colleague-customer@bobcust.test"
        assert display_names(res[uid2][b"BODY[HEADER]"], "From") == [
            "[同事客户] colleague-customer@bobcust.test <colleague-customer@bobcust.test>"]
        for u in (uid, uid2):
            assert res[u][b"RFC822.SIZE"] == len(res[u][b"BODY[]"])


def test_non_employee_sees_nothing_tagged(proxy, imap_upstream):
    mid, raw = message('"Buyer" <buyer@buyer.test>', to="carol@acme.test")
    imap_upstream.deliver("carol@acme.test", raw)
    d, p = direct(imap_upstream, "carol@acme.test"), via(proxy, "carol@acme.test")
    uid = uid_of(d, mid)
    assert uid_of(p, mid) == uid
    assert fetch_item(p, uid, "BODY.PEEK[]") == fetch_item(d, uid, "BODY.PEEK[]")


def test_sent_folder_tags_recipients(proxy, imap_upstream):
    mid, raw = message("Alice <alice@acme.test>", to='"Buyer" <buyer@buyer.test>, x@unknown.test',
                       cc="zhang@china.test")
    d = direct(imap_upstream)
    d.append("Sent", "(\\Seen)", None, raw)
    p = via(proxy)
    uid = uid_of(p, mid, "Sent")
    header = fetch_item(p, uid, "BODY.PEEK[HEADER]")
    assert display_names(header, "From") == ["Alice <alice@acme.test>"]
    assert display_names(header, "To") == ["[客户] Buyer <buyer@buyer.test>, x@unknown.test"]
    assert display_names(header, "Cc") == ["[客户] zhang@china.test <zhang@china.test>"]
    assert fetch_size(p, uid) == len(fetch_item(p, uid, "BODY.PEEK[]"))


def test_one_address_twice_keeps_each_tagged_name_in_envelope_and_header(proxy, imap_upstream):
    """To: "A" <x>, "B" <x>: each ENVELOPE entry carries its own tagged name, as the header
    does (both entries used to get the first name)."""
    from imapclient import IMAPClient

    mid, raw = message("Alice <alice@acme.test>", to='"Buyer A" <buyer@buyer.test>, "Buyer B" <buyer@buyer.test>',
                       cc='"Buyer C" <buyer@buyer.test>')
    direct(imap_upstream).append("Sent", "(\\Seen)", None, raw)
    with IMAPClient(proxy.host, proxy.starttls_port, ssl=False) as c:
        c.login("alice@acme.test", "alice-pw")
        c.select_folder("Sent")
        uid = c.search(["HEADER", "Message-ID", mid])[0]
        res = c.fetch([uid], ["ENVELOPE", "BODY.PEEK[HEADER]"])[uid]
    env = res[b"ENVELOPE"]

    def names(addresses) -> list[str]:
        return [f"{make_header(decode_header(a.name.decode()))} <{a.mailbox.decode()}@{a.host.decode()}>"
                for a in addresses]

    assert names(env.to) == ["[客户] Buyer A <buyer@buyer.test>", "[客户] Buyer B <buyer@buyer.test>"]
    assert names(env.cc) == ["[客户] Buyer C <buyer@buyer.test>"]
    assert display_names(res[b"BODY[HEADER]"], "To") == [", ".join(names(env.to))]
    assert display_names(res[b"BODY[HEADER]"], "Cc") == names(env.cc)


def test_customer_created_later_does_not_change_served_sizes(proxy, imap_upstream, imap_db):
    from gateway.customers import create_customer
    from gateway.db import connect
    from gateway.db.models import Employee

    connect(imap_db, migrate=False)  # other test modules may have bound another database since

    mid, raw = message('"Late" <late@late-customer.test>')
    imap_upstream.deliver("alice@acme.test", raw)
    p = via(proxy)
    uid = uid_of(p, mid)
    size = fetch_size(p, uid)
    before = fetch_item(p, uid, "BODY.PEEK[]")
    assert len(before) == size and b"=?UTF-8?B?" not in before
    create_customer("Late Co", domains=["late-customer.test"], owners=[Employee.get(email="alice@acme.test")])
    mid2, raw2 = message('"Late" <late@late-customer.test>')
    imap_upstream.deliver("alice@acme.test", raw2)
    p2 = via(proxy)
    uid2 = uid_of(p2, mid2)
    assert b"=?UTF-8?B?" in fetch_item(p2, uid2, "BODY.PEEK[HEADER]")  # new mail: the new customer counts
    assert fetch_size(p2, uid) == size  # mail already served keeps its bytes
    assert fetch_item(p2, uid, "BODY.PEEK[]") == before


def test_whole_mailbox_fetch_mixes_tagged_and_untagged(proxy, imap_upstream):
    from imapclient import IMAPClient

    imap_upstream.deliver("alice@acme.test", message('"Buyer" <buyer@buyer.test>')[1])
    imap_upstream.deliver("alice@acme.test", message("plain@unknown.test")[1])
    with IMAPClient(proxy.host, proxy.starttls_port, ssl=False) as p, \
            IMAPClient(imap_upstream.host, imap_upstream.imaps_port, ssl_context=imap_upstream.ssl_context()) as d:
        p.login("alice@acme.test", "alice-pw")
        d.login("alice@acme.test", "alice-pw")
        n = p.select_folder("INBOX")[b"EXISTS"]
        d.select_folder("INBOX")
        items = ["UID", "RFC822.SIZE", "BODY.PEEK[]", "FLAGS"]
        p.use_uid = d.use_uid = False  # FETCH by sequence number: the proxy must learn the UIDs
        got = p.fetch(list(range(1, n + 1)), items)
        want = d.fetch(list(range(1, n + 1)), items)
        assert len(got) == n == len(want)
        tagged = 0
        for seq, r in got.items():
            assert r[b"UID"] == want[seq][b"UID"]
            assert r[b"RFC822.SIZE"] == len(r[b"BODY[]"])
            if r[b"BODY[]"] != want[seq][b"BODY[]"]:
                tagged += 1
                assert b"=?UTF-8?B?" in r[b"BODY[]"].split(b"\r\n\r\n")[0]
        assert 0 < tagged < n


def test_plaintext_upstream_on_loopback_serves_the_same_bytes(make_proxy, imap_upstream):
    """[upstream] imap_security = "none" (a trusted link): tagging and byte identity as with TLS."""
    px = make_proxy(upstream={"imap_port": imap_upstream.imap_port, "imap_security": "none"})
    mid, raw = message('"Someone" <someone@unknown.test>', body="z" * 70_000 + "\r\n")
    imap_upstream.deliver("alice@acme.test", raw)
    d, p = direct(imap_upstream), via(px)
    uid = uid_of(d, mid)
    assert uid_of(p, mid) == uid
    for item in ("BODY.PEEK[]", "BODY.PEEK[HEADER]", "BODY.PEEK[]<100.30000>"):
        assert fetch_item(p, uid, item) == fetch_item(d, uid, item)
    d2, p2, uid2 = _tagged_pair(px, imap_upstream)
    body = fetch_item(p2, uid2, "BODY.PEEK[]")
    assert fetch_size(p2, uid2) == len(body)
    assert display_names(body, "From") == ["[客户] Buyer <buyer@buyer.test>"]


def test_served_message_stored_back_is_tagged_once(proxy, imap_upstream):
    # A client saving a reply to Sent, or moving a message by FETCH + APPEND (mbsync moving
    # a file between local folders), stores the header as the proxy served it.
    mid, raw = message('"Buyer" <buyer@buyer.test>')
    imap_upstream.deliver("alice@acme.test", raw)
    p = via(proxy)
    served = fetch_item(p, uid_of(p, mid), "BODY.PEEK[]")
    assert display_names(served, "From") == ["[客户] Buyer <buyer@buyer.test>"]
    copy = served.replace(mid.encode(), b"<copy-" + mid[1:].encode())
    p.append("Trash", None, None, copy)
    uid = uid_of(p, "<copy-" + mid[1:], "Trash")
    assert fetch_item(p, uid, "BODY.PEEK[]") == copy
    # mutt's reply: the tag as one encoded-word, the rest of the name plain.
    reply_id, reply = message("Alice <alice@acme.test>", to="=?UTF-8?B?W+WuouaIt10=?= Buyer <buyer@buyer.test>")
    p.append("Sent", "(\\Seen)", None, reply)
    header = fetch_item(p, uid_of(p, reply_id, "Sent"), "BODY.PEEK[HEADER]")
    assert display_names(header, "To") == ["[客户] Buyer <buyer@buyer.test>"]


def test_items_answered_from_the_same_upstream_section_each_get_their_own_bytes(proxy, imap_upstream):
    """BODY[HEADER], BODY[HEADER]<o.n>, BODY[]<0.n> and BINARY[HEADER] are all served from
    BODY[HEADER] upstream; asked together, each must still be answered as asked."""
    d, p, uid = _tagged_pair(proxy, imap_upstream, sender="Buyer <buyer@buyer.test>")
    full = fetch_item(p, uid, "BODY.PEEK[]")
    header = fetch_item(p, uid, "BODY.PEEK[HEADER]")
    cases = (("BODY.PEEK[HEADER] BODY.PEEK[HEADER]<0.10>", {b"BODY[HEADER]": header, b"BODY[HEADER]<0>": header[:10]}),
             ("BODY.PEEK[]<0.20> BODY.PEEK[HEADER]", {b"BODY[]<0>": full[:20], b"BODY[HEADER]": header}),
             ("BODY.PEEK[HEADER] BINARY.PEEK[HEADER]", {b"BODY[HEADER]": header, b"BINARY[HEADER]": header}),
             # BODY[]<o> straddling the header's end is fetched as BODY[TEXT]; the client's own stays as it is.
             (f"BODY.PEEK[TEXT] BODY.PEEK[]<{len(header) - 5}>",
              {b"BODY[TEXT]": full[len(header):], b"BODY[]<%d>" % (len(header) - 5): full[len(header) - 5:]}))
    for items, want in cases:
        typ, data = p.uid("FETCH", str(uid), f"({items})")
        assert typ == "OK", data
        got = {}
        for part in data:
            if isinstance(part, tuple):
                name = part[0].rsplit(b" {", 1)[0].rsplit(b" ", 1)[-1]
                got[name] = part[1]
        assert got == want, (items, data)
