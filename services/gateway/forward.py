"""Publishing one request's messages: our events to `aftersales.events`, what cannot be
mapped to `aftersales.events.rejected`, with publisher confirms (the project's
`ConfirmedBatchPublisher`): when `forward` returns, RabbitMQ has confirmed every message
of the request;
when it raises, the platform is told to retry and the retry's events are deduplicated by
their event ids at intake."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pika.exceptions

from shared.amqp import REJECTED_QUEUE, make_broker
from shared.confirms import ConfirmedBatchPublisher

log = logging.getLogger(__name__)

OutboundMessage = tuple[str, str, bytes, str, dict[str, Any] | None]


class Forwarder:
    def __init__(self, amqp_url: str, queue_type: str = "classic") -> None:
        # The broker object is only the publisher's way to declare Dramatiq queues; the
        # gateway publishes to none, so it never connects.
        broker = make_broker(amqp_url, queue_type, middleware=[])
        self._publisher = ConfirmedBatchPublisher(amqp_url, broker, queue_type,
                                                  topology_queues=(REJECTED_QUEUE,))
        # One connection, one request's batch at a time (pika is not thread-safe).
        self._lock = threading.Lock()

    def forward(self, messages: list[OutboundMessage]) -> None:
        if not messages:
            return
        with self._lock:
            try:
                self._publisher.publish_batch(messages)
            except (pika.exceptions.AMQPError, OSError) as exc:
                # An idle connection may have been dropped by the broker: one fresh try.
                log.info("publish failed (%s); retrying on a new connection", exc)
                self._publisher.publish_batch(messages)

    def ready(self) -> bool:
        with self._lock:
            try:
                self._publisher.publish_batch([])
                return True
            except (pika.exceptions.AMQPError, OSError):
                return False

    def close(self) -> None:
        with self._lock:
            self._publisher.close()
