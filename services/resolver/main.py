"""Composition root of the resolver service: `aftersales run resolver`.

Its process tree: Dramatiq worker processes running `fire_deadline`, and the outbox relay
that publishes decisions and notifier messages."""

from __future__ import annotations

import logging
import time
from functools import partial

from services.resolver.actors import register
from services.resolver.outbox import OutboxRelay
from services.resolver.resolve import Resolver
from shared import metrics
from shared.amqp import make_broker
from shared.bootstrap import build_database, build_domain, build_health, build_policy, ops_contacts
from shared.broker_policy import ensure_at_start
from shared.config import Settings
from shared.confirms import ConfirmedBatchPublisher
from shared.db.outbox import SqlRelayStore
from shared.db.uow import sql_unit_of_work
from shared.logs import setup_logging
from shared.runtime import WorkerSpec, child_stop_budget, poll_loop, supervise
from shared.worker import build_worker_broker, run_worker

log = logging.getLogger(__name__)


def worker(settings: Settings) -> None:
    setup_logging("resolver", settings.log_level)
    broker = build_worker_broker(settings, "resolver")
    resolver = Resolver(
        sql_unit_of_work(build_database(settings, pool_size=settings.worker_threads)),
        build_domain(settings),
        build_policy(settings),
        ops_contacts(settings),
    )
    register(broker, resolver)
    metrics.TIMER_STALE.inc(0)  # expose 0, so dashboards and alerts see the series
    run_worker(broker, settings.worker_threads,
               stop_timeout_s=child_stop_budget(settings.shutdown_grace_seconds))


def relay(settings: Settings) -> None:
    setup_logging("outbox", settings.log_level)
    relay = OutboxRelay(
        SqlRelayStore(build_database(settings, pool_size=1)),
        ConfirmedBatchPublisher(settings.amqp_url,
                                make_broker(settings.amqp_url, settings.queue_type),
                                settings.queue_type),
        batch=settings.outbox_batch,
    )

    def step() -> int:
        started = time.perf_counter()
        published = relay.relay_once()
        if published:
            metrics.DECISIONS_PUBLISHED.inc(len(published))
            metrics.OUTBOX_PUBLISH_SECONDS.observe(
                (time.perf_counter() - started) / len(published))
        return len(published)

    poll_loop("outbox relay", step, idle_seconds=settings.outbox_poll_seconds,
              full=settings.outbox_batch)


def run(settings: Settings) -> int:
    setup_logging("resolver", settings.log_level)
    build_domain(settings)
    build_policy(settings)
    ensure_at_start(settings.rabbitmq_management_url, settings.amqp_url)
    server = metrics.start_metrics_server(
        settings.metrics_port_for("resolver"), "resolver", addr=settings.metrics_bind)
    log.info("resolver: metrics on :%s", server.port)
    return supervise(
        [
            WorkerSpec("resolver", partial(worker, settings), settings.worker_processes),
            WorkerSpec("outbox", partial(relay, settings), 1),
        ],
        on_child_exit=metrics.mark_process_dead,
        grace_s=settings.shutdown_grace_seconds,
        health=build_health(settings),
    )
