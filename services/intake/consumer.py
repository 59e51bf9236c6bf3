"""Intake's RabbitMQ side: consume `aftersales.events` in batches, ack after commit.

Upstream systems publish plain JSON, not Dramatiq messages, so intake reads the queue with
pika directly. Bad messages are copied unchanged to `aftersales.events.rejected` (with the
reason in headers, confirmed by the broker) before they are acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.exc import DBAPIError

from services.intake.processor import BatchResult, IntakeProcessor
from shared.amqp import (
    INTAKE_QUEUE,
    REJECTED_QUEUE,
    connection_parameters_list,
    declare_topology,
)
from shared.schemas.events import Rejection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    tag: int
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes


BatchObserver = Callable[[BatchResult, float], None]


class IntakeConsumer:
    def __init__(
        self,
        amqp_url: str,
        processor: IntakeProcessor,
        *,
        prefetch: int,
        batch_size: int,
        queue_type: str = "classic",
        observe: BatchObserver | None = None,
        idle_seconds: float = 0.02,
        batch_wait_seconds: float = 0.05,
    ) -> None:
        self.amqp_url = amqp_url
        self.processor = processor
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.queue_type = queue_type
        self.observe = observe
        self.idle_seconds = idle_seconds
        self.batch_wait_seconds = batch_wait_seconds
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def run_forever(self) -> None:
        """Consume until stopped; reconnect after broker outages."""
        backoff = 0.5
        while not self._stopping:
            try:
                self._run_connection()
                backoff = 0.5
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("RabbitMQ connection lost (%s); reconnecting in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _run_connection(self) -> None:
        # Any node of the list: after losing one, the next connection goes to another.
        connection = pika.BlockingConnection(connection_parameters_list(self.amqp_url))
        try:
            channel = connection.channel()
            declare_topology(channel, self.queue_type)
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self.prefetch)
            arrived: list[Delivery] = []

            def on_message(_ch: Any, method: Any, properties: pika.BasicProperties,
                           body: bytes) -> None:
                arrived.append(Delivery(method.delivery_tag, method.exchange,
                                        method.routing_key, properties, body))

            consumer_tag = channel.basic_consume(INTAKE_QUEUE, on_message)
            batch: list[Delivery] = []
            waiting_since = 0.0  # when the oldest message of `batch` was there to be read
            processing_began: float | None = None  # set until the first read after a batch
            while not self._stopping:
                # Idle: block until something arrives. Otherwise only take in what is
                # already there, up to the batch's age limit.
                limit = self.idle_seconds if not batch else max(
                    0.0, self.batch_wait_seconds - (time.monotonic() - waiting_since))
                # What the first read after a batch finds arrived while that batch was
                # processed: it has waited since then, not from now.
                read_from = processing_began if processing_began is not None \
                    else time.monotonic()
                processing_began = None
                connection.process_data_events(time_limit=limit)
                if arrived:
                    if not batch:
                        waiting_since = read_from
                    batch += arrived
                    arrived.clear()
                    if len(batch) < self.batch_size and time.monotonic() - waiting_since \
                            < self.batch_wait_seconds:
                        continue  # more may come within the age limit
                if not batch:
                    continue
                # Commit when nothing more came, the batch is full, or its oldest message
                # has waited long enough. What comes back was deferred (its case was busy):
                # it leads the next batch, still unacked, in its order.
                take, rest = batch[:self.batch_size], batch[self.batch_size:]
                processing_began = waiting_since = time.monotonic()
                batch = self._process(connection, channel, take) + rest
            channel.basic_cancel(consumer_tag)
        finally:
            if connection.is_open:
                connection.close()

    def _process(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, batch: list[Delivery]
    ) -> list[Delivery]:
        """Process a batch; ack what was handled and return what was deferred."""
        started = time.perf_counter()
        backoff = 0.2
        while True:
            try:
                result = self.processor.process([d.body for d in batch])
                break
            except DBAPIError as exc:
                # PostgreSQL is down or restarting: nothing was committed; keep the
                # messages (unacked) and try again. connection.sleep keeps heartbeats going.
                log.warning("database unavailable (%s); retrying batch in %.1fs",
                            type(exc.orig).__name__, backoff)
                connection.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        for index, rejection in result.rejected:
            self._reject(channel, batch[index], rejection)
        deferred = set(result.deferred)
        if not deferred:
            channel.basic_ack(delivery_tag=batch[-1].tag, multiple=True)
        else:
            # One ack for everything before the first deferred message, then one each
            # (an ack with `multiple` would take the deferred ones too).
            first = min(deferred)
            if first > 0:
                channel.basic_ack(delivery_tag=batch[first - 1].tag, multiple=True)
            for index in range(first + 1, len(batch)):
                if index not in deferred:
                    channel.basic_ack(delivery_tag=batch[index].tag)
        if self.observe:
            self.observe(result, time.perf_counter() - started)
        return [batch[i] for i in sorted(deferred)]

    def _reject(self, channel: BlockingChannel, delivery: Delivery, rejection: Rejection) -> None:
        props = delivery.properties
        headers: dict[str, Any] = dict(props.headers or {})
        headers.update(
            {
                "x-reject-reason": rejection.reason.value,
                "x-reject-detail": rejection.detail,
                "x-original-exchange": delivery.exchange,
                "x-original-routing-key": delivery.routing_key,
                "x-rejected-at": int(time.time()),
            }
        )
        channel.basic_publish(
            exchange="",
            routing_key=REJECTED_QUEUE,
            body=delivery.body,
            properties=pika.BasicProperties(
                content_type=props.content_type,
                content_encoding=props.content_encoding,
                message_id=props.message_id,
                timestamp=props.timestamp,
                delivery_mode=2,
                headers=headers,
            ),
            mandatory=True,
        )
        log.info("rejected message (%s): %s", rejection.reason.value, rejection.detail[:200])
