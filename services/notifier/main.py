"""Composition root of the notifier service: `aftersales run notifier`."""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial

import redis

from services.notifier.actors import register
from services.notifier.channels import build_channels
from services.notifier.delivery import QuietHours, RetryPolicy, rate_limits
from services.notifier.ratelimit import RedisRateLimiter
from services.notifier.sender import NotificationSender
from shared import metrics
from shared.bootstrap import build_database, build_health, build_policy
from shared.config import DeliverySettings, QuietHoursSettings, Settings
from shared.db.notifications import NotificationStore
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.runtime import WorkerSpec, child_stop_budget, supervise, yield_cpu
from shared.worker import build_worker_broker, run_worker

log = logging.getLogger(__name__)


def build_sender(settings: Settings) -> NotificationSender:
    policy = build_policy(settings)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    delivery = settings.delivery
    return NotificationSender(
        storage=NotificationStore.transactions(
            build_database(settings, pool_size=settings.worker_threads)),
        policy=policy,
        channels=build_channels(settings.smtp, settings.sms, policy),
        limiter=RedisRateLimiter(client, prefix=settings.redis_prefix + "ratelimit:"),
        quiet_hours=quiet_hours(settings.quiet_hours),
        limits=rate_limits(settings.rate_limits),
        retry=retry_policy(delivery),
        valid_for=timedelta(seconds=delivery.valid_seconds),
    )


def retry_policy(group: DeliverySettings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=group.max_attempts,
        # No budget set: a throttling provider is waited out like one that is down, until
        # the notification expires (valid_for); with a budget, throttling has its own cap.
        max_throttled_attempts=None if group.max_attempts is None
        else RetryPolicy.max_throttled_attempts,
        base_delay_s=group.retry_base_seconds, max_delay_s=group.retry_max_seconds)


def quiet_hours(group: QuietHoursSettings) -> QuietHours:
    try:
        return QuietHours.parse(group.window, group.tz)
    except ValueError as exc:
        raise ConfigError(f"AFTERSALES_QUIET_HOURS: {exc}") from None
    except KeyError:  # ZoneInfoNotFoundError
        raise ConfigError(f"AFTERSALES_QUIET_HOURS_TZ: no time zone {group.tz!r}") from None


def worker(settings: Settings) -> None:
    setup_logging("notifier", settings.log_level)
    broker = build_worker_broker(settings, "notifier")
    register(broker, build_sender(settings))
    run_worker(broker, settings.worker_threads,
               stop_timeout_s=child_stop_budget(settings.shutdown_grace_seconds))


def run(settings: Settings) -> int:
    setup_logging("notifier", settings.log_level)
    yield_cpu(settings.notifier_nice)  # the worker processes inherit it
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
