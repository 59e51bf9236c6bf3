"""Running Dramatiq workers inside our own process tree (no import-time broker)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import dramatiq

from shared.amqp import AftersalesBroker, make_broker
from shared.config import Settings
from shared.errors import NOT_RETRIED, is_transient
from shared.metrics.actors import install_actor_metrics

log = logging.getLogger(__name__)


def build_worker_broker(settings: Settings, service: str) -> AftersalesBroker:
    broker = make_broker(settings.amqp_url, settings.queue_type)
    install_actor_metrics(broker, service)
    dramatiq.set_broker(broker)
    return broker


def batch_actor(broker: dramatiq.Broker, queue_name: str, actor_name: str,
                fn: Callable[..., None]) -> dramatiq.Actor[..., None]:
    """Register a service's actor (it takes a list of row ids, and what else the message
    carries about them). A transient failure
    (shared.errors.is_transient: the database briefly away) is retried with backoff as
    `dramatiq.Retry`; the categories that retrying cannot fix (`NOT_RETRIED`) fail the
    message at once. Anything else (a bug) is retried like a transient failure, but logged
    with its traceback. After the last retry the timer hands the rows over again (stuck
    dispatches, queued notifications), so nothing is lost."""

    def run(ids: list[int], *about: Any) -> None:
        try:
            fn(ids, *about)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # The type only: a database error's text carries the statement's parameters.
            cause = type(getattr(exc, "orig", None) or exc).__name__
            log.warning("%s: %s; retrying with backoff", actor_name, cause)
            raise dramatiq.Retry(cause) from exc

    return dramatiq.actor(
        broker=broker, actor_name=actor_name, queue_name=queue_name,
        max_retries=10, min_backoff=500, max_backoff=30_000, throws=NOT_RETRIED,
    )(run)


def run_worker(broker: AftersalesBroker, threads: int, stop: threading.Event | None = None,
               stop_timeout_s: float = 10.0) -> None:
    """Consume until SIGTERM (KeyboardInterrupt in a child of `shared.runtime`) or `stop`.
    Then stop consuming (prefetched messages go back to RabbitMQ) and give the messages
    being worked on up to `stop_timeout_s` to finish (an unfinished one is redelivered)."""
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=1000)
    worker.start()
    try:
        (stop or threading.Event()).wait()
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping worker")
        # Dramatiq waits up to `timeout` for its worker threads, then again for its consumers.
        worker.stop(timeout=int(stop_timeout_s * 1000 / 2))
        broker.close()
