import threading

from gateway import oplog
from gateway.db.models import AuditLog


def test_chain_records_and_verifies(db):
    oplog.record("mgr@acme.test", "customer.create", "customer:1", {"name": "Müller GmbH 客户"})
    oplog.record("mgr@acme.test", "customer.transfer", "customer:1", "to sales2")
    assert oplog.verify() == []
    rows, total = oplog.search(action="customer.")
    assert total == 2 and rows[0].action == "customer.transfer"


def test_alteration_and_deletion_are_detected(db):
    for i in range(5):
        oplog.record("it@acme.test", "rules.view", f"file{i}")
    AuditLog.update(target="forged").where(AuditLog.id == 2).execute()
    problems = oplog.verify()
    assert problems == ["operation log: entry 2 was altered"]
    AuditLog.update(target="file1").where(AuditLog.id == 2).execute()
    AuditLog.delete().where(AuditLog.id == 4).execute()
    assert oplog.verify() == ["operation log: entry 5 does not follow the one before it "
                              "(an entry was deleted or reordered)"]


def test_concurrent_writers_never_fork_the_chain(db):
    def write(n):
        for i in range(20):
            oplog.record(f"user{n}", "x", str(i))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert AuditLog.select().count() == 80
    assert oplog.verify() == []
