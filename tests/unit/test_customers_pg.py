"""The customer writes, list query and pool sweep on the real PostgreSQL fixture (same cases as SQLite)."""

from __future__ import annotations

import pytest

from tests.harness.pgdb import pg_db
from tests.unit import test_customers as sqlite_cases
from tests.unit import test_pool as pool_cases

pytestmark = pytest.mark.integration


db = pg_db("t_cust_")


team = sqlite_cases.team
people = pool_cases.people

test_public_domain_and_taken_addresses = sqlite_cases.test_public_domain_and_taken_addresses
test_owners_transfer_handover_release_claim = sqlite_cases.test_owners_transfer_handover_release_claim
test_list_query_scope_search_filters = sqlite_cases.test_list_query_scope_search_filters
test_days_without_contact = pool_cases.test_days_without_contact
test_days_after_assignment = pool_cases.test_days_after_assignment


def test_search_uses_trigram_index_and_follows_writes(team, db) -> None:
    from gateway.config import PUBLIC_MAIL_DOMAINS as P
    from gateway.customers import delete_customer, new_customer, update_customer
    from gateway.db.models import Customer
    from panel.customer_query import CustomerFilter, Scope, page

    ann = team[0]
    row = db.execute_sql("SELECT indexdef FROM pg_indexes WHERE indexname = 'customer_search_trgm'").fetchone()
    assert row is not None and "gin_trgm_ops" in row[0]

    def names(q: str) -> list[str]:
        return [r.name for r in page(Scope(None), CustomerFilter(q=q, pool="all")).rows]

    c = new_customer("Shenzhen 深圳机械 Tools", contacts=["old@sz-tools.example"], owners=[ann], public_domains=P)
    assert names("old@sz-tools") == ["Shenzhen 深圳机械 Tools"] and names("机械") == ["Shenzhen 深圳机械 Tools"]
    assert names("50%") == []
    update_customer(c, contacts=["new@sz-tools.example"], public_domains=P)
    assert names("old@sz") == [] and names("NEW@sz") == ["Shenzhen 深圳机械 Tools"]
    delete_customer(Customer.get_by_id(c.id))
    assert names("new@sz") == []
