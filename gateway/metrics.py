"""Prometheus metrics: one registry for the whole node.

Counters are incremented where the event happens; gauges that describe the
queue are computed on scrape by ``QueueCollector`` (see ``gateway.spool``).
When the relay runs in its own process (``gateway.relayproc``) both processes
count into prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR,
set by ``use_multiprocess_dir`` before this module is imported), and
``exposition_registry`` merges them for /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

smtp_messages = Counter(
    "mailgate_smtp_messages",
    "Messages submitted, by verdict (accepted, refused, held; tempfail: answered 4xx at the end of DATA)",
    ["verdict"],
    registry=REGISTRY,
)
relay_results = Counter(
    "mailgate_relay_messages",
    "Relay attempts, by result (relayed, deferred, bounced)",
    ["result"],
    registry=REGISTRY,
)
auth_results = Counter(
    "mailgate_auth_attempts",
    "Login attempts, by protocol and result",
    ["protocol", "result"],
    registry=REGISTRY,
)
imap_sessions = Counter(
    "mailgate_imap_sessions",
    "IMAP sessions opened",
    registry=REGISTRY,
)
imap_tagged = Counter(
    "mailgate_imap_tagged_messages",
    "Messages served with a tag",
    ["tag"],
    registry=REGISTRY,
)
spool_orphans_removed = Counter(
    "mailgate_spool_orphans_removed",
    "Spool files removed by the orphan sweep: no queue row waiting for them, older than an hour",
    registry=REGISTRY,
)
smtp_delay = Histogram(
    "mailgate_smtp_transaction_seconds",
    "Time from end of DATA to the final reply",
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class QueueCollector:
    """Queue depth and oldest age, read from the DB on each scrape."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from gateway.spool import queue_stats

        try:
            depth, age = queue_stats()
        except Exception:
            return
        yield GaugeMetricFamily("mailgate_queue_depth", "Messages waiting for relay", value=depth)
        yield GaugeMetricFamily("mailgate_queue_oldest_seconds", "Age of the oldest waiting message", value=age)


class ArchiveIndexCollector:
    """Archive records search cannot find because the indexer could not index them
    (gateway/archive/unread.py), read from the DB on each scrape: those it tries again and
    those it gave up on (their document refused for its data; `mailgate archive reindex
    --failed`).  Nothing without the archive's tables."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        try:
            from gateway.archive.unread import unread_counts

            counts = unread_counts()
        except Exception:
            return
        yield GaugeMetricFamily("mailgate_archive_index_retrying_records",
                                "Archive records not in the search index yet, tried again later", value=counts["retry"])
        yield GaugeMetricFamily("mailgate_archive_index_failed_records",
                                "Archive records missing from the search index for good: their index entry was "
                                "refused for its data and the indexer gave up (mailgate archive reindex --failed)",
                                value=counts["failed"])


_queue_collector: QueueCollector | None = None
_index_collector: ArchiveIndexCollector | None = None


def install_queue_collector() -> None:
    """The collectors that read the database on each scrape (queue, archive index)."""
    global _queue_collector, _index_collector
    if _queue_collector is None:
        _queue_collector = QueueCollector()
        REGISTRY.register(_queue_collector)
    if _index_collector is None:
        _index_collector = ArchiveIndexCollector()
        REGISTRY.register(_index_collector)


def exposition_registry() -> CollectorRegistry:
    """What /metrics serves: this process's registry, or every process's counters."""
    import os

    install_queue_collector()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(_queue_collector)
    registry.register(_index_collector)
    return registry
