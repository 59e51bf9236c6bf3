"""The relay's former publisher, kept only as this benchmark's baseline: a batch and its
receipt on a ledger queue in one AMQP transaction (replaced in production by
`shared.confirms.ConfirmedBatchPublisher`, since a transaction is not atomic across queues
when the broker crashes during the commit)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from shared.amqp import AftersalesBroker, connection_parameters_list, declare_topology


class BatchPublisher:
    """Publishes a batch of messages with one broker round trip: an AMQP transaction
    (tx.select once, tx.commit per batch). `commit` returns only once RabbitMQ has taken
    every message of the batch, the same guarantee as a publisher confirm per message,
    for one wait instead of one per message. `mandatory` makes an unroutable message an
    error instead of a silent drop.

    Dramatiq queues ("" exchange) are declared through the Dramatiq broker first, so they
    get exactly the arguments Dramatiq's workers expect."""

    def __init__(self, amqp_url: str, broker: AftersalesBroker, queue_type: str = "classic"
                 ) -> None:
        self.amqp_url = amqp_url
        self.broker = broker
        self.queue_type = queue_type
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._returned: list[str] = []
        self._declared: set[str] = set()

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._connection = pika.BlockingConnection(
                connection_parameters_list(self.amqp_url))
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
