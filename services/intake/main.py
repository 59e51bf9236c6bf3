"""Composition root of the intake service: `aftersales run intake`."""

from __future__ import annotations

import logging
from functools import partial

from services.intake.consumer import IntakeConsumer
from services.intake.processor import BatchResult, IntakeProcessor
from shared import metrics
from shared.bootstrap import build_database, build_domain, build_policy, ops_contacts
from shared.config import Settings
from shared.logs import setup_logging
from shared.runtime import WorkerSpec, supervise

log = logging.getLogger(__name__)

# intake's own words for outcomes, mapped onto the metric's fixed set.
_METRIC_OUTCOME = {
    "accepted": "accepted", "duplicate": "duplicate", "out_of_state": "out_of_state",
    "parked": "out_of_state", "error": "out_of_state",
}


def observe_batch(result: BatchResult, seconds: float) -> None:
    metrics.INTAKE_BATCH_SECONDS.observe(seconds)
    for decision in result.stored.decisions:  # immediate ones (e.g. unused vouchers)
        metrics.DECISIONS.labels(
            type=decision.type, platform=decision.platform, kind=decision.kind
        ).inc()
    for _index, rejection in result.rejected:
        metrics.record_event_rejected(rejection.reason.value)
        metrics.record_event_received(None, "rejected", None)
    for handled in result.handled:
        metrics.record_event_received(
            handled.event_type, _METRIC_OUTCOME[handled.outcome], handled.platform
        )
        if handled.outcome == "accepted" and handled.kind:
            metrics.record_case_progress(handled.platform, handled.kind, handled.steps,
                                         handled.resolved_after_seconds)
        if handled.outcome == "accepted" and handled.kind and handled.rating is not None:
            metrics.record_buyer_rating(handled.platform, handled.kind, handled.rating)


def worker(settings: Settings) -> None:
    setup_logging("intake", settings.log_level)
    processor = IntakeProcessor(
        db=build_database(settings),
        engine=build_domain(settings),
        policy=build_policy(settings),
        ops_contacts=ops_contacts(settings),
        max_event_bytes=settings.max_event_bytes,
    )
    consumer = IntakeConsumer(
        settings.amqp_url,
        processor,
        prefetch=settings.intake_prefetch,
        batch_size=settings.intake_batch,
        batch_wait_seconds=settings.intake_batch_wait_seconds,
        queue_type=settings.queue_type,
        observe=observe_batch,
    )
    consumer.run_forever()


def run(settings: Settings) -> int:
    setup_logging("intake", settings.log_level)
    build_domain(settings)  # fail fast on broken rule files, before any worker starts
    build_policy(settings)
    server = metrics.start_metrics_server(settings.metrics_port_for("intake"), "intake")
    log.info("intake: metrics on :%s, %d worker process(es)", server.port,
             settings.worker_processes)
    return supervise(
        [WorkerSpec("intake", partial(worker, settings), settings.worker_processes)],
        on_child_exit=metrics.mark_process_dead,
    )
