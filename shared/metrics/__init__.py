"""Every Prometheus metric of the project, defined once.

- ``catalog``: the metric definitions, label value sets, buckets;
- ``recorders``: the record helpers that keep label values bounded;
- ``exposition``: the ``/metrics`` server and the multi-process plumbing;
- ``collectors``: the backlog collector and the process-tree (/proc) reader;
- ``actors``: the Dramatiq middleware that counts and times actor messages (imported by
  the workers only, so importing ``shared.metrics`` does not import Dramatiq).

All but ``actors`` is re-exported here: ``from shared.metrics import X`` and ``metrics.X`` work.

Reference: ``docs/metrics.md``.

Multi-process mode
------------------
Each service is a process tree (Dramatiq forks several worker processes). Counters and
histograms therefore use prometheus_client's multi-process mode: every process writes its
samples to files in ``PROMETHEUS_MULTIPROC_DIR`` and the one process that serves
``/metrics`` merges them with a ``MultiProcessCollector``.

The metric objects below are built **lazily**, on first attribute access (PEP 562 module
``__getattr__``), so importing this module has no side effect. The composition root of a
service must, before any worker forks and before any metric is touched::

    from shared import metrics
    metrics.prepare_multiproc_dir(path)          # wipes/creates it, sets the env var
    server = metrics.start_metrics_server(port, "timer", collectors=[...])
    # ... start the Dramatiq workers (they inherit the env var) ...

Without ``PROMETHEUS_MULTIPROC_DIR`` everything works single-process with the default
registry (unit tests, ``aftersales case show``...).

Backlog gauges are not written by workers: :class:`BacklogCollector` reads PostgreSQL
when Prometheus scrapes (the timer service registers it).

No case, order, shop or person ids ever go into labels: label values are bounded sets
(event types, platforms, kinds, steps, channels, outcomes).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics.catalog import (
    ACTOR_BUCKETS,
    ACTOR_OUTCOMES,
    BACKLOG_SPECS,
    DAY,
    DEADLINE_BUCKETS,
    EVENT_OUTCOMES,
    FAST_BUCKETS,
    GATEWAY_OUTCOMES,
    GATEWAY_PLATFORMS,
    GATEWAY_VERDICTS,
    HOUR,
    INVALID_LABEL,
    LATENESS_BUCKETS,
    MULTIPROC_ENV,
    NOTIFICATION_OUTCOMES,
    PROCESS_SPECS,
    REJECT_REASONS,
    SERVICES,
    SLA_RESULTS,
    SPECS,
    MetricSpec,
    all_metric_names,
    built_metric_attrs,
    metric,
)
from shared.metrics.collectors import (
    BacklogCollector,
    BacklogSnapshot,
    ProcessTreeCollector,
    process_tree,
)
from shared.metrics.exposition import (
    MetricsServer,
    build_registry,
    mark_process_dead,
    multiproc_dir,
    prepare_multiproc_dir,
    start_metrics_server,
)
from shared.metrics.recorders import (
    record_buyer_rating,
    record_case_progress,
    record_event_received,
    record_event_rejected,
    record_gateway_message,
    record_gateway_request,
    record_notification,
    record_sla_step,
)

__all__ = [
    "ACTOR_BUCKETS",
    "ACTOR_DURATION",
    "ACTOR_MESSAGES",
    "ACTOR_OUTCOMES",
    "BACKLOG_SPECS",
    "BUILD_INFO",
    "BUYER_RATINGS",
    "CASES_REBUILT",
    "DAY",
    "DEADLINE_BUCKETS",
    "DECISIONS",
    "DECISIONS_PUBLISHED",
    "DECISIONS_SUPERSEDED",
    "EVENTS_RECEIVED",
    "EVENTS_REJECTED",
    "EVENT_OUTCOMES",
    "FAST_BUCKETS",
    "GATEWAY_OUTCOMES",
    "GATEWAY_PLATFORMS",
    "GATEWAY_VERDICTS",
    "HOUR",
    "INTAKE_BATCH_SECONDS",
    "INVALID_LABEL",
    "LATENESS_BUCKETS",
    "MULTIPROC_ENV",
    "NOTIFICATIONS",
    "NOTIFICATION_OUTCOMES",
    "OLDEST_PARKED_AGE",
    "OUTBOX_PUBLISH_SECONDS",
    "PARKED_EVENTS",
    "PROCESS_SPECS",
    "REJECT_REASONS",
    "SERVICES",
    "SLA_RESULTS",
    "SLA_STEPS",
    "SPECS",
    "TIMER_FIRED",
    "TIMER_LATENESS",
    "TIMER_STALE",
    "TIME_TO_FIRST_RESPONSE",
    "TIME_TO_RESOLUTION",
    "BacklogCollector",
    "BacklogSnapshot",
    "MetricSpec",
    "MetricsServer",
    "ProcessTreeCollector",
    "all_metric_names",
    "build_registry",
    "built_metric_attrs",
    "mark_process_dead",
    "metric",
    "multiproc_dir",
    "prepare_multiproc_dir",
    "process_tree",
    "record_buyer_rating",
    "record_case_progress",
    "record_event_received",
    "record_event_rejected",
    "record_gateway_message",
    "record_gateway_request",
    "record_notification",
    "record_sla_step",
    "start_metrics_server",
]

# Declared for type checkers; built on first access by __getattr__ below (the catalog builds them).
EVENTS_RECEIVED: Counter
EVENTS_REJECTED: Counter
DECISIONS: Counter
DECISIONS_PUBLISHED: Counter
OUTBOX_PUBLISH_SECONDS: Histogram
NOTIFICATIONS: Counter
ACTOR_MESSAGES: Counter
ACTOR_DURATION: Histogram
SLA_STEPS: Counter
TIME_TO_FIRST_RESPONSE: Histogram
TIME_TO_RESOLUTION: Histogram
TIMER_LATENESS: Histogram
TIMER_FIRED: Counter
TIMER_STALE: Counter
BUYER_RATINGS: Counter
INTAKE_BATCH_SECONDS: Histogram
PARKED_EVENTS: Gauge
OLDEST_PARKED_AGE: Gauge
CASES_REBUILT: Counter
DECISIONS_SUPERSEDED: Counter
BUILD_INFO: Gauge


def __getattr__(name: str) -> Any:
    try:
        return metric(name)
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
