"""Intake's RabbitMQ side: consume `aftersales.events` in batches, ack after commit.

Upstream systems publish plain JSON, not Dramatiq messages, so intake reads the queue with
pika directly. Bad messages are copied unchanged to `aftersales.events.rejected` (with the
reason in headers, confirmed by the broker) before they are acknowledged.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from services.intake.processor import BatchResult, IntakeProcessor
from services.intake.rejected import (
    decode_floats_as_floats,
    minimal_properties,
    rejected_copy_properties,
)
from shared.amqp import (
    EVENTS_EXCHANGE,
    INTAKE_QUEUE,
    REJECTED_QUEUE,
    connection_parameters_list,
    declare_topology,
)
from shared.errors import is_transient
from shared.schemas.events import Rejection, RejectReason

log = logging.getLogger(__name__)

# A header's double must arrive as the number it is (see services/intake/rejected.py).
decode_floats_as_floats()


@dataclass(frozen=True)
class Delivery:
    tag: int
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes


BatchObserver = Callable[[BatchResult, float], None]
# Called every `sweep_seconds` with a function that copies a body to the rejected queue
# (e.g. services.intake.parked.expire_parked).
Sweep = Callable[[Callable[[bytes, Rejection], None]], object]


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
        sweep: Sweep | None = None,
        sweep_seconds: float = 60.0,
    ) -> None:
        self.amqp_url = amqp_url
        self.processor = processor
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.queue_type = queue_type
        self.observe = observe
        self.idle_seconds = idle_seconds
        self.batch_wait_seconds = batch_wait_seconds
        self.sweep = sweep
        self.sweep_seconds = sweep_seconds
        self._next_sweep = 0.0
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
                self._maybe_sweep(channel)
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
        result = self._verdicts(connection, [d.body for d in batch])
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
            try:
                self.observe(result, time.perf_counter() - started)
            except Exception:  # metrics must never end the worker; the batch is done
                log.exception("observing a batch failed")
        return [batch[i] for i in sorted(deferred)]

    def _verdicts(self, connection: pika.BlockingConnection, bodies: list[bytes]
                  ) -> BatchResult:
        """The processor's verdicts on a batch. Only an unreachable database is retried
        (nothing was committed; the messages stay unacked; connection.sleep keeps the
        heartbeats going). Anything else raised while handling the batch must not end the
        worker: the batch is handled again one message at a time, and a message that
        still raises on its own gets its verdict, `internal_error`, and goes to ops."""
        backoff = 0.2
        while True:
            try:
                return self.processor.process(bodies)
            except Exception as exc:
                if not is_transient(exc):
                    return self._one_by_one(connection, bodies, exc)
                log.warning("database unavailable (%s); retrying batch in %.1fs",
                            type(getattr(exc, "orig", exc)).__name__, backoff)
                connection.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _one_by_one(self, connection: pika.BlockingConnection, bodies: list[bytes],
                    failure: Exception) -> BatchResult:
        if len(bodies) == 1:
            log.error("handling a message raised %r; it goes to %s", failure, REJECTED_QUEUE,
                      exc_info=failure)
            detail = f"handling it raised {failure!r}"[:1000]
            return BatchResult(rejected=[(0, Rejection(RejectReason.internal_error, detail))])
        log.warning("handling a batch raised %r; handling its messages one by one", failure)
        merged = BatchResult()
        for index, body in enumerate(bodies):
            one = self._verdicts(connection, [body])
            merged.rejected += [(index, rejection) for _i, rejection in one.rejected]
            merged.deferred += [index for _i in one.deferred]
            merged.handled += one.handled
            merged.stored.decisions += one.stored.decisions
        return merged

    def _maybe_sweep(self, channel: BlockingChannel) -> None:
        if self.sweep is None or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.sweep_seconds

        def publish(body: bytes, rejection: Rejection) -> None:
            channel.basic_publish(exchange="", routing_key=REJECTED_QUEUE, body=body,
                                  properties=minimal_properties(rejection, EVENTS_EXCHANGE, ""),
                                  mandatory=True)

        try:
            self.sweep(publish)
        except (pika.exceptions.AMQPError, OSError):
            raise  # the broker: reconnect, as for any other publish
        except Exception:  # the database away, or a bug: the next sweep tries again
            log.exception("sweep of parked events failed")

    def _reject(self, channel: BlockingChannel, delivery: Delivery, rejection: Rejection) -> None:
        """Copy the message unchanged to the rejected queue (confirmed by the broker)."""
        args = (rejection, delivery.exchange, delivery.routing_key)
        try:
            properties = rejected_copy_properties(delivery.properties, *args)
        except Exception:  # never let an odd property stop the copy: the reason alone
            log.exception("rejected message's properties could not be copied")
            properties = minimal_properties(*args)
        try:
            channel.basic_publish(exchange="", routing_key=REJECTED_QUEUE, body=delivery.body,
                                  properties=properties, mandatory=True)
        except (pika.exceptions.ProtocolSyntaxError, struct.error, ValueError, TypeError):
            # pika could not encode the properties (nothing was sent): the reason alone.
            log.exception("rejected copy's properties could not be encoded")
            channel.basic_publish(exchange="", routing_key=REJECTED_QUEUE, body=delivery.body,
                                  properties=minimal_properties(*args), mandatory=True)
        log.info("rejected message (%s): %s", rejection.reason.value, rejection.detail[:200])
