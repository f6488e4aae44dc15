"""The data model (docs/ARCHITECTURE.md §5), one peewee model per table.

All models bind to ``database``, a proxy that ``gateway.db.connect`` points at
SQLite (WAL) or PostgreSQL.  Schema changes go through ``gateway.db.migrations``;
never call ``create_tables`` elsewhere.
"""

from __future__ import annotations

import datetime as dt

from peewee import (
    BigIntegerField,
    BlobField,
    BooleanField,
    CharField,
    DatabaseProxy,
    DateTimeField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

database = DatabaseProxy()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        database = database


class SchemaVersion(BaseModel):
    version = IntegerField(primary_key=True)
    applied_at = DateTimeField(default=utcnow)


class Department(BaseModel):
    name = CharField(max_length=200)
    parent = ForeignKeyField("self", null=True, backref="children", on_delete="SET NULL")
    # Department head: set after employees exist; kept as a plain id to avoid a cycle.
    head_id = IntegerField(null=True)


class Employee(BaseModel):
    email = CharField(max_length=320, unique=True)
    name = CharField(max_length=200)
    department = ForeignKeyField(Department, null=True, backref="employees", on_delete="SET NULL")
    # Comma-separated role names: salesperson, dept_head, crm_admin, auditor, it_admin.
    roles = CharField(max_length=200, default="salesperson")
    manager = ForeignKeyField("self", null=True, backref="reports", on_delete="SET NULL")
    active = BooleanField(default=True)
    created_at = DateTimeField(default=utcnow)

    @property
    def role_set(self) -> set[str]:
        return {r.strip() for r in self.roles.split(",") if r.strip()}


class Alias(BaseModel):
    """An extra address an employee may send as (MAIL FROM / From)."""

    employee = ForeignKeyField(Employee, backref="aliases", on_delete="CASCADE")
    address = CharField(max_length=320, unique=True)


class Customer(BaseModel):
    name = CharField(max_length=300, index=True)
    stage = CharField(max_length=50, default="lead", index=True)
    tags = CharField(max_length=500, default="")  # comma-separated
    country = CharField(max_length=100, default="", index=True)
    region = CharField(max_length=100, default="")
    source = CharField(max_length=100, default="")
    # "owned" or "public" (公海).
    pool = CharField(max_length=20, default="owned", index=True)
    last_contact_at = DateTimeField(null=True, index=True)
    assigned_at = DateTimeField(null=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    # -- added by panel.customer_schema (migration 350) --
    notes = TextField(default="")
    # Lowercased name, contact addresses and names, domains and tags: what the list searches.
    search_text = TextField(default="")
    # When and why the customer last went to the public pool (公海).
    pool_since = DateTimeField(null=True)
    pool_reason = CharField(max_length=200, default="")


class Contact(BaseModel):
    customer = ForeignKeyField(Customer, backref="contacts", on_delete="CASCADE")
    email = CharField(max_length=320, unique=True)
    name = CharField(max_length=200, default="")


class CompanyDomain(BaseModel):
    customer = ForeignKeyField(Customer, backref="domains", on_delete="CASCADE")
    domain = CharField(max_length=253, unique=True)


class Ownership(BaseModel):
    customer = ForeignKeyField(Customer, backref="ownerships", on_delete="CASCADE")
    employee = ForeignKeyField(Employee, backref="ownerships", on_delete="CASCADE")
    since = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("customer", "employee"), True),)


class DirectoryChange(BaseModel):
    """Append-only change feed: every node's directory replays it to stay in step."""

    customer_id = IntegerField(null=True)  # None: reload everything (e.g. employee change)
    at = DateTimeField(default=utcnow)


class OutboundMessage(BaseModel):
    """The durable outbound queue.  The spooled file is the message; this row is its state."""

    queue_id = CharField(max_length=32, unique=True)
    created_at = DateTimeField(default=utcnow)
    employee = ForeignKeyField(Employee, null=True, backref="outbound", on_delete="SET NULL")
    mail_from = CharField(max_length=320)
    recipients = TextField()  # JSON list of addresses still to deliver
    spool_path = CharField(max_length=1000)
    size = BigIntegerField()
    message_id = CharField(max_length=998, default="", index=True)
    # queued -> (claimed) -> sent | bounced ; held while waiting for approval.
    state = CharField(max_length=20, default="queued")  # indexed with next_attempt_at (migration 3)
    attempts = IntegerField(default=0)
    next_attempt_at = DateTimeField(default=utcnow, index=True)
    last_error = TextField(default="")
    claimed_by = CharField(max_length=100, null=True)
    claimed_until = DateTimeField(null=True)
    # Employee credentials for relay.mode = employee_credentials, AES-GCM encrypted;
    # erased once the message is delivered or bounced.
    credentials = BlobField(null=True)
    is_bounce = BooleanField(default=False)
    done_at = DateTimeField(null=True)
    # The node whose spool holds the file ("" = a spool shared by all nodes).
    node = CharField(max_length=100, default="", index=True)

    class Meta:
        indexes = ((("state", "next_attempt_at"), False),)


class ArchiveRecord(BaseModel):
    """One archived message (raw bytes in a blob file named by its SHA-256)."""

    created_at = DateTimeField(default=utcnow, index=True)
    direction = CharField(max_length=10)  # outbound | inbound
    sha256 = CharField(max_length=64)  # unique index: archiverecord_sha256_unique (migration 100)
    blob_path = CharField(max_length=1000)
    size = BigIntegerField()
    mail_from = CharField(max_length=320, default="")
    recipients = TextField(default="[]")
    subject = TextField(default="")
    message_id = CharField(max_length=998, default="")
    employee = ForeignKeyField(Employee, null=True, backref="archived", on_delete="SET NULL")
    verdict = CharField(max_length=20)  # accepted | refused | held
    reason = TextField(default="")
    trace = TextField(default="[]")  # JSON list of decision steps
    queue_id = CharField(max_length=32, default="")
    # -- archive area (gateway/archive/schema.py, migration 100): one record per content
    # hash; the fields above describe its first sighting (ArchiveSighting lists them all).
    key_id = IntegerField(default=0)  # archive key that encrypted the blob (0: legacy plaintext)
    stored_size = BigIntegerField(default=0)  # blob file size (compressed + encrypted)
    seq = BigIntegerField(null=True, unique=True)  # position in the archive hash chain
    digest = CharField(max_length=64, default="")  # SHA-256 of the chained fields
    prev_hash = CharField(max_length=64, default="")
    hash = CharField(max_length=64, default="")
    purged_at = DateTimeField(null=True)  # retention purge: blob deleted, fields blanked
    # Outbound mail the gateway changed (sender rewrite, tags, DKIM): the client's bytes as
    # submitted, beside the blob's relayed bytes (migration 154).  ``original`` is sealed like a
    # blob (gateway/archive/original.py): usually only the header section, the body being the
    # relayed one's.  "" / None: the blob is what was submitted.
    original_sha256 = CharField(max_length=64, default="")
    original = BlobField(null=True)


class AuditLog(BaseModel):
    """Who did what, when.  Append-only; each row hashes the previous one."""

    at = DateTimeField(default=utcnow)
    actor = CharField(max_length=320)
    action = CharField(max_length=100)
    target = CharField(max_length=500, default="")
    details = TextField(default="")
    prev_hash = CharField(max_length=64)
    hash = CharField(max_length=64)


class TagDecision(BaseModel):
    """IMAP tag decisions, fixed per (account, mailbox, UIDVALIDITY, UID) once served."""

    account = CharField(max_length=320)
    mailbox = CharField(max_length=1000)
    uidvalidity = BigIntegerField()
    uid = BigIntegerField()
    decision = TextField()  # JSON: {header: [tag, ...]} or {} for "nothing to tag"
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("account", "mailbox", "uidvalidity", "uid"), True),)


ALL_MODELS_V1 = [
    SchemaVersion,
    Department,
    Employee,
    Alias,
    Customer,
    Contact,
    CompanyDomain,
    Ownership,
    DirectoryChange,
    OutboundMessage,
    ArchiveRecord,
    AuditLog,
    TagDecision,
]


# -- version 2: rule files, approval, sender rewriting (issue 4) --------------------------


class SentMessage(BaseModel):
    """Outgoing Message-ID -> employee, recorded when the sender is rewritten to the
    company address, so replies to that address can be routed back."""

    message_id = CharField(max_length=998, unique=True)
    employee = ForeignKeyField(Employee, null=True, backref="sent_messages", on_delete="SET NULL")
    company_address = CharField(max_length=320, default="")
    created_at = DateTimeField(default=utcnow, index=True)


class ContactedDomain(BaseModel):
    """External domains (on public mail domains: exact addresses) written to before,
    for the `first-contact` rule condition."""

    key = CharField(max_length=320, unique=True)
    first_employee = IntegerField(null=True)
    first_at = DateTimeField(default=utcnow)


class Approval(BaseModel):
    """A held message (审核): pending -> approved | rejected(reason) | expired."""

    queue_id = CharField(max_length=32, unique=True)
    employee = ForeignKeyField(Employee, null=True, backref="approvals", on_delete="SET NULL")
    mail_from = CharField(max_length=320)
    recipients = TextField(default="[]")  # JSON list
    subject = TextField(default="")
    size = BigIntegerField(default=0)
    rule = CharField(max_length=100, default="")
    reason = TextField(default="")  # why it was held
    approvers = TextField(default="[]")  # JSON list of resolved approver addresses
    original_path = CharField(max_length=1000, default="")  # bytes before mutations
    state = CharField(max_length=20, default="pending", index=True)
    requested_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(index=True)
    decided_at = DateTimeField(null=True)
    decided_by = CharField(max_length=320, default="")
    decision_reason = TextField(default="")


class UsedApprovalToken(BaseModel):
    """Nonces of approve/reject link tokens already used (single use)."""

    nonce = CharField(max_length=64, unique=True)
    used_at = DateTimeField(default=utcnow)


ALL_MODELS_V2 = [SentMessage, ContactedDomain, Approval, UsedApprovalToken]


# -- version 5: failed logins shared by every process and node (gateway/loginfail.py) ------


class LoginFailure(BaseModel):
    """One failed login for one key ("ip:…" or "user:…"): SMTP AUTH, IMAP LOGIN/AUTHENTICATE,
    the panel's sign-in.  Rows older than the longest window are deleted, and the table is
    capped (``loginfail.MAX_ROWS``, oldest first)."""

    key = CharField(max_length=400)
    at = DoubleField()  # seconds since the epoch (wall clock: shared between nodes)
    tag = CharField(max_length=64)  # "<process token>:<n>": who wrote it, and which one
    # version 6: a keyed digest, 32 bits hex (gateway/loginfail.py ``marks``): for a user's row
    # of the user name and password tried, for an IP's row of the user name; NULL for none
    mark = CharField(max_length=16, null=True)

    class Meta:
        indexes = ((("key", "at"), False), (("at",), False))
