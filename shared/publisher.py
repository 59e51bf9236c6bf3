"""Publishing to RabbitMQ with publisher confirms, behind a small port.

`basic_publish` on a channel in confirm mode returns only after RabbitMQ has taken
responsibility for the message (persisted, for a durable queue), and `mandatory=True`
turns "no queue was bound" into an error instead of a silent drop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import dramatiq
import pika
import pika.exceptions

from shared.amqp import AftersalesBroker, declare_topology

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def publish(self, exchange: str, routing_key: str, body: bytes, message_id: str,
                headers: dict[str, Any] | None = None) -> None: ...

    def send_actor(self, queue_name: str, actor_name: str, *args: Any) -> None: ...

    def waiting(self, queue_name: str) -> int:
        """Messages ready in a queue, not counting those its consumers hold."""
        ...


class ConfirmedPublisher:
    """Publishes on the Dramatiq broker's own (confirming) channel, so Dramatiq's queues
    are declared with exactly the arguments its workers expect."""

    def __init__(self, broker: AftersalesBroker, queue_type: str = "classic") -> None:
        self.broker = broker
        self.queue_type = queue_type
        self._topology_declared = False

    def _channel(self) -> Any:
        channel = self.broker.channel
        if not self._topology_declared:
            declare_topology(channel, self.queue_type)
            self._topology_declared = True
        return channel

    def publish(self, exchange: str, routing_key: str, body: bytes, message_id: str,
                headers: dict[str, Any] | None = None) -> None:
        if exchange == "":
            self.broker.declare_queue(routing_key, ensure=True)
        with self._dropped_on_failure():
            self._channel().basic_publish(
                exchange=exchange,
                routing_key=routing_key,
                body=body,
                properties=pika.BasicProperties(
                    delivery_mode=2,
                    content_type="application/json",
                    message_id=message_id,
                    headers=headers or None,
                ),
                mandatory=True,
            )

    def waiting(self, queue_name: str) -> int:
        self.broker.declare_queue(queue_name, ensure=True)
        with self._dropped_on_failure():
            declared = self._channel().queue_declare(queue_name, passive=True)
        return int(declared.method.message_count)

    @contextmanager
    def _dropped_on_failure(self) -> Iterator[None]:
        try:
            yield
        except (pika.exceptions.AMQPError, OSError):
            # Drop the broken connection so the next call opens a fresh one.
            del self.broker.connection
            self._topology_declared = False
            raise

    def send_actor(self, queue_name: str, actor_name: str, *args: Any) -> None:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue_name, actor_name=actor_name, args=args, kwargs={}, options={}
        )
        self.publish("", queue_name, message.encode(), message.message_id)


class RecordingPublisher:
    """A fake for unit tests: remembers what would have been published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes, str]] = []
        self.actor_calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.fail_next = 0
        self.ready: dict[str, int] = {}  # what `waiting` reports, per queue

    def publish(self, exchange: str, routing_key: str, body: bytes, message_id: str,
                headers: dict[str, Any] | None = None) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("fake broker down")
        self.published.append((exchange, routing_key, body, message_id))

    def send_actor(self, queue_name: str, actor_name: str, *args: Any) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("fake broker down")
        self.actor_calls.append((queue_name, actor_name, args))

    def waiting(self, queue_name: str) -> int:
        return self.ready.get(queue_name, 0)
