"""The panel's areas, in navigation order.  Each ``panel/areas/<name>.py`` has
``routes(app)`` and optionally ``NAV = [(path, label_key, roles), ...]``; a module
that does not exist (yet) is skipped.  See panel/README.md, "Adding an area"."""

AREAS = ("employees", "customers", "pool", "approvals", "rules", "oplog", "dashboard", "archive", "distribution")
