"""The catalog: every Prometheus metric of the project, defined once (``docs/metrics.md``),
with the bounded label value sets and the histogram buckets. Metric objects are built on
first use (:func:`metric`), so importing this module has no side effect."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
    values,
)

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


def metric(name: str) -> Counter | Gauge | Histogram:
    """The metric object of catalog attribute ``name`` (e.g. ``"EVENTS_RECEIVED"``), built
    on first use."""
    spec = _BY_ATTR.get(name)
    if spec is None:
        raise KeyError(f"no metric {name!r} in the catalog")
    with _build_lock:
        built = _built.get(name)
        if built is None:
            built = _built[name] = _build(spec)
    return built


def _counter(attr: str) -> Counter:
    built = metric(attr)
    assert isinstance(built, Counter)
    return built


def _histogram(attr: str) -> Histogram:
    built = metric(attr)
    assert isinstance(built, Histogram)
    return built


def built_metric_attrs() -> frozenset[str]:
    """Names of the metric objects already built in this process (for diagnostics)."""
    return frozenset(_built)



GATEWAY_PLATFORMS: Final = frozenset({"douyin", "kuaishou", "taobao"})
GATEWAY_OUTCOMES: Final = frozenset(
    {"ok", "bad_signature", "bad_request", "too_large", "not_configured", "broker_unavailable"}
)
GATEWAY_VERDICTS: Final = frozenset({"forwarded", "unmapped", "malformed", "ignored"})

