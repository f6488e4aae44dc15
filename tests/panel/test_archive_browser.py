"""The auditor in Chromium: search (Chinese) → open the message → HTML in the sandbox
(no script ran, no remote image) → download the .eml and an attachment."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.db.models import AuditLog
from tests.panel.test_archive_pages import archived  # noqa: F401 - the module's archived messages

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_search_view_download(page_as, archived, panel_db, tmp_path):  # noqa: F811
    page = page_as("auditor")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.click("nav a[href='/archive']")
    page.fill("#archive-q", f"报价单{archived.tag}")
    page.click("#archive-search button[type=submit]")
    page.wait_for_selector("#archive-results")
    rows = page.locator("#archive-results tbody tr")
    assert rows.count() == 1
    assert rows.first.get_attribute("data-record") == str(archived.ids[0])

    rows.first.locator("a.open").click()
    page.wait_for_selector("#archive-headers")
    assert "王小明" in page.inner_text("#archive-headers")
    frame = page.frame_locator("#archive-html")
    assert frame.locator("b").inner_text() == archived.tag
    inner = next(f for f in page.frames if f.url.endswith(f"/archive/{archived.ids[0]}/message.html"))
    assert inner.title() != "pwned" and "<script" not in inner.content()
    assert not [u for u in requests if "tracker.example" in u]

    with page.expect_download() as info:
        page.click("#download-eml")
    eml = Path(info.value.path()).read_bytes()
    assert eml == archived.raws[0]
    with page.expect_download() as info:
        page.click("#archive-attachments a")
    assert info.value.suggested_filename == f"形式发票{archived.tag}.pdf"
    assert Path(info.value.path()).read_bytes() == b"%PDF-1.4 binary"

    trail = list(AuditLog.select().where((AuditLog.actor == "local:auditor")
                                         & (AuditLog.target == f"archive:{archived.ids[0]}"))
                 .order_by(AuditLog.id))
    # the page, its sandboxed HTML part (the iframe's own request), the .eml, the attachment
    assert [row.action for row in trail][-4:] == ["archive.view", "archive.view_html", "archive.download",
                                                  "archive.download"]
