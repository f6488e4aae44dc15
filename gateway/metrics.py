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


_queue_collector: QueueCollector | None = None


def install_queue_collector() -> None:
    global _queue_collector
    if _queue_collector is None:
        _queue_collector = QueueCollector()
        REGISTRY.register(_queue_collector)


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
    return registry
