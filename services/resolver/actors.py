"""The resolver's Dramatiq actor: thin, it decodes the ids and calls the resolver."""

from __future__ import annotations

import logging

import dramatiq

from services.resolver.resolve import BatchResolution, Resolver
from shared import metrics
from shared.amqp import FIRE_DEADLINE_ACTOR, RESOLVER_QUEUE
from shared.worker import batch_actor

log = logging.getLogger(__name__)


def record(batch: BatchResolution) -> None:
    for decision in batch.stored.decisions:
        metrics.DECISIONS.labels(
            type=decision.type, platform=decision.platform, kind=decision.kind
        ).inc()
    for resolution in batch.resolutions:
        if resolution.outcome == "stale":
            metrics.TIMER_STALE.inc()
        elif resolution.outcome == "fired":
            metrics.record_case_progress(resolution.platform or "", resolution.kind or "",
                                         resolution.steps, resolution.resolved_after_seconds)
        if resolution.outcome in ("stale", "early", "missing", "error"):
            log.info("deadline %s: %s %s", resolution.deadline_id, resolution.outcome,
                     resolution.problem or "")


def register(broker: dramatiq.Broker, resolver: Resolver
             ) -> dramatiq.Actor[[list[int]], None]:
    def fire_deadlines(deadline_ids: list[int]) -> None:
        record(resolver.fire_many([int(i) for i in deadline_ids]))

    return batch_actor(broker, RESOLVER_QUEUE, FIRE_DEADLINE_ACTOR, fire_deadlines)
