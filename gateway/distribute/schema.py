"""Tables of the distribution area (migrations 200-299).

* ``distcheckpoint``  — per (shared mailbox, folder): UIDVALIDITY and the highest UID handled;
* ``distribution``    — one row per shared message, unique (mailbox, folder, uidvalidity, uid):
  the routing decision (step, reason) and its state; this row is the idempotency key;
* ``distdelivery``    — one row per employee copy (forward queue id or APPEND), unique
  (distribution, employee);
* ``distmapping``     — "always send this address/domain to this employee";
* ``distreject``      — the reject list (拒收): addresses and domains moved to Junk;
* ``distroundrobin``  — the next member of each round-robin group.
"""

from __future__ import annotations

from peewee import BigIntegerField, CharField, Database, DateTimeField, ForeignKeyField, IntegerField, TextField

from gateway.db.migrations import migration
from gateway.db.models import BaseModel, Employee, utcnow

# Distribution.state values.
DISTRIBUTED = "distributed"
UNDISTRIBUTED = "undistributed"
REJECTED = "rejected"
STATES = (DISTRIBUTED, UNDISTRIBUTED, REJECTED)

# DistDelivery.state values.
QUEUED = "queued"  # forward: in the relay queue
PENDING = "pending"  # append: recorded, not yet known to be appended
APPENDED = "appended"


class DistCheckpoint(BaseModel):
    mailbox = CharField(max_length=320)
    folder = CharField(max_length=300)
    uidvalidity = BigIntegerField()
    last_uid = BigIntegerField(default=0)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "distcheckpoint"
        indexes = ((("mailbox", "folder"), True),)


class Distribution(BaseModel):
    mailbox = CharField(max_length=320)
    folder = CharField(max_length=300)
    uidvalidity = BigIntegerField()
    uid = BigIntegerField()
    # Random, unique: names this message's copies (X-Mailgate-Distribution-Id) across installations.
    token = CharField(max_length=32, unique=True)
    message_id = CharField(max_length=998, default="", index=True)
    from_addr = CharField(max_length=320, default="", index=True)
    from_name = CharField(max_length=300, default="")
    subject = TextField(default="")
    size = BigIntegerField(default=0)
    preview = TextField(default="")  # a bounded plain-text excerpt for the panel
    state = CharField(max_length=20, index=True)
    step = CharField(max_length=20, default="")  # reply | customer | mapping | rule | reject | none | manual
    reason = TextField(default="")
    actor = CharField(max_length=320, default="")  # "worker" or the manager who dispatched
    created_at = DateTimeField(default=utcnow, index=True)
    decided_at = DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = "distribution"
        indexes = ((("mailbox", "folder", "uidvalidity", "uid"), True),)


class DistDelivery(BaseModel):
    distribution = ForeignKeyField(Distribution, backref="deliveries", on_delete="CASCADE")
    employee = ForeignKeyField(Employee, backref="distributions", on_delete="CASCADE")
    method = CharField(max_length=10)  # forward | append
    queue_id = CharField(max_length=32, default="")
    state = CharField(max_length=20, default=QUEUED)
    created_at = DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = "distdelivery"
        indexes = ((("distribution", "employee"), True),)

    @property
    def delivery_id(self) -> str:
        """The X-Mailgate-Distribution-Id header of this copy (no id is a substring of another)."""
        return f"{self.distribution.token}.{self.employee_id}.mg"


class DistMapping(BaseModel):
    key = CharField(max_length=320, unique=True)  # an address, or a domain (no "@")
    employee = ForeignKeyField(Employee, backref="dist_mappings", on_delete="CASCADE")
    created_by = CharField(max_length=320, default="")
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "distmapping"


class DistReject(BaseModel):
    key = CharField(max_length=320, unique=True)  # an address, or a domain (no "@")
    note = TextField(default="")
    created_by = CharField(max_length=320, default="")
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "distreject"


class DistRoundRobin(BaseModel):
    group = CharField(max_length=100, unique=True)
    counter = IntegerField(default=0)

    class Meta:
        table_name = "distroundrobin"


MODELS_V200 = [DistCheckpoint, Distribution, DistDelivery, DistMapping, DistReject, DistRoundRobin]


@migration(200)
def distribution_tables(db: Database) -> None:
    """Issue 7: checkpoints, distribution records and deliveries, mappings, reject list, round-robin."""
    db.create_tables(MODELS_V200, safe=True)
