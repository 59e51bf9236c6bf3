"""Composition root of the intake service: `aftersales run intake`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from functools import partial

from services.intake.consumer import IntakeConsumer
from services.intake.parked import expire_parked, parked_stats
from services.intake.processor import BatchResult, IntakeProcessor
from shared import metrics
from shared.bootstrap import build_database, build_domain, build_health, build_policy, ops_contacts
from shared.config import Settings
from shared.db.uow import sql_unit_of_work
from shared.logs import setup_logging
from shared.runtime import WorkerSpec, supervise
from shared.schemas.events import Limits, Rejection

log = logging.getLogger(__name__)

# intake's own words for outcomes, mapped onto the metric's fixed set.
_METRIC_OUTCOME = {
    "accepted": "accepted", "duplicate": "duplicate", "out_of_state": "out_of_state",
    "parked": "out_of_state", "error": "error", "conflict": "conflict",
}


def observe_batch(result: BatchResult, seconds: float) -> None:
    metrics.INTAKE_BATCH_SECONDS.observe(seconds)
    for decision in result.stored.decisions:  # immediate ones (e.g. unused vouchers)
        metrics.DECISIONS.labels(
            type=decision.type, platform=decision.platform, kind=decision.kind
        ).inc()
    for decision in result.stored.decisions:
        if decision.type == "decision.superseded":
            metrics.DECISIONS_SUPERSEDED.labels(
                type=decision.superseded_type or "", platform=decision.platform,
                kind=decision.kind).inc()
    for _index, rejection in result.rejected:
        metrics.record_event_rejected(rejection.reason.value)
        metrics.record_event_received(None, "rejected", None)
    for handled in result.handled:
        metrics.record_event_received(
            handled.event_type, _METRIC_OUTCOME[handled.outcome], handled.platform
        )
        if handled.rebuilt and handled.kind:
            metrics.CASES_REBUILT.labels(platform=handled.platform, kind=handled.kind).inc()
        if handled.outcome == "accepted" and handled.kind:
            metrics.record_case_progress(handled.platform, handled.kind, handled.steps,
                                         handled.resolved_after_seconds)
        if handled.outcome == "accepted" and handled.kind and handled.rating is not None:
            metrics.record_buyer_rating(handled.platform, handled.kind, handled.rating)


def intake_limits(settings: Settings) -> Limits:
    return Limits(
        max_bytes=settings.max_event_bytes,
        max_depth=settings.intake_max_depth,
        max_future=timedelta(seconds=settings.intake_max_future_seconds),
        max_past=timedelta(days=settings.intake_max_past_days),
        max_due_ahead=timedelta(days=settings.intake_max_due_days),
    )


def worker(settings: Settings) -> None:
    setup_logging("intake", settings.log_level)
    uow = sql_unit_of_work(build_database(settings))
    processor = IntakeProcessor(
        db=uow,
        engine=build_domain(settings),
        policy=build_policy(settings),
        ops_contacts=ops_contacts(settings),
        max_event_bytes=settings.max_event_bytes,
        limits=intake_limits(settings),
    )

    def sweep(publish: Callable[[bytes, Rejection], None]) -> None:
        expired = expire_parked(uow, publish, settings.intake_parked_max_seconds)
        for _ in range(expired):
            metrics.record_event_rejected("case_never_opened")
        stats = parked_stats(uow)
        metrics.PARKED_EVENTS.set(stats.count)
        metrics.OLDEST_PARKED_AGE.set(stats.oldest_age_seconds or 0.0)

    consumer = IntakeConsumer(
        settings.amqp_url,
        processor,
        prefetch=settings.intake_prefetch,
        batch_size=settings.intake_batch,
        batch_wait_seconds=settings.intake_batch_wait_seconds,
        queue_type=settings.queue_type,
        observe=observe_batch,
        sweep=sweep,
        sweep_seconds=settings.intake_parked_sweep_seconds,
    )
    consumer.run_forever()


def run(settings: Settings) -> int:
    setup_logging("intake", settings.log_level)
    build_domain(settings)  # fail fast on broken rule files, before any worker starts
    build_policy(settings)
    server = metrics.start_metrics_server(
        settings.metrics_port_for("intake"), "intake", addr=settings.metrics_bind)
    log.info("intake: metrics on :%s, %d worker process(es)", server.port,
             settings.worker_processes)
    return supervise(
        [WorkerSpec("intake", partial(worker, settings), settings.worker_processes)],
        on_child_exit=metrics.mark_process_dead,
        grace_s=settings.shutdown_grace_seconds,
        health=build_health(settings),
    )
