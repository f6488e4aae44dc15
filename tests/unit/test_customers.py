"""Validated customer writes (gateway/customers.py) and the list query (panel/customer_query.py)."""

from __future__ import annotations

import pytest

from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.customers import (
    CustomerError,
    add_owner,
    claim,
    create_department,
    create_employee,
    handover,
    new_customer,
    normalize_domain,
    normalize_email,
    parse_tags,
    release,
    transfer,
    update_customer,
)
from gateway.db.models import Customer, DirectoryChange
from panel.customer_query import CustomerFilter, Scope, is_visible, page

P = PUBLIC_MAIL_DOMAINS


@pytest.fixture
def team(db):
    dept = create_department("Sales")
    return [create_employee(f"{n}@acme.test", n.title(), dept) for n in ("ann", "ben", "cat")]


def test_normalizers() -> None:
    assert normalize_email(" <Anna@Example.COM> ") == "anna@example.com"
    assert normalize_domain("https://Www.Example.com/path") == "www.example.com"
    assert normalize_domain("@bücher.de") == "xn--bcher-kva.de"
    for bad in ("nope", "a@b", "a b@c.de", "@c.de"):
        with pytest.raises(CustomerError):
            normalize_email(bad)
    for bad in ("localhost", "-x.com", "1.2.3.4", "a..b.com"):
        with pytest.raises(CustomerError):
            normalize_domain(bad)
    assert parse_tags("vip，vip, a  b ,") == "vip,a b"
    with pytest.raises(CustomerError):
        parse_tags(",".join(str(i) for i in range(30)))


def test_public_domain_and_taken_addresses(team) -> None:
    ann, ben, _ = team
    with pytest.raises(CustomerError) as exc:
        new_customer("G", domains=["Gmail.com"], public_domains=P)
    assert exc.value.code == "public_domain" and exc.value.params == {"domain": "gmail.com"}
    a = new_customer("A", contacts=[("x@a.example", "X")], domains=["a.example"], owners=[ann], public_domains=P)
    with pytest.raises(CustomerError) as exc:
        new_customer("B", contacts=["X@A.example"], public_domains=P)
    assert exc.value.code == "contact_taken"
    with pytest.raises(CustomerError) as exc:
        new_customer("B", domains=["a.example"], public_domains=P)
    assert exc.value.code == "domain_taken"
    # replacing lists keeps the directory feed and the search column in step
    before = DirectoryChange.select().count()
    update_customer(a, contacts=[("y@a.example", "Y")], domains=["a2.example"], public_domains=P, tags="vip")
    row = Customer.get_by_id(a.id)
    assert [c.email for c in row.contacts] == ["y@a.example"] and [d.domain for d in row.domains] == ["a2.example"]
    assert "y@a.example" in row.search_text and "a2.example" in row.search_text and "x@a.example" not in row.search_text
    assert DirectoryChange.select().count() > before


def test_owners_transfer_handover_release_claim(team) -> None:
    ann, ben, cat = team
    c = new_customer("C", owners=[ann], public_domains=P)
    assert add_owner(c, ben) and not add_owner(c, ben)
    assert transfer(c, cat) == {ann.id, ben.id}
    d = new_customer("D", owners=[cat, ann], public_domains=P)
    assert sorted(handover(cat, ann)) == sorted([c.id, d.id])
    assert {o.employee_id for o in Customer.get_by_id(d.id).ownerships} == {ann.id}
    with pytest.raises(CustomerError):
        handover(ann, ann)
    release(Customer.get_by_id(c.id), "test")
    c = Customer.get_by_id(c.id)
    assert c.pool == "public" and c.pool_reason == "test" and not list(c.ownerships)
    claim(c, ben)
    with pytest.raises(CustomerError) as exc:
        claim(c, cat)  # the second claim loses
    assert exc.value.code == "not_public"
    assert [o.employee_id for o in Customer.get_by_id(c.id).ownerships] == [ben.id]


def test_list_query_scope_search_filters(team) -> None:
    ann, ben, _ = team
    mine = new_customer("Osaka Parts", contacts=["buyer@osaka.example"], owners=[ann], public_domains=P,
                        tags="vip,oem", country="JP", stage="quoted")
    other = new_customer("Lima Parts", contacts=["compras@lima.example"], owners=[ben], public_domains=P)
    public = new_customer("Pool Parts 50%_off", public_domains=P)
    scope = Scope(frozenset({ann.id}))
    names = [r.name for r in page(scope, CustomerFilter(pool="all")).rows]
    assert sorted(names) == ["Osaka Parts", "Pool Parts 50%_off"]
    assert not is_visible(scope, other.id) and is_visible(scope, public.id) and is_visible(scope, mine.id)
    admin = Scope(None)
    assert [r.name for r in page(admin, CustomerFilter(q="COMPRAS@lima")).rows] == ["Lima Parts"]
    assert [r.name for r in page(admin, CustomerFilter(q="50%_", pool="all")).rows] == ["Pool Parts 50%_off"]
    assert page(admin, CustomerFilter(q="5_%", pool="all")).rows == []  # wildcards are literal
    assert [r.name for r in page(admin, CustomerFilter(tag="oem")).rows] == ["Osaka Parts"]
    assert page(admin, CustomerFilter(tag="oe")).rows == []  # whole tags only
    assert [r.name for r in page(admin, CustomerFilter(country="JP", stage="quoted")).rows] == ["Osaka Parts"]
    assert [r.name for r in page(admin, CustomerFilter(owner=ben.id)).rows] == ["Lima Parts"]
    rows = page(admin, CustomerFilter(sort="name", desc=False)).rows
    assert [r.name for r in rows] == ["Lima Parts", "Osaka Parts"]
    assert rows[1].owners == [(ann.id, "Ann")] and rows[1].contacts == [("buyer@osaka.example", "")]
    small = page(admin, CustomerFilter(pool="all"), page_size=2)
    assert small.total == 3 and small.has_next and len(small.rows) == 2
    f = CustomerFilter.from_params({"q": " x ", "owner": "abc", "page": "-3", "sort": "evil", "pool": "weird"})
    assert (f.q, f.owner, f.page, f.sort, f.pool) == ("x", None, 1, "updated", "owned")


def test_directory_follows_panel_writes(team, directory) -> None:
    """Every write the panel makes reaches a running gateway's directory on its next refresh."""
    ann, ben, _ = team
    c = new_customer("Dir", contacts=["buyer@dir.example"], owners=[ann], public_domains=P)
    directory.refresh()
    assert directory.relationship("buyer@dir.example", ann.id) == "own_customer"
    assert directory.relationship("buyer@dir.example", ben.id) == "colleague_customer"
    transfer(c, ben)
    directory.refresh()
    assert directory.relationship("buyer@dir.example", ben.id) == "own_customer"
    update_customer(Customer.get_by_id(c.id), domains=["dir.example"], public_domains=P)
    directory.refresh()
    assert directory.relationship("other@dir.example", ben.id) == "own_customer"  # by company domain now
    release(Customer.get_by_id(c.id), "test")
    directory.refresh()
    assert directory.relationship("buyer@dir.example", ben.id) == "public_pool_customer"


def test_search_index_follows_writes(team, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.customers import delete_customer
    from gateway.db.models import database
    from panel import customer_query

    ann, _, _ = team
    assert database.table_exists("customer_fts")  # migration 352 on SQLite

    def names(q: str) -> list[str]:
        return [r.name for r in page(Scope(None), CustomerFilter(q=q, pool="all")).rows]

    c = new_customer("Shenzhen 深圳机械 Tools", contacts=["old@sz-tools.example"], owners=[ann], public_domains=P)
    new_customer("Other Tools", owners=[ann], public_domains=P)
    assert names("old@sz-tools") == ["Shenzhen 深圳机械 Tools"]
    assert names("机械") == ["Shenzhen 深圳机械 Tools"]  # 2 characters: no trigram, a scan
    update_customer(c, contacts=["new@sz-tools.example"], public_domains=P)
    assert names("old@sz-tools") == [] and names("NEW@sz") == ["Shenzhen 深圳机械 Tools"]
    monkeypatch.setattr(customer_query, "MANY_HITS", 1)  # the "many hits" plan gives the same answer
    assert sorted(names("tools")) == ["Other Tools", "Shenzhen 深圳机械 Tools"]
    delete_customer(Customer.get_by_id(c.id))
    assert names("new@sz-tools") == [] and names("tools") == ["Other Tools"]
