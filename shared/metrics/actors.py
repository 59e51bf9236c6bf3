"""Dramatiq middleware recording ``aftersales_actor_messages_total`` and
``aftersales_actor_duration_seconds`` (metrics defined in :mod:`shared.metrics`).

Install it with :func:`install_actor_metrics` so that it sits *before* Dramatiq's
``Retries`` middleware in the list: ``after_*`` hooks run in reverse order, so it then
sees ``message.failed`` as ``Retries`` left it and can tell a message that will be
retried (``retry``) from one that has failed for good (``error``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, Retries

from shared import metrics

__all__ = ["ActorMetrics", "install_actor_metrics"]


class ActorMetrics(Middleware):
    """Counts every processed message by ``service``, ``actor`` and ``outcome`` (ok,
    error, retry, skipped) and observes its duration."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._lock:
            self._started[message.message_id] = time.perf_counter()

    def _finish(self, message: Any, outcome: str) -> None:
        with self._lock:
            started = self._started.pop(message.message_id, None)
        actor = str(message.actor_name)
        metrics.ACTOR_MESSAGES.labels(service=self.service, actor=actor, outcome=outcome).inc()
        if started is not None and outcome != "skipped":
            metrics.ACTOR_DURATION.labels(service=self.service, actor=actor).observe(
                time.perf_counter() - started
            )

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            outcome = "ok"
        elif getattr(message, "failed", False):
            outcome = "error"  # Retries gave up, or the exception is in throws=
        else:
            outcome = "retry"  # dramatiq.Retry or an error that Retries will retry
        self._finish(message, outcome)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._finish(message, "skipped")


def install_actor_metrics(broker: dramatiq.Broker, service: str) -> ActorMetrics:
    """Add :class:`ActorMetrics` to ``broker`` just before ``Retries`` (or last if the
    broker has no ``Retries``)."""
    middleware = ActorMetrics(service)
    if any(isinstance(m, Retries) for m in broker.middleware):
        broker.add_middleware(middleware, before=Retries)
    else:
        broker.add_middleware(middleware)
    return middleware
