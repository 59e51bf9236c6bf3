"""Every Prometheus metric of the project, defined once.

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

import glob
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client import multiprocess as _mp
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "ACTOR_DURATION",
    "ACTOR_MESSAGES",
    "BUILD_INFO",
    "BUYER_RATINGS",
    "DECISIONS",
    "DECISIONS_PUBLISHED",
    "EVENTS_RECEIVED",
    "EVENTS_REJECTED",
    "INTAKE_BATCH_SECONDS",
    "NOTIFICATIONS",
    "OLDEST_PARKED_AGE",
    "OUTBOX_PUBLISH_SECONDS",
    "PARKED_EVENTS",
    "SLA_STEPS",
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
    "mark_process_dead",
    "prepare_multiproc_dir",
    "record_buyer_rating",
    "record_event_received",
    "record_event_rejected",
    "record_notification",
    "record_sla_step",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# --------------------------------------------------------------------------------------
# Bounded label value sets
# --------------------------------------------------------------------------------------
EVENT_OUTCOMES: Final = frozenset({"accepted", "duplicate", "rejected", "out_of_state",
                                   "conflict", "error"})
REJECT_REASONS: Final = frozenset(
    {"not_utf8", "invalid_json", "schema", "unknown_type", "oversized",
     "too_deep", "out_of_range", "invalid_text", "implausible_time", "case_never_opened",
     "internal_error"}
)
NOTIFICATION_OUTCOMES: Final = frozenset({"sent", "failed", "deferred", "retried", "duplicate"})
ACTOR_OUTCOMES: Final = frozenset({"ok", "error", "retry", "skipped"})
SLA_RESULTS: Final = frozenset({"met", "missed"})
SERVICES: Final = ("intake", "timer", "resolver", "notifier")

#: Label value used when an input value is not a well-formed identifier (garbage from
#: upstream must not create unbounded series).
INVALID_LABEL: Final = "invalid"
_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,30}(\.[a-z][a-z0-9_]{0,30}){1,2}$")

# --------------------------------------------------------------------------------------
# Histogram buckets
# --------------------------------------------------------------------------------------
HOUR: Final = 3600.0
DAY: Final = 24 * HOUR
#: Boundaries sit exactly on the rule deadlines and reminder offsets of docs/rules.md:
#: 1 h, 2 h (reminders), 24 h, 48 h, 3 d (on-site visit agreement), 7 d, 10 d, 15 d, 30 d.
#: ``rate(..._bucket{le="172800"})`` / ``rate(..._count)`` is "share within 48 h".
DEADLINE_BUCKETS: Final = (
    1 * HOUR,
    2 * HOUR,
    24 * HOUR,
    48 * HOUR,
    3 * DAY,
    7 * DAY,
    10 * DAY,
    15 * DAY,
    30 * DAY,
    float("inf"),
)
LATENESS_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"),
)  # fmt: skip
FAST_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    float("inf"),
)  # fmt: skip
ACTOR_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    float("inf"),
)  # fmt: skip


# --------------------------------------------------------------------------------------
# The metric table
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSpec:
    """One metric family of the project (also the source of docs/metrics.md's table)."""

    attr: str  # attribute name in this module ("" for collector-only families)
    type: str  # counter | histogram | gauge
    name: str  # full name, without the _total suffix prometheus_client adds to counters
    doc: str
    labels: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None

    @property
    def exposed_name(self) -> str:
        """The family name as it appears in PromQL (counters get ``_total``)."""
        return self.name + "_total" if self.type == "counter" else self.name


_SPECS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec(
        "EVENTS_RECEIVED", "counter", "aftersales_events_received",
        "Inbound events by type and what intake did with them.",
        ("type", "outcome", "platform"), ("intake",),
    ),
    MetricSpec(
        "EVENTS_REJECTED", "counter", "aftersales_events_rejected",
        "Inbound messages moved to aftersales.events.rejected, by reason.",
        ("reason",), ("intake",),
    ),
    MetricSpec(
        "DECISIONS", "counter", "aftersales_decisions",
        "Automatic decisions and reminders taken (written to the outbox).",
        ("type", "platform", "kind"), ("resolver",),
    ),
    MetricSpec(
        "DECISIONS_PUBLISHED", "counter", "aftersales_decisions_published",
        "Outbox rows published to RabbitMQ with a publisher confirm by the outbox relay.",
        (), ("resolver",),
    ),
    MetricSpec(
        "OUTBOX_PUBLISH_SECONDS", "histogram", "aftersales_outbox_publish_seconds",
        "Time to publish one outbox row and get its publisher confirm.",
        (), ("resolver",), FAST_BUCKETS,
    ),
    MetricSpec(
        "NOTIFICATIONS", "counter", "aftersales_notifications",
        "Notification attempts by channel and outcome.",
        ("channel", "outcome"), ("notifier",),
    ),
    MetricSpec(
        "GATEWAY_REQUESTS", "counter", "aftersales_gateway_requests",
        "Platform push requests to the gateway, by platform and outcome (ok, bad_signature, "
        "bad_request, too_large, not_configured, broker_unavailable).",
        ("platform", "outcome"), ("gateway",),
    ),
    MetricSpec(
        "GATEWAY_MESSAGES", "counter", "aftersales_gateway_messages",
        "Platform messages in accepted requests, by platform and verdict (forwarded, "
        "unmapped and malformed: kept in aftersales.events.rejected, ignored).",
        ("platform", "verdict"), ("gateway",),
    ),
    MetricSpec(
        "ACTOR_MESSAGES", "counter", "aftersales_actor_messages",
        "Dramatiq messages processed, by actor and outcome (ok, error, retry, skipped).",
        ("service", "actor", "outcome"), SERVICES,
    ),
    MetricSpec(
        "ACTOR_DURATION", "histogram", "aftersales_actor_duration_seconds",
        "Wall time of one Dramatiq actor call.",
        ("service", "actor"), SERVICES, ACTOR_BUCKETS,
    ),
    MetricSpec(
        "SLA_STEPS", "counter", "aftersales_sla_steps",
        "Steps that ended, by whether the acting party met the step's deadline.",
        ("step", "party", "result", "platform", "kind"), ("intake", "resolver"),
    ),
    MetricSpec(
        "TIME_TO_FIRST_RESPONSE", "histogram", "aftersales_time_to_first_response_seconds",
        "From case opened to the merchant's first response (approve/reject/auto-approve).",
        ("kind", "platform"), ("intake", "resolver"), DEADLINE_BUCKETS,
    ),
    MetricSpec(
        "TIME_TO_RESOLUTION", "histogram", "aftersales_time_to_resolution_seconds",
        "From case opened to case closed, whatever the resolution.",
        ("kind", "platform"), ("intake", "resolver"), DEADLINE_BUCKETS,
    ),
    MetricSpec(
        "TIMER_LATENESS", "histogram", "aftersales_timer_lateness_seconds",
        "How late the timer dispatched a deadline: dispatch time minus due_at.",
        (), ("timer",), LATENESS_BUCKETS,
    ),
    MetricSpec(
        "TIMER_FIRED", "counter", "aftersales_timer_fired",
        "Deadlines and reminders dispatched by the timer, by purpose.",
        ("purpose",), ("timer",),
    ),
    MetricSpec(
        "TIMER_STALE", "counter", "aftersales_timer_stale",
        "Fired deadlines found stale (fence moved on / case closed) and dropped.",
        (), ("resolver",),
    ),
    MetricSpec(
        "INTAKE_BATCH_SECONDS", "histogram", "aftersales_intake_batch_seconds",
        "Time to process and commit one batch of inbound events.",
        (), ("intake",), FAST_BUCKETS,
    ),
    MetricSpec(
        "PARKED_EVENTS", "gauge", "aftersales_parked_events",
        "Events waiting for their case to be opened (outcome parked), read by intake's "
        "sweep of parked events.",
        (), ("intake",),
    ),
    MetricSpec(
        "OLDEST_PARKED_AGE", "gauge", "aftersales_oldest_parked_event_age_seconds",
        "Age of the oldest parked event by the database clock (0 when none is parked).",
        (), ("intake",),
    ),
    MetricSpec(
        "CASES_REBUILT", "counter", "aftersales_cases_rebuilt",
        "Cases rebuilt from their log in event-time order (an event arrived after a fact "
        "that happened later).",
        ("platform", "kind"), ("intake",),
    ),
    MetricSpec(
        "DECISIONS_SUPERSEDED", "counter", "aftersales_decisions_superseded",
        "Published automatic decisions withdrawn (decision.superseded) because late facts "
        "showed the deadline was met, by the withdrawn decision's type.",
        ("type", "platform", "kind"), ("intake",),
    ),
    MetricSpec(
        "BUYER_RATINGS", "counter", "aftersales_buyer_ratings",
        "Buyers' satisfaction ratings (1..5) after a finished after-sales case.",
        ("platform", "kind", "rating"), ("intake",),
    ),
    MetricSpec(
        "BUILD_INFO", "gauge", "aftersales_build_info",
        "Always 1; the version label says which build runs.",
        ("version",), SERVICES,
    ),
)  # fmt: skip

#: Families yielded by :class:`BacklogCollector` (timer service) on scrape.
BACKLOG_SPECS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec("", "gauge", "aftersales_open_cases",
               "Open cases by platform, kind and current step.",
               ("platform", "kind", "step"), ("timer",)),
    MetricSpec("", "gauge", "aftersales_pending_deadlines",
               "Pending (not yet fired) deadlines and reminders by step and purpose.",
               ("step", "purpose"), ("timer",)),
    MetricSpec("", "gauge", "aftersales_overdue_deadlines",
               "Pending or dispatched deadlines whose due_at has passed (should stay near 0).",
               (), ("timer",)),
    MetricSpec("", "gauge", "aftersales_oldest_open_case_timestamp_seconds",
               "Unix time the oldest open case was opened (absent when none is open).",
               (), ("timer",)),
    MetricSpec("", "gauge", "aftersales_oldest_overdue_deadline_timestamp_seconds",
               "due_at of the oldest pending/dispatched deadline already due (absent if none).",
               (), ("timer",)),
    MetricSpec("", "gauge", "aftersales_outbox_unpublished",
               "Outbox rows not yet published.", (), ("timer",)),
    MetricSpec("", "gauge", "aftersales_oldest_unpublished_outbox_timestamp_seconds",
               "created_at of the oldest unpublished outbox row (absent if none).",
               (), ("timer",)),
    MetricSpec("", "gauge", "aftersales_notifications_pending",
               "Notifications not yet sent (queued or deferred), by channel.",
               ("channel",), ("timer",)),
    MetricSpec("", "gauge", "aftersales_calendar_covered_until_timestamp_seconds",
               "End of the last day with official holiday data (chinese_calendar or the user "
               "file): working-day deadlines past it are counted on an estimate.", (),
               ("timer",)),
    MetricSpec("", "gauge", "aftersales_pending_deadlines_estimated",
               "Pending deadlines counted in working days on an estimated calendar (a year "
               "without official holiday data); recounted when the data arrives.",
               (), ("timer",)),
    MetricSpec("", "gauge", "aftersales_backlog_query_ok",
               "1 if the last backlog query succeeded, 0 if it failed (then the other "
               "backlog gauges are absent).", (), ("timer",)),
    MetricSpec("", "gauge", "aftersales_backlog_query_seconds",
               "Time the last backlog query took.", (), ("timer",)),
)  # fmt: skip

#: Families yielded by :class:`ProcessTreeCollector` (every service, multi-process mode).
PROCESS_SPECS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec("", "gauge", "aftersales_service_processes",
               "Processes in the service's process tree (the metrics server and its "
               "descendants).", ("service",), SERVICES),
)  # fmt: skip

SPECS: Final[tuple[MetricSpec, ...]] = _SPECS + BACKLOG_SPECS + PROCESS_SPECS
_BY_ATTR: Final[dict[str, MetricSpec]] = {s.attr: s for s in _SPECS}


def all_metric_names() -> frozenset[str]:
    """Every family name the project exposes, as written in PromQL (``*_total`` for
    counters; histograms also expose ``_bucket``, ``_sum`` and ``_count``)."""
    return frozenset(s.exposed_name for s in SPECS)


# Declared for type checkers; built on first access by __getattr__ below.
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

_build_lock = threading.Lock()
_built: dict[str, Counter | Gauge | Histogram] = {}


def _ensure_value_class() -> None:
    """Switch prometheus_client to multi-process values if the env var appeared after
    prometheus_client was imported (its choice is otherwise made once, at import)."""
    if os.environ.get(MULTIPROC_ENV) and not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()


def _build(spec: MetricSpec) -> Counter | Gauge | Histogram:
    _ensure_value_class()
    if spec.type == "counter":
        return Counter(spec.name, spec.doc, spec.labels)
    if spec.type == "histogram":
        assert spec.buckets is not None
        return Histogram(spec.name, spec.doc, spec.labels, buckets=spec.buckets)
    return Gauge(spec.name, spec.doc, spec.labels, multiprocess_mode="max")


def __getattr__(name: str) -> Any:
    spec = _BY_ATTR.get(name)
    if spec is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _build_lock:
        metric = _built.get(name)
        if metric is None:
            metric = _built[name] = _build(spec)
            globals()[name] = metric
    return metric


def _counter(attr: str) -> Counter:
    metric = __getattr__(attr)
    assert isinstance(metric, Counter)
    return metric


def built_metric_attrs() -> frozenset[str]:
    """Names of the metric objects already built in this process (for diagnostics)."""
    return frozenset(_built)


# --------------------------------------------------------------------------------------
# Small recording helpers that keep label values bounded
# --------------------------------------------------------------------------------------
def _ident(value: str | None) -> str:
    if value and _IDENT.match(value):
        return value
    return INVALID_LABEL


def _check(value: str, allowed: frozenset[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {sorted(allowed)}, not {value!r}")
    return value


def record_event_received(type_: str | None, outcome: str, platform: str | None) -> None:
    """Count one inbound event. ``type_``/``platform`` straight from a (possibly bad)
    message are accepted: malformed values are folded into ``"invalid"``."""
    t = type_ if type_ and _EVENT_TYPE.match(type_) else INVALID_LABEL
    _counter("EVENTS_RECEIVED").labels(
        type=t, outcome=_check(outcome, EVENT_OUTCOMES, "outcome"), platform=_ident(platform)
    ).inc()


def record_event_rejected(reason: str) -> None:
    _counter("EVENTS_REJECTED").labels(reason=_check(reason, REJECT_REASONS, "reason")).inc()


GATEWAY_PLATFORMS: Final = frozenset({"douyin", "kuaishou", "taobao"})
GATEWAY_OUTCOMES: Final = frozenset(
    {"ok", "bad_signature", "bad_request", "too_large", "not_configured", "broker_unavailable"}
)
GATEWAY_VERDICTS: Final = frozenset({"forwarded", "unmapped", "malformed", "ignored"})


def record_gateway_request(platform: str, outcome: str) -> None:
    _counter("GATEWAY_REQUESTS").labels(
        platform=_check(platform, GATEWAY_PLATFORMS, "platform"),
        outcome=_check(outcome, GATEWAY_OUTCOMES, "outcome"),
    ).inc()


def record_gateway_message(platform: str, verdict: str) -> None:
    _counter("GATEWAY_MESSAGES").labels(
        platform=_check(platform, GATEWAY_PLATFORMS, "platform"),
        verdict=_check(verdict, GATEWAY_VERDICTS, "verdict"),
    ).inc()


def record_notification(channel: str, outcome: str) -> None:
    _counter("NOTIFICATIONS").labels(
        channel=_ident(channel), outcome=_check(outcome, NOTIFICATION_OUTCOMES, "outcome")
    ).inc()


def record_buyer_rating(platform: str, kind: str, rating: int) -> None:
    """Count one buyer rating; `rating` is 1..5 (the schema's bounds), else "invalid"."""
    _counter("BUYER_RATINGS").labels(
        platform=_ident(platform), kind=_ident(kind),
        rating=str(rating) if rating in range(1, 6) else INVALID_LABEL,
    ).inc()


def record_sla_step(step: str, party: str, met: bool, platform: str, kind: str) -> None:
    """Count one ended step (a ``shared.domain.StepResult``) as met or missed."""
    _counter("SLA_STEPS").labels(
        step=_ident(step),
        party=_ident(party),
        result="met" if met else "missed",
        platform=_ident(platform),
        kind=_ident(kind),
    ).inc()


# --------------------------------------------------------------------------------------
# Multi-process plumbing
# --------------------------------------------------------------------------------------
def prepare_multiproc_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (or empty it of the previous run's ``*.db`` files) and point
    ``PROMETHEUS_MULTIPROC_DIR`` at it. Call once at service start, before any worker
    process forks and before any metric is used. Returns the absolute path."""
    p = Path(path).resolve()
    if built := built_metric_attrs():
        raise RuntimeError(
            f"prepare_multiproc_dir() called after metrics were used: {sorted(built)}"
        )
    p.mkdir(parents=True, exist_ok=True)
    for f in p.glob("*.db"):
        f.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(p)
    _ensure_value_class()
    return p


def multiproc_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def mark_process_dead(pid: int) -> None:
    """Bookkeeping when a worker process exits (removes its live-gauge files). No-op
    outside multi-process mode. Counters/histograms of dead processes are kept, as they
    must be: they are part of the service's totals."""
    d = multiproc_dir()
    if d is not None:
        _mp.mark_process_dead(pid, str(d))


# --------------------------------------------------------------------------------------
# Backlog collector (reads PostgreSQL on scrape)
# --------------------------------------------------------------------------------------
Timestamp = datetime | float | int | None


def _epoch(value: Timestamp) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("backlog timestamps must be timezone-aware")
        return value.timestamp()
    return float(value)


@dataclass(frozen=True)
class BacklogSnapshot:
    """What the backlog query returns (one consistent read of PostgreSQL).

    Suggested SQL (the lead owns it):
      open_cases:          SELECT platform, kind, step, count(*) FROM cases
                           WHERE status='open' GROUP BY 1,2,3
      pending_deadlines:   SELECT step, purpose, count(*) FROM deadlines
                           WHERE status='pending' GROUP BY 1,2
      overdue_deadlines / oldest_overdue_deadline_at:
                           SELECT count(*), min(due_at) FROM deadlines
                           WHERE status IN ('pending','dispatched') AND due_at <= now()
      oldest_open_case_at: SELECT min(opened_at) FROM cases WHERE status='open'
      outbox_unpublished / oldest_unpublished_outbox_at:
                           SELECT count(*), min(created_at) FROM outbox
                           WHERE published_at IS NULL
      notifications_pending: SELECT channel, count(*) FROM notifications
                           WHERE status IN ('pending','deferred') GROUP BY 1
    Timestamps are aware datetimes or Unix seconds; None = nothing of that kind.
    """

    open_cases: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    pending_deadlines: Mapping[tuple[str, str], int] = field(default_factory=dict)
    oldest_open_case_at: Timestamp = None
    oldest_overdue_deadline_at: Timestamp = None
    overdue_deadlines: int | None = None
    outbox_unpublished: int = 0
    oldest_unpublished_outbox_at: Timestamp = None
    notifications_pending: Mapping[str, int] = field(default_factory=dict)
    calendar_covered_until: Timestamp = None
    estimated_deadlines: int | None = None

    @classmethod
    def from_rows(
        cls,
        *,
        open_cases: Iterable[tuple[str, str, str, int]] = (),
        pending_deadlines: Iterable[tuple[str, str, int]] = (),
        notifications_pending: Iterable[tuple[str, int]] = (),
        **scalars: Any,
    ) -> BacklogSnapshot:
        """Build from plain result rows (``(platform, kind, step, n)``, ``(step,
        purpose, n)``, ``(channel, n)``) plus the scalar fields as keywords."""
        return cls(
            open_cases={(p, k, s): int(n) for p, k, s, n in open_cases},
            pending_deadlines={(s, pu): int(n) for s, pu, n in pending_deadlines},
            notifications_pending={c: int(n) for c, n in notifications_pending},
            **scalars,
        )


class BacklogCollector(Collector):
    """Yields the backlog gauges from ``query_fn()`` on every scrape.

    ``query_fn`` returns a :class:`BacklogSnapshot` (or a mapping accepted by
    :meth:`BacklogSnapshot.from_rows`). If it raises, only
    ``aftersales_backlog_query_ok 0`` is exposed (never a failed scrape) and the error is
    logged. Register it on the registry of the metrics server of the timer service:
    ``start_metrics_server(port, "timer", collectors=[BacklogCollector(fn)])``.

    Every timer replica exposes the same values: aggregate with ``max``, not ``sum``.
    """

    def __init__(self, query_fn: Callable[[], BacklogSnapshot | Mapping[str, Any]]) -> None:
        self._query_fn = query_fn
        self._lock = threading.Lock()  # one DB query at a time, even with parallel scrapes

    def describe(self) -> Iterator[Metric]:
        for spec in BACKLOG_SPECS:
            yield GaugeMetricFamily(spec.name, spec.doc, labels=spec.labels)

    def _snapshot(self) -> BacklogSnapshot:
        raw = self._query_fn()
        if isinstance(raw, BacklogSnapshot):
            return raw
        return BacklogSnapshot.from_rows(**dict(raw))

    def collect(self) -> Iterator[Metric]:
        docs = {s.name: s for s in BACKLOG_SPECS}

        def family(name: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, docs[name].doc, labels=labels)

        started = time.perf_counter()
        try:
            with self._lock:
                snap = self._snapshot()
        except Exception:
            log.exception("backlog query failed")
            ok = family("aftersales_backlog_query_ok")
            ok.add_metric([], 0.0)
            yield ok
            return
        took = time.perf_counter() - started

        fam = family("aftersales_open_cases", ("platform", "kind", "step"))
        for (platform, kind, step), n in sorted(snap.open_cases.items()):
            fam.add_metric([platform, kind, step], float(n))
        yield fam

        fam = family("aftersales_pending_deadlines", ("step", "purpose"))
        for (step, purpose), n in sorted(snap.pending_deadlines.items()):
            fam.add_metric([step, purpose], float(n))
        yield fam

        if snap.overdue_deadlines is not None:
            fam = family("aftersales_overdue_deadlines")
            fam.add_metric([], float(snap.overdue_deadlines))
            yield fam

        for name, ts in (
            ("aftersales_oldest_open_case_timestamp_seconds", snap.oldest_open_case_at),
            ("aftersales_oldest_overdue_deadline_timestamp_seconds",
             snap.oldest_overdue_deadline_at),
            ("aftersales_oldest_unpublished_outbox_timestamp_seconds",
             snap.oldest_unpublished_outbox_at),
            ("aftersales_calendar_covered_until_timestamp_seconds",
             snap.calendar_covered_until),
        ):  # fmt: skip
            fam = family(name)
            epoch = _epoch(ts)
            if epoch is not None:
                fam.add_metric([], epoch)
            yield fam

        fam = family("aftersales_outbox_unpublished")
        fam.add_metric([], float(snap.outbox_unpublished))
        yield fam

        if snap.estimated_deadlines is not None:
            fam = family("aftersales_pending_deadlines_estimated")
            fam.add_metric([], float(snap.estimated_deadlines))
            yield fam

        fam = family("aftersales_notifications_pending", ("channel",))
        for channel, n in sorted(snap.notifications_pending.items()):
            fam.add_metric([channel], float(n))
        yield fam

        fam = family("aftersales_backlog_query_seconds")
        fam.add_metric([], took)
        yield fam
        fam = family("aftersales_backlog_query_ok")
        fam.add_metric([], 1.0)
        yield fam


# --------------------------------------------------------------------------------------
# Process metrics of a whole process tree
# --------------------------------------------------------------------------------------
def _children_map(proc: Path) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
        rest = text[text.rfind(")") + 2 :].split()
        if len(rest) > 1:
            children.setdefault(int(rest[1]), []).append(int(stat.parent.name))
    return children


def process_tree(root: int, proc: Path = Path("/proc")) -> list[int]:
    """``root`` and all its descendants (Linux /proc); [root] where /proc is missing."""
    if not proc.is_dir():
        return [root]
    children = _children_map(proc)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _const(pid: int) -> Callable[[], int]:
    return lambda: pid


class ProcessTreeCollector(Collector):
    """The standard ``process_*`` metrics summed over the serving process and all its
    descendants (Dramatiq workers), for multi-process mode where the default
    ``ProcessCollector`` would only see the serving process. ``process_start_time_seconds``
    is the root's; ``process_max_fds`` the root's limit."""

    _SUM = frozenset({
        "process_virtual_memory_bytes", "process_resident_memory_bytes",
        "process_cpu_seconds_total", "process_open_fds",
    })  # fmt: skip
    _ROOT = frozenset({"process_start_time_seconds", "process_max_fds"})

    def __init__(self, service: str, root_pid: int | None = None) -> None:
        self._service = service
        self._root = root_pid if root_pid is not None else os.getpid()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed set: skip the registry's duplicate-name check

    def collect(self) -> Iterator[Metric]:
        pids = process_tree(self._root)
        totals: dict[str, float] = {}
        families: dict[str, Metric] = {}
        for pid in pids:
            collector = ProcessCollector(pid=_const(pid), registry=None)
            for fam in collector.collect():
                families.setdefault(fam.name, fam)
                for sample in fam.samples:
                    if sample.name in self._SUM:
                        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                    elif sample.name in self._ROOT and pid == self._root:
                        totals[sample.name] = sample.value
        for fam_name, fam in families.items():
            out = Metric(fam_name, fam.documentation, fam.type)
            for sample_name in sorted({s.name for s in fam.samples}):
                if sample_name in totals:
                    out.add_sample(sample_name, {}, totals[sample_name])
            if out.samples:
                yield out
        count = GaugeMetricFamily(
            "aftersales_service_processes", PROCESS_SPECS[0].doc, labels=["service"]
        )
        count.add_metric([self._service], float(len(pids)))
        yield count


# --------------------------------------------------------------------------------------
# The /metrics server
# --------------------------------------------------------------------------------------
class _Delegate(Collector):
    """Exposes another registry's collectors through a new registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aftersales")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class MetricsServer:
    """Handle of a running metrics server (``port`` is the bound port: pass 0 in tests)."""

    service: str
    port: int
    registry: CollectorRegistry
    httpd: ThreadingHTTPServer
    thread: threading.Thread

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _TolerantMultiProcessCollector(_mp.MultiProcessCollector):
    """A worker that is just creating its metrics file leaves it empty for an instant; a
    scrape at that moment must skip the file, not fail with HTTP 500."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) >= 8:
                    files.append(path)
            except OSError:  # removed between glob and stat (a dead process's gauge)
                continue
        return self.merge(files, accumulate=True)


def record_case_progress(platform: str, kind: str, steps: Iterable[Any],
                         resolved_after_seconds: float | None = None) -> None:
    """SLA metrics for what one change of a case ended: each step met or missed, the
    merchant's first response time, and the time to resolution when the case closed."""
    for step in steps:
        record_sla_step(step.step, step.party, step.met, platform, kind)
        if step.step == "merchant_response":
            __getattr__("TIME_TO_FIRST_RESPONSE").labels(
                kind=_ident(kind), platform=_ident(platform)).observe(step.seconds)
    if resolved_after_seconds is not None:
        __getattr__("TIME_TO_RESOLUTION").labels(
            kind=_ident(kind), platform=_ident(platform)).observe(resolved_after_seconds)


def build_registry(service: str, collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """The registry ``/metrics`` serves: the merged multi-process files plus the process
    tree when ``PROMETHEUS_MULTIPROC_DIR`` is set, else the default registry; plus
    ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    d = multiproc_dir()
    if d is not None:
        if not d.is_dir():
            raise RuntimeError(f"{MULTIPROC_ENV}={d} is not a directory")
        _TolerantMultiProcessCollector(registry, path=str(d))
        registry.register(ProcessTreeCollector(service))
    else:
        registry.register(_Delegate(REGISTRY))
    for collector in collectors:
        registry.register(collector)
    return registry


def start_metrics_server(
    port: int,
    service: str,
    *,
    addr: str = "127.0.0.1",  # AFTERSALES_METRICS_BIND opens it (the pods: 0.0.0.0)
    collectors: Iterable[Collector] = (),
    version: str | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` (Prometheus text format), ``/healthz`` (200 ``ok``: alive) and
    ``/readyz`` (200 or 503 with the reasons, see :mod:`shared.health`) on
    ``addr:port`` from a daemon thread of the calling process, and set
    ``aftersales_build_info{version}``. In multi-process mode call it in ONE process of
    the service's tree (the parent, after :func:`prepare_multiproc_dir`)."""
    registry = build_registry(service, collectors)
    build_info = __getattr__("BUILD_INFO")
    assert isinstance(build_info, Gauge)
    build_info.labels(version=version or _version()).set(1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                except Exception:
                    log.exception("metrics collection failed")
                    body, status, ctype = b"collection failed\n", 500, "text/plain"
            elif path in ("/healthz", "/health"):
                body, status, ctype = b"ok\n", 200, "text/plain; charset=utf-8"
            elif path == "/readyz":
                from shared.health import current

                ready, why = current().readiness()
                body, status = (why + "\n").encode(), 200 if ready else 503
                ctype = "text/plain; charset=utf-8"
            else:
                body, status, ctype = b"not found: try /metrics\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds: keep the service log clean

    httpd = ThreadingHTTPServer((addr, port), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics-{service}", daemon=True)
    thread.start()
    bound = int(httpd.server_address[1])
    log.info("metrics for %s on http://%s:%d/metrics", service, addr, bound)
    return MetricsServer(service, bound, registry, httpd, thread)
