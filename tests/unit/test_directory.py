
import pytest

from gateway import customers, directory
from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.customers import DirectoryError
from gateway.directory import Directory


def make(db):
    d = Directory(["acme.test"], PUBLIC_MAIL_DOMAINS)
    d.load()
    return d


def test_lookup_order_and_relationships(db):
    alice = customers.create_employee("alice@acme.test", "Alice", aliases=["a.w@acme.test"])
    bob = customers.create_employee("bob@acme.test", "Bob")
    customers.create_customer("Hamburg", contacts=["buyer@hamburg.de"], domains=["hamburg.de"], owners=[alice])
    customers.create_customer("Lagos", contacts=["lagos@gmail.com"], owners=[bob], public_domains=PUBLIC_MAIL_DOMAINS)
    # An exact contact wins over another customer's domain.
    customers.create_customer("Agent", contacts=["agent@hamburg.de"], owners=[bob])
    customers.create_customer("Pool", domains=["pool.pe"])
    d = make(db)
    assert d.lookup("Someone@HAMBURG.de").customer.name == "Hamburg"
    assert d.lookup("someone@hamburg.de").matched_by == "domain"
    assert d.lookup("agent@hamburg.de").customer.name == "Agent"
    assert d.lookup("<lagos@gmail.com>").customer.name == "Lagos"
    assert d.lookup("other@gmail.com") is None  # public domain: exact address only
    assert d.relationship("x@hamburg.de", alice.id) == directory.OWN
    assert d.relationship("x@hamburg.de", bob.id) == directory.COLLEAGUE
    assert d.relationship("x@pool.pe", alice.id) == directory.PUBLIC_POOL
    assert d.relationship("bob@acme.test", alice.id) == directory.INTERNAL
    assert d.relationship("x@nowhere.example", alice.id) == directory.UNKNOWN
    assert d.employee_for_address("A.W@acme.test").id == alice.id
    assert d.addresses_of(alice.id) == {"alice@acme.test", "a.w@acme.test"}


def test_deactivated_employee_is_known_by_address_and_alias(db):
    alice = customers.create_employee("alice@acme.test", "Alice", aliases=["a.w@acme.test"])
    customers.create_employee("bob@acme.test", "Bob")
    d = make(db)
    assert not d.deactivated("alice@acme.test")
    customers.set_employee_active(alice, False)
    assert d.refresh() > 0
    assert d.deactivated("Alice@acme.test") and d.deactivated("a.w@acme.test")
    assert d.employee_for_address("alice@acme.test") is None
    assert not d.deactivated("bob@acme.test")
    assert not d.deactivated("relay@acme.test")  # not in the directory: not deactivated


def test_public_domain_refused_as_company_domain(db):
    with pytest.raises(DirectoryError, match="public mail domain"):
        customers.create_customer("Bad", domains=["qq.com"], public_domains=PUBLIC_MAIL_DOMAINS)


def test_refresh_follows_changes_from_another_writer(db):
    alice = customers.create_employee("alice@acme.test", "Alice")
    bob = customers.create_employee("bob@acme.test", "Bob")
    d = make(db)
    assert d.lookup("x@new.de") is None
    c = customers.create_customer("New", domains=["new.de"], owners=[alice])
    assert d.refresh() > 0
    assert d.relationship("x@new.de", bob.id) == directory.COLLEAGUE
    customers.set_owners(c, [bob])
    d.refresh()
    assert d.relationship("x@new.de", bob.id) == directory.OWN
    customers.delete_customer(c)
    d.refresh()
    assert d.lookup("x@new.de") is None
    assert d.refresh() == 0


def test_lookups_at_scale_are_in_memory(db, monkeypatch):
    """O(1) lookups: with 20k customers loaded, answering never touches the DB (dictionaries
    only); the speed itself is measured by scripts/bench_rules.py at 100k customers."""
    alice = customers.create_employee("alice@acme.test", "Alice")
    from peewee import chunked

    from gateway.db.models import CompanyDomain, Contact, Customer, Ownership, database

    def bulk(model, rows):
        for batch in chunked(rows, 5000):
            model.insert_many(batch).execute()

    with database.atomic():
        bulk(Customer, [{"name": f"C{i}", "pool": "owned"} for i in range(20_000)])
        ids = [i for (i,) in Customer.select(Customer.id).tuples()]
        bulk(Contact, [{"customer": c, "email": f"buyer{c}@c{c}.com"} for c in ids])
        bulk(CompanyDomain, [{"customer": c, "domain": f"c{c}.com"} for c in ids])
        bulk(Ownership, [{"customer": c, "employee": alice.id} for c in ids])
    d = make(db)
    assert len(d) == 20_000
    queries = []
    real_execute = database.execute_sql
    monkeypatch.setattr(database.obj, "execute_sql", lambda *a, **k: queries.append(a) or real_execute(*a, **k))
    answers = {d.relationship(f"x@c{i}.com", alice.id) for i in ids}
    assert answers == {directory.OWN}
    assert d.relationship("x@not-a-customer.com", alice.id) == directory.UNKNOWN
    assert queries == []
    assert Customer.select().count() == 20_000 and len(queries) == 1  # the counter does count
