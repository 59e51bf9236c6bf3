"""Composition root of the notifier service: `aftersales run notifier`."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from functools import partial

import redis

from services.notifier.actors import register
from services.notifier.config import NotifierConfig, build_channels
from services.notifier.ratelimit import RedisRateLimiter
from services.notifier.sender import NotificationSender
from shared import metrics
from shared.bootstrap import build_database, build_health, build_policy
from shared.config import Settings
from shared.db.notifications import NotificationStore
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.runtime import WorkerSpec, child_stop_budget, supervise
from shared.worker import build_worker_broker, run_worker

log = logging.getLogger(__name__)


def build_sender(settings: Settings) -> NotificationSender:
    try:
        config = NotifierConfig.from_settings(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    policy = build_policy(settings)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    return NotificationSender(
        storage=NotificationStore.transactions(
            build_database(settings, pool_size=settings.worker_threads)),
        policy=policy,
        channels=build_channels(config, policy),
        limiter=RedisRateLimiter(client, prefix=settings.redis_prefix + "ratelimit:"),
        quiet_hours=config.quiet_hours(),
        limits=config.rate_limits(),
        retry=config.retry_policy(),
        valid_for=timedelta(seconds=config.valid_s),
    )


def worker(settings: Settings) -> None:
    setup_logging("notifier", settings.log_level)
    broker = build_worker_broker(settings, "notifier")
    register(broker, build_sender(settings))
    run_worker(broker, settings.worker_threads,
               stop_timeout_s=child_stop_budget(settings.shutdown_grace_seconds))


def run(settings: Settings) -> int:
    setup_logging("notifier", settings.log_level)
    if settings.notifier_nice:
        os.nice(settings.notifier_nice)  # the worker processes inherit it
    build_sender(settings)  # fail fast on bad channel settings, before workers start
    server = metrics.start_metrics_server(
        settings.metrics_port_for("notifier"), "notifier", addr=settings.metrics_bind)
    log.info("notifier: metrics on :%s", server.port)
    return supervise(
        [WorkerSpec("notifier", partial(worker, settings), settings.worker_processes)],
        on_child_exit=metrics.mark_process_dead,
        grace_s=settings.shutdown_grace_seconds,
        health=build_health(settings, redis=True),
    )
