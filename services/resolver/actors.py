"""The resolver's Dramatiq actor: thin, it decodes the id and calls `Resolver.fire`."""

from __future__ import annotations

import logging

import dramatiq

from services.resolver.resolve import Resolution, Resolver
from shared import metrics
from shared.amqp import FIRE_DEADLINE_ACTOR, RESOLVER_QUEUE

log = logging.getLogger(__name__)


def record(resolution: Resolution) -> None:
    if resolution.outcome == "stale":
        metrics.TIMER_STALE.inc()
    if resolution.outcome != "fired":
        return
    for decision_type in resolution.decision_types:
        metrics.DECISIONS.labels(
            type=decision_type, platform=resolution.platform, kind=resolution.kind
        ).inc()
    metrics.record_case_progress(resolution.platform or "", resolution.kind or "",
                                 resolution.steps, resolution.resolved_after_seconds)


def register(broker: dramatiq.Broker, resolver: Resolver) -> dramatiq.Actor[[int], None]:
    def fire_deadline(deadline_id: int) -> None:
        resolution = resolver.fire(int(deadline_id))
        if resolution.outcome in ("stale", "missing"):
            log.info("deadline %s: %s %s", deadline_id, resolution.outcome,
                     resolution.problem or "")
        record(resolution)

    return dramatiq.actor(
        broker=broker,
        actor_name=FIRE_DEADLINE_ACTOR,
        queue_name=RESOLVER_QUEUE,
        # Database hiccups are retried quickly; after the last retry the timer's
        # re-dispatch of stuck deadlines still gets it done.
        max_retries=10,
        min_backoff=500,
        max_backoff=30_000,
    )(fire_deadline)
