"""Publishing to RabbitMQ with publisher confirms, behind a small port.

`basic_publish` on a channel in confirm mode returns only after RabbitMQ has taken
responsibility for the message (persisted, for a durable queue), and `mandatory=True`
turns "no queue was bound" into an error instead of a silent drop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import dramatiq
import pika
import pika.exceptions

from shared.amqp import AftersalesBroker, declare_topology


class Publisher(Protocol):
    def publish(self, exchange: str, routing_key: str, body: bytes, message_id: str,
                headers: dict[str, Any] | None = None) -> None: ...

    def send_actor(self, queue_name: str, actor_name: str, *args: Any) -> None: ...


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
        try:
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


class BatchPublisher:
    """Publishes a batch of messages with one broker round trip: an AMQP transaction
    (tx.select once, tx.commit per batch). `commit` returns only once RabbitMQ has taken
    every message of the batch, the same guarantee as a publisher confirm per message,
    for one wait instead of one per message. `mandatory` makes an unroutable message an
    error instead of a silent drop.

    Dramatiq queues ("" exchange) are declared through the Dramatiq broker first, so they
    get exactly the arguments Dramatiq's workers expect."""

    def __init__(self, amqp_url: str, broker: AftersalesBroker, queue_type: str = "classic",
                 topology_queues: Iterable[str] = ()) -> None:
        self.amqp_url = amqp_url
        self.broker = broker
        self.queue_type = queue_type
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._returned: list[str] = []
        # Queues `declare_topology` declares (e.g. aftersales.events.rejected): published to
        # through the default exchange, but not Dramatiq's to declare.
        self._declared: set[str] = set(topology_queues)

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            from shared.amqp import connection_parameters

            self._connection = pika.BlockingConnection(connection_parameters(self.amqp_url))
            channel = self._connection.channel()
            declare_topology(channel, self.queue_type)
            channel.add_on_return_callback(
                lambda _ch, method, props, _body: self._returned.append(
                    f"{method.exchange}/{method.routing_key}: {method.reply_text}"))
            channel.tx_select()
            self._channel = channel
        return self._channel

    def publish_batch(self, messages: list[tuple[str, str, bytes, str, dict[str, Any] | None]],
                      receipt: tuple[str, bytes] | None = None) -> None:
        """(exchange, routing_key, body, message_id, headers) each; all or an exception.

        `receipt` (queue, body) is published to that queue in the same transaction: once
        the commit returns, the receipt is there if and only if the batch is."""
        try:
            for exchange, routing_key, _b, _m, _h in messages:
                if exchange == "" and routing_key not in self._declared:
                    self.broker.declare_queue(routing_key, ensure=True)
                    self._declared.add(routing_key)
            channel = self._open()
            self._returned.clear()
            for exchange, routing_key, body, message_id, headers in messages:
                channel.basic_publish(
                    exchange=exchange, routing_key=routing_key, body=body,
                    properties=pika.BasicProperties(
                        delivery_mode=2, content_type="application/json",
                        message_id=message_id, headers=headers or None),
                    mandatory=True,
                )
            if receipt is not None:
                channel.basic_publish(
                    exchange="", routing_key=receipt[0], body=receipt[1],
                    properties=pika.BasicProperties(delivery_mode=2,
                                                    content_type="application/json"),
                    mandatory=True,
                )
            channel.tx_commit()
            if self._connection is not None:
                self._connection.process_data_events(0)  # deliver any basic.return
        except (pika.exceptions.AMQPError, OSError):
            self.close()
            raise
        if self._returned:
            raise pika.exceptions.UnroutableError(list(self._returned))

    def take(self, queue: str, handle: Callable[[list[bytes]], None], limit: int = 1000
             ) -> int:
        """Take up to `limit` messages from `queue`: `handle` their bodies, then ack them
        (one ack and commit). If `handle` raises, nothing is acked and the messages stay.
        Returns how many were taken."""
        try:
            channel = self._open()
            bodies: list[bytes] = []
            last_tag = None
            while len(bodies) < limit:
                method, _props, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                bodies.append(body)
                last_tag = method.delivery_tag
            if last_tag is None:
                return 0
            try:
                handle(bodies)
            except Exception:
                channel.basic_nack(last_tag, multiple=True, requeue=True)
                channel.tx_commit()
                raise
            channel.basic_ack(last_tag, multiple=True)
            channel.tx_commit()
            return len(bodies)
        except (pika.exceptions.AMQPError, OSError):
            self.close()
            raise

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass
        self._connection = None
        self._channel = None
