"""The web panel (bottle, server-rendered): customers, pool, approvals, rules, archive."""
