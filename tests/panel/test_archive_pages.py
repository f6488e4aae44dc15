"""The auditor's archive pages over HTTP against the real panel process: role checks,
search (Chinese and fielded), message view, sandboxed HTML, downloads, exports as mbox
and zip, correspondence per customer, and the auditor's own trail in the operation log."""

from __future__ import annotations

import csv
import io
import uuid
import zipfile
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from gateway import customers
from gateway.archive import for_config
from gateway.archive.export import read_mbox
from gateway.config import load
from gateway.db.models import AuditLog
from tests.unit.archive.mailfactory import message

pytestmark = pytest.mark.integration

ROLES_DENIED = ("salesperson", "dept_head", "crm_admin", "it_admin")


@pytest.fixture(scope="module")
def archived(panel_server):
    """Three messages of a customer of this module (unique words so other tests' rows never match)."""
    from gateway.db import connect

    tag = uuid.uuid4().hex[:8]
    db = connect(panel_server.db_url, migrate=False)
    try:
        cust = customers.create_customer(f"汉堡贸易 {tag}", domains=[f"hh{tag}.de"])
        archive = for_config(load(panel_server.config_path))
        raws = [
            message(f"报价单{tag} LED灯具", f"您好，附件是最新报价{tag}，请查收。",
                    sender=("王小明", "alice@acme.test"), to=("Hans", f"hans@hh{tag}.de"), charset="gb2312",
                    attachments=(f"形式发票{tag}.pdf",),
                    html=f"<p>报价<b>{tag}</b></p><script>document.title='pwned'</script>"
                         "<img src='http://tracker.example/p.gif'>"),
            (f"From: Alice <alice@acme.test>\r\nTo: Hans <hans@hh{tag}.de>\r\nSubject: Quotation {tag}\r\n"
             f"Date: Mon, 23 Nov 2026 11:00:00 +0800\r\nMessage-ID: <q{tag}@acme.test>\r\n"
             f"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
             f"Dear Hans, the price list {tag}.\r\nFrom now on prices rise.\r\n").encode(),
            message(f"Re: Quotation {tag}", f"We order 500 pcs {tag}.", sender=("Hans", f"hans@hh{tag}.de"),
                    to=("Alice", "alice@acme.test")),
        ]
        # The second one as the gateway relays it: sender rewritten from the client's own address.
        submitted = raws[1].replace(b"From: Alice <alice@acme.test>", b"From: Alice <alice.home@acme.test>")
        recs = [archive.record(raw, direction="inbound" if i == 2 else "outbound", verdict="accepted",
                               subject=None, message_id=None, place="smtp:submitted",
                               original=archive.original_copy(submitted, raw) if i == 1 else None)
                for i, raw in enumerate(raws)]
        yield SimpleNamespace(tag=tag, customer=cust, raws=raws, ids=[r.id for r in recs], submitted=submitted)
    finally:
        db.close()


def _trail(db, action: str, since_id: int) -> list[AuditLog]:
    return list(AuditLog.select().where((AuditLog.action == action) & (AuditLog.id > since_id)
                                        & (AuditLog.actor == "local:auditor")).order_by(AuditLog.id))


def _last_id(db) -> int:
    row = AuditLog.select(AuditLog.id).order_by(AuditLog.id.desc()).first()
    return row.id if row else 0


@pytest.mark.parametrize("role", ROLES_DENIED)
def test_only_auditors_get_in(http_as, archived, role):
    client = http_as(role)
    rid = archived.ids[0]
    for path in ("/archive", f"/archive?q={archived.tag}", f"/archive/{rid}", f"/archive/{rid}/message.eml",
                 f"/archive/{archived.ids[1]}/submitted.eml",
                 f"/archive/{rid}/message.html", f"/archive/{rid}/attachments/0",
                 f"/archive/export?q={archived.tag}&format=zip", "/archive/customers",
                 f"/archive/customers/{archived.customer.id}"):
        assert client.get(path).status == 403, path


def test_signed_out_goes_to_login(anon_client, archived):
    resp = anon_client.get(f"/archive/{archived.ids[0]}/message.eml")
    assert resp.status == 303 and "/login?next=" in resp.header("location")


def test_search_chinese_fields_and_trail(http_as, archived, panel_db):
    client = http_as("auditor")
    tag = archived.tag
    before = _last_id(panel_db)
    page = client.get("/archive?q=" + quote(f"报价单{tag}"))
    assert page.status == 200
    assert f'data-record="{archived.ids[0]}"' in page.text and f'data-record="{archived.ids[1]}"' not in page.text
    page = client.get("/archive?q=" + quote(f"{tag} 报价"))  # two-character Chinese term
    assert f'data-record="{archived.ids[0]}"' in page.text and f'data-record="{archived.ids[2]}"' not in page.text
    page = client.get("/archive?q=" + quote(f"quotation {tag} direction:in"))
    assert f'data-record="{archived.ids[2]}"' in page.text and f'data-record="{archived.ids[1]}"' not in page.text
    page = client.get("/archive?q=" + quote(f"{tag} has:attachment"))
    assert [archived.ids[0]] == [i for i in archived.ids if f'data-record="{i}"' in page.text]
    bad = client.get("/archive?q=" + quote("colour:red"))
    assert bad.status == 200 and 'id="archive-error"' in bad.text and "unknown field" in bad.text
    trail = _trail(panel_db, "archive.search", before)
    queries = [row.details for row in trail]
    assert len(trail) == 5
    assert f"报价单{tag}" in queries[0] and '"results": 1' in queries[0]
    assert "unknown field" in queries[-1]


def test_message_view_sanitized_html_and_downloads(http_as, archived, panel_db):
    client = http_as("auditor")
    rid = archived.ids[0]
    before = _last_id(panel_db)
    view = client.get(f"/archive/{rid}")
    assert view.status == 200
    assert f"报价单{archived.tag}" in view.text and "王小明" in view.text  # GB2312 headers decoded
    assert f"形式发票{archived.tag}.pdf" in view.text and "smtp:submitted" in view.text
    assert 'sandbox=""' in view.text and f'src="/archive/{rid}/message.html"' in view.text
    assert "<script>document.title" not in view.text

    frame = client.get(f"/archive/{rid}/message.html")
    assert frame.status == 200 and "default-src 'none'" in frame.header("content-security-policy")
    assert f"<b>{archived.tag}</b>" in frame.text
    assert "<script" not in frame.text and "tracker.example" not in frame.text

    eml = client.get(f"/archive/{rid}/message.eml")
    assert eml.status == 200 and eml.header("content-disposition").startswith("attachment;")
    assert eml.header("content-type").startswith("message/rfc822")
    assert eml.text.encode("ascii") == archived.raws[0]  # the archived bytes, unchanged (MIME is 7-bit here)

    att = client.get(f"/archive/{rid}/attachments/0")
    assert att.status == 200 and att.text == "%PDF-1.4 binary"
    assert att.header("content-type") == "application/octet-stream"
    assert "filename*=UTF-8''" + quote(f"形式发票{archived.tag}.pdf") in att.header("content-disposition")
    assert client.get(f"/archive/{rid}/attachments/7").status == 404
    assert client.get("/archive/999999999").status == 404

    views = _trail(panel_db, "archive.view", before)
    assert [v.target for v in _trail(panel_db, "archive.view_html", before)] == [f"archive:{rid}"]  # the iframe
    downloads = _trail(panel_db, "archive.download", before)
    assert [v.target for v in views] == [f"archive:{rid}"]
    assert [(d.target, '"what": "eml"' in d.details) for d in downloads] == [(f"archive:{rid}", True),
                                                                            (f"archive:{rid}", False)]
    assert "attachment" in downloads[1].details


def test_html_part_read_directly_is_logged(http_as, archived, panel_db):
    """The iframe's URL is a read of its own: fetched without the message page, it still
    leaves an ``archive.view_html`` entry (auditor, record) — and no ``archive.view``."""
    client = http_as("auditor")
    rid = archived.ids[0]
    before = _last_id(panel_db)
    frame = client.get(f"/archive/{rid}/message.html")
    assert frame.status == 200 and f"<b>{archived.tag}</b>" in frame.text
    trail = _trail(panel_db, "archive.view_html", before)
    assert [(t.actor, t.target) for t in trail] == [("local:auditor", f"archive:{rid}")]
    assert trail[0].details and "sha256" in trail[0].details
    assert _trail(panel_db, "archive.view", before) == []
    assert client.get("/archive/999999999/message.html").status == 404
    assert _trail(panel_db, "archive.view_html", trail[0].id) == []


def test_submitted_original_of_changed_outbound_mail(http_as, archived, panel_db):
    client = http_as("auditor")
    rid = archived.ids[1]
    before = _last_id(panel_db)
    view = client.get(f"/archive/{rid}")
    assert view.status == 200 and 'id="download-submitted"' in view.text and "archive-original-note" in view.text
    sent = client.get(f"/archive/{rid}/message.eml")
    assert sent.text.encode("ascii") == archived.raws[1]
    original = client.get(f"/archive/{rid}/submitted.eml")
    assert original.status == 200 and original.header("content-type").startswith("message/rfc822")
    assert original.text.encode("ascii") == archived.submitted
    assert "submitted" in original.header("content-disposition")
    downloads = _trail(panel_db, "archive.download", before)
    assert [d.target for d in downloads] == [f"archive:{rid}"] * 2 and '"submitted-eml"' in downloads[1].details
    # A message the gateway did not change has no separate original.
    plain = archived.ids[0]
    assert 'id="download-submitted"' not in client.get(f"/archive/{plain}").text
    assert client.get(f"/archive/{plain}/submitted.eml").status == 404


def test_export_mbox_and_zip(http_as, archived, panel_db):
    client = http_as("auditor")
    before = _last_id(panel_db)
    mbox = client.get(f"/archive/export?q={archived.tag}&format=mbox")
    assert mbox.status == 200 and mbox.header("content-type").startswith("application/mbox")
    assert mbox.header("x-mailgate-exported") == "3"
    exported = read_mbox(mbox.text.encode("ascii"))
    originals = [r.replace(b"\r\n", b"\n") for r in reversed(archived.raws)]  # newest first
    assert exported == originals  # ">From now on" in a body survives the round trip

    # zip: read bytes through the raw socket-level client (text decoding would mangle them)
    import urllib.request

    req = urllib.request.Request(client.base_url + f"/archive/export?q={archived.tag}&format=zip")
    with client._plain.open(req, timeout=30) as resp:
        data = resp.read()
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = zf.namelist()
    assert len(names) == 5 and "index.csv" in names and "EXPORT-NOTES.txt" in names
    notes = zf.read("EXPORT-NOTES.txt").decode("utf-8-sig")
    assert "已导出 3 封，搜索共找到 3 封。" in notes and "导出完整" in notes  # the company's language: zh-CN
    rows = list(csv.DictReader(io.StringIO(zf.read("index.csv").decode("utf-8-sig"))))
    assert [int(r["record_id"]) for r in rows] == list(reversed(archived.ids))
    assert zf.read(rows[-1]["file"]) == archived.raws[0]
    assert client.get("/archive/export?q=x&format=pdf").status == 400

    exports = _trail(panel_db, "archive.export", before)
    assert len(exports) == 2 and '"format": "mbox"' in exports[0].details and '"messages": 3' in exports[1].details


def test_correspondence_per_customer(http_as, archived, panel_db):
    client = http_as("auditor")
    listing = client.get("/archive/customers?name=" + quote(archived.tag))
    assert f'data-customer="{archived.customer.id}"' in listing.text
    before = _last_id(panel_db)
    page = client.get(f"/archive/customers/{archived.customer.id}")
    assert page.status == 200 and "汉堡贸易" in page.text
    assert all(f'data-record="{i}"' in page.text for i in archived.ids)
    refined = client.get(f"/archive/customers/{archived.customer.id}?q=" + quote("direction:in"))
    assert [i for i in archived.ids if f'data-record="{i}"' in refined.text] == [archived.ids[2]]
    assert f'value="customer:{archived.customer.id} direction:in"' in refined.text  # the export keeps the scope
    trail = _trail(panel_db, "archive.search", before)
    assert [t.target for t in trail] == [f"customer:{archived.customer.id}"] * 2
    assert client.get("/archive/customers/999999999").status == 404


def test_mail_not_indexed_yet_is_announced_on_the_search_page(http_as, archived, panel_server, panel_db):
    """A record the background indexer has not reached (it waits out bursts of mail) is not
    found by a search; the page says how many are waiting instead of hiding them."""
    from gateway.archive import Archive
    from gateway.archive.indexer import index_pending

    client = http_as("auditor")
    archive = for_config(load(panel_server.config_path))
    node = Archive(archive.directory, archive.store.key_file, defer_index=True)  # as a node's SMTP path
    while index_pending(node):  # whatever other tests left unindexed
        pass
    assert 'id="archive-pending"' not in client.get("/archive").text
    node.record(message(f"Waiting {archived.tag}", f"not indexed yet {archived.tag}"), direction="outbound",
                verdict="accepted")
    page = client.get("/archive?q=" + quote(f"waiting {archived.tag}"))
    assert 'id="archive-pending"' in page.text and "有 1 封邮件暂时搜不到" in page.text
    assert "60 秒" in page.text and 'data-record="' not in page.text
    assert index_pending(node) == 1
    page = client.get("/archive?q=" + quote(f"waiting {archived.tag}"))
    assert 'id="archive-pending"' not in page.text and 'data-record="' in page.text


def test_mail_given_up_by_the_indexer_is_announced_apart(http_as, archived, panel_server, panel_db):
    """A record whose document the database refused for its data, given up by the indexer
    (``unread.FAILED``), will not show up by waiting: the page says so and what to do,
    instead of counting it among the mail still being indexed."""
    import datetime as dt

    from gateway.archive.indexer import index_pending
    from gateway.archive.unread import FAILED, UnreadRecord

    client = http_as("auditor")
    node = for_config(load(panel_server.config_path))
    while index_pending(node):  # whatever other tests left unindexed
        pass
    UnreadRecord.create(record_id=archived.ids[0], reason="index write failed: DataError: (test)",
                        retry_at=dt.datetime(2000, 1, 1), data_errors=4, state=FAILED)
    try:
        page = client.get("/archive?q=" + quote(archived.tag))
        assert 'id="archive-given-up"' in page.text and "有 1 封邮件因内容无法写入搜索索引" in page.text
        assert "mailgate archive reindex --failed" in page.text
        assert 'id="archive-pending"' not in page.text  # not "still being indexed"
    finally:
        UnreadRecord.delete().where(UnreadRecord.record_id == archived.ids[0]).execute()
    assert 'id="archive-given-up"' not in client.get("/archive").text


def _get_bytes(client, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET through the signed-in client without text decoding (zip bodies)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(client.base_url + path)
    try:
        with client._plain.open(req, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _notes(data: bytes) -> str:
    zf = zipfile.ZipFile(io.BytesIO(data))
    return zf.read("EXPORT-NOTES.txt").decode("utf-8-sig")


@pytest.fixture
def one_unreadable(panel_server, panel_db):
    """Two messages of their own tag; the blob of the newer one altered on disk."""
    tag = uuid.uuid4().hex[:8]
    archive = for_config(load(panel_server.config_path))
    recs = [archive.record(message(f"Broken {tag} {n}", f"body {tag} {n}"), direction="outbound",
                           verdict="accepted", place="smtp:submitted") for n in range(2)]
    path = archive.blob_path(recs[1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # the GCM tag no longer matches
    path.write_bytes(bytes(data))
    return SimpleNamespace(tag=tag, ids=[r.id for r in recs])


def test_export_names_unreadable_messages(http_as, one_unreadable, panel_db):
    """A message whose blob cannot be read is never left out silently: the zip's
    EXPORT-NOTES.txt names it with the reason; an mbox (no room for a note) is refused."""
    client = http_as("auditor")
    good, bad = one_unreadable.ids
    before = _last_id(panel_db)
    status, headers, data = _get_bytes(client, f"/archive/export?q={one_unreadable.tag}&format=zip&lang=en")
    assert status == 200 and headers["x-mailgate-exported"] == "1" and headers["x-mailgate-skipped"] == "1"
    notes = _notes(data)
    assert "1 of 2 messages exported." in notes and f"Query: {one_unreadable.tag}" in notes
    assert "These 1 message(s) could not be read" in notes and f"record {bad}: " in notes
    assert f"record {good}" not in notes and "Complete" not in notes

    mbox = client.get(f"/archive/export?q={one_unreadable.tag}&format=mbox&lang=zh-CN")
    assert mbox.status == 409 and f"#{bad}" in mbox.text and "无法读取" in mbox.text
    assert 'class="error-text"' in mbox.text and "无法按要求完成" in mbox.text  # the panel's own error page
    assert not mbox.header("content-disposition")
    exports = _trail(panel_db, "archive.export", before)
    assert len(exports) == 2 and f'"skipped": [{bad}]' in exports[0].details
    assert '"refused": "unreadable"' in exports[1].details


def test_message_view_of_an_unreadable_blob_says_why_and_the_rest_still_opens(http_as, one_unreadable, panel_db):
    """A damaged blob: the message page shows the record and the reason (no 500), downloads
    are refused with it, the auditor's trail notes the error; the other message opens."""
    client = http_as("auditor")
    good, bad = one_unreadable.ids
    before = _last_id(panel_db)
    view = client.get(f"/archive/{bad}?lang=en")
    assert view.status == 200 and 'id="archive-error"' in view.text
    assert "The archived content cannot be read: blob " in view.text and "does not decrypt" in view.text
    assert "smtp:submitted" in view.text  # the record's sightings still shown
    assert client.get(f"/archive/{bad}/message.html").status == 200  # the frame: empty, not an error page
    for path in (f"/archive/{bad}/message.eml", f"/archive/{bad}/attachments/0"):
        refused = client.get(path + "?lang=en")
        assert refused.status == 404 and "cannot be read" in refused.text and not refused.header("content-disposition")
    assert client.get(f"/archive/{good}/message.eml").status == 200
    views = _trail(panel_db, "archive.view", before)
    assert [v.target for v in views] == [f"archive:{bad}"] and '"error": "blob ' in views[0].details
    assert [d.target for d in _trail(panel_db, "archive.download", before)] == [f"archive:{good}"]


def test_export_over_the_cap_is_said(panel_server, panel_db, monkeypatch):
    """Over EXPORT_MAX (here 2, in the real app in this process): the search page says so
    beside the export buttons, a zip holds the newest 2 and says "2 of more than 2", an
    mbox is refused with what to do instead."""
    from panel.app import create_app
    from panel.areas import archive as area

    monkeypatch.setattr(area, "EXPORT_MAX", 2)
    app = create_app(load(panel_server.config_path))
    cookies = _wsgi_login(app)
    tag = uuid.uuid4().hex[:8]
    archive = for_config(load(panel_server.config_path))
    ids = [archive.record(message(f"Capped {tag} {n}", f"body {tag} {n}"), verdict="accepted",
                          direction="inbound" if n == 0 else "outbound", place="smtp:submitted").id for n in range(3)]
    status, _, page = _wsgi_get(app, f"/archive?q={tag}&lang=en", cookies)
    assert status == 200 and 'id="archive-export-over"' in page.decode()
    assert "more than 2 messages" in page.decode()
    status, _, page = _wsgi_get(app, "/archive?q=" + quote(f"{tag} direction:in") + "&lang=en", cookies)
    assert 'id="archive-export-over"' not in page.decode() and "At most 2 messages per export" in page.decode()
    monkeypatch.setattr(area, "PER_PAGE", 1)  # more pages: not counted (a search of its own); the cap is shown
    for n, over in ((1, False), (2, True), (3, True)):  # said once the pages shown reach the cap
        _, _, page = _wsgi_get(app, f"/archive?q={tag}&page={n}&lang=en", cookies)
        assert ('id="archive-export-over"' in page.decode()) is over, n
        assert over or "At most 2 messages per export" in page.decode()

    status, headers, data = _wsgi_get(app, f"/archive/export?q={tag}&format=zip&lang=en", cookies)
    assert status == 200 and headers["x-mailgate-truncated"] == "yes" and headers["x-mailgate-exported"] == "2"
    notes = _notes(data)
    assert "2 of more than 2 messages exported." in notes and "at most 2 messages" in notes
    assert "mailgate archive export --limit (up to 100000)" in notes
    rows = list(csv.DictReader(io.StringIO(zipfile.ZipFile(io.BytesIO(data)).read("index.csv").decode("utf-8-sig"))))
    assert [int(r["record_id"]) for r in rows] == [ids[2], ids[1]]  # the newest

    before = _last_id(panel_db)
    status, headers, body = _wsgi_get(app, f"/archive/export?q={tag}&format=mbox&lang=en", cookies)
    assert status == 409 and "content-disposition" not in headers
    assert "more than 2 messages" in body.decode() and "narrow the query" in body.decode().lower()
    refused = _trail(panel_db, "archive.export", before)
    assert len(refused) == 1 and '"refused": "over cap"' in refused[0].details


def _wsgi_get(app, path: str, cookies: dict[str, str]) -> tuple[int, dict[str, str], bytes]:  # noqa: ANN001
    return _wsgi(app, "GET", path, cookies=cookies)


def _wsgi(app, method: str, path: str, form: dict | None = None,  # noqa: ANN001
          cookies: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request straight into the WSGI app; Set-Cookie values merged into ``cookies``."""
    import urllib.parse
    from wsgiref.util import setup_testing_defaults

    path, _, query = path.partition("?")
    body = urllib.parse.urlencode(form or {}).encode()
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                    "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
                    "CONTENT_TYPE": "application/x-www-form-urlencoded", "REMOTE_ADDR": "127.0.0.1",
                    "HTTP_COOKIE": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())})
    result: dict = {}

    def start_response(status, headers, exc_info=None):  # noqa: ANN001, ANN202
        result["status"], result["headers"] = status, headers

    data = b"".join(app(environ, start_response))
    if cookies is not None:
        for k, v in result["headers"]:
            if k.lower() == "set-cookie":
                name, _, rest = v.partition("=")
                cookies[name] = rest.split(";")[0]
    return int(result["status"].split()[0]), {k.lower(): v for k, v in result["headers"]}, data


def _wsgi_login(app) -> dict[str, str]:  # noqa: ANN001
    import re

    from tests.panel.conftest import ACCOUNTS

    cookies: dict[str, str] = {}
    _, _, page = _wsgi(app, "GET", "/login", cookies=cookies)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.decode()).group(1)
    status, _, _ = _wsgi(app, "POST", "/login", {"login": "auditor", "password": ACCOUNTS["auditor"][1],
                                                "csrf_token": token}, cookies)
    assert status == 303 and "mg_session" in cookies
    return cookies
