"""Publishing a batch with publisher confirms, all messages in flight at once.

RabbitMQ confirms each message once it has taken responsibility for it (for a persistent
message on a durable queue: written to disk, or to a quorum of replicas); a `basic.nack`
or a lost connection means it may not have. Unlike an AMQP transaction, this promises
nothing across queues and asks for nothing of the kind: the caller treats a batch as
delivered only when every message of it was confirmed, and otherwise publishes it again
(the consumer deduplicates on the message id).

pika's blocking channel waits for each confirm before the next publish (one round trip
and one disk flush per message). This publishes the whole batch on pika's asynchronous
channel underneath the blocking connection and then waits for the confirms, so a batch
costs one wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import pika
import pika.exceptions
from pika.frame import Method

from shared.amqp import (
    DECISIONS_EXCHANGE,
    UNROUTED_QUEUE,
    AftersalesBroker,
    connection_parameters_list,
    declare_topology,
)

log = logging.getLogger(__name__)

Message = tuple[str, str, bytes, str, "dict[str, Any] | None"]


class NotConfirmed(pika.exceptions.AMQPError):
    """RabbitMQ refused (nack) or did not confirm a message in time: publish again."""


class PartlyConfirmed(Exception):
    """The batch failed part-way (the broker went away); `confirmed` are the positions in
    the batch RabbitMQ had confirmed before: those need not be published again."""

    def __init__(self, cause: BaseException, confirmed: list[int]) -> None:
        super().__init__(f"{len(confirmed)} confirmed before: {cause!r}")
        self.cause = cause
        self.confirmed = confirmed


class ConfirmedBatchPublisher:
    """(exchange, routing_key, body, message_id, headers) batches, each returned from only
    when RabbitMQ confirmed every message (`mandatory`: an unroutable one is an error).
    Dramatiq queues ("" exchange) are declared through the Dramatiq broker first, with the
    arguments its workers expect."""

    def __init__(self, amqp_url: str, broker: AftersalesBroker, queue_type: str = "classic",
                 confirm_timeout: float = 30.0, topology_queues: Iterable[str] = ()) -> None:
        self.amqp_url = amqp_url
        self.broker = broker
        self.queue_type = queue_type
        self.confirm_timeout = confirm_timeout
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None  # pika.channel.Channel (asynchronous) under the blocking one
        self._next_tag = 1
        self._unconfirmed: set[int] = set()
        self._acked: set[int] = set()
        self._nacked = 0
        self._returned: list[tuple[Any, pika.BasicProperties, bytes]] = []
        self._returned_ids: set[str] = set()  # message ids that came back in this batch
        # Queues `declare_topology` declares (e.g. aftersales.events.rejected): published to
        # through the default exchange, but not Dramatiq's to declare.
        self._declared: set[str] = set(topology_queues)

    def _on_confirm(self, frame: Method) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        done = {t for t in self._unconfirmed if t <= tag} if method.multiple else {tag}
        self._unconfirmed -= done
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked += len(done)
        else:
            self._acked |= done
        if not self._unconfirmed and self._connection is not None:
            # The blocking connection does not count frames handled by the channel
            # underneath as events; a callback of its own ends its wait at once.
            self._connection.add_callback_threadsafe(lambda: None)

    def _on_return(self, _channel: Any, method: Any, props: pika.BasicProperties,
                   body: bytes) -> None:
        self._returned.append((method, props, body))
        self._returned_ids.add(props.message_id)

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._connection = pika.BlockingConnection(connection_parameters_list(self.amqp_url))
            blocking = self._connection.channel()
            declare_topology(blocking, self.queue_type)
            channel = blocking._impl  # the asynchronous channel the blocking one drives
            channel.add_on_return_callback(self._on_return)
            selected: list[bool] = []
            channel.confirm_delivery(ack_nack_callback=self._on_confirm,
                                     callback=lambda _frame: selected.append(True))
            self._wait(lambda: bool(selected), "confirm.select-ok")
            self._channel = channel
            self._next_tag = 1
            self._unconfirmed.clear()
        return self._channel

    def _wait(self, done: Any, what: str) -> None:
        assert self._connection is not None
        give_up = time.monotonic() + self.confirm_timeout
        while not done():
            left = give_up - time.monotonic()
            if left <= 0:
                raise NotConfirmed(f"no {what} from RabbitMQ in {self.confirm_timeout}s")
            # Returns as soon as frames arrived (with a time limit it would wait all of
            # it); the timer bounds the wait when nothing comes.
            wake = self._connection.call_later(min(left, 1.0), lambda: None)
            try:
                self._connection.process_data_events(time_limit=None)
            finally:
                self._connection.remove_timeout(wake)

    def publish_batch(self, messages: list[Message]) -> None:
        """All confirmed, or an exception: `PartlyConfirmed` when the connection failed
        with some of the batch confirmed (the others may or may not have reached
        RabbitMQ: publish them again), else nothing of the batch is known to be there."""
        first_tag = 0
        try:
            for exchange, routing_key, _b, _m, _h in messages:
                if exchange == "" and routing_key not in self._declared:
                    self.broker.declare_queue(routing_key, ensure=True)
                    self._declared.add(routing_key)
            channel = self._open()
            self._returned.clear()
            self._returned_ids.clear()
            self._nacked = 0
            self._acked.clear()
            first_tag = self._next_tag
            for exchange, routing_key, body, message_id, headers in messages:
                self._publish(channel, exchange, routing_key, body, pika.BasicProperties(
                    delivery_mode=2, content_type="application/json",
                    message_id=message_id, headers=headers or None))
            self._wait(lambda: not self._unconfirmed, "publisher confirm")
            if self._returned and not self._nacked:
                self._keep_unrouted(channel)
        except (pika.exceptions.AMQPError, OSError) as exc:
            # Confirmed and not returned unrouted: a returned message is confirmed too,
            # but it is only safe once it is in the unrouted queue.
            confirmed = sorted(
                t - first_tag for t in self._acked
                if 0 <= t - first_tag < len(messages)
                and messages[t - first_tag][3] not in self._returned_ids) if first_tag else []
            self.close()
            if confirmed:
                raise PartlyConfirmed(exc, confirmed) from exc
            raise
        if self._nacked:
            raise NotConfirmed(f"RabbitMQ refused {self._nacked} messages (basic.nack)")

    def _publish(self, channel: Any, exchange: str, routing_key: str, body: bytes,
                 properties: pika.BasicProperties) -> None:
        channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                              properties=properties, mandatory=True)
        self._unconfirmed.add(self._next_tag)
        self._next_tag += 1

    def _keep_unrouted(self, channel: Any) -> None:
        """Decisions that came back unrouted go to the unrouted queue, unchanged but for
        an `x-unrouted-reason` header, confirmed like the batch. Normally the
        alternate-exchange policy (shared/broker_policy.py) routes them there itself and
        none come back; this is for a broker without the policy. Anything else that came
        back is a bug in the topology: an error."""
        returned, self._returned = self._returned, []
        others = [f"{m.exchange}/{m.routing_key}: {m.reply_text}" for m, _p, _b in returned
                  if m.exchange != DECISIONS_EXCHANGE]
        kept = 0
        for method, props, body in returned:
            if method.exchange != DECISIONS_EXCHANGE:
                continue
            props.headers = {**(props.headers or {}),
                             "x-unrouted-reason": method.reply_text,
                             "x-original-exchange": method.exchange,
                             "x-original-routing-key": method.routing_key}
            self._publish(channel, "", UNROUTED_QUEUE, body, props)
            kept += 1
        self._wait(lambda: not self._unconfirmed, "publisher confirm")
        if kept:
            log.warning("%d decisions had no queue bound and no alternate exchange: kept "
                        "in %s (apply the broker policy: aftersales broker policy)",
                        kept, UNROUTED_QUEUE)
        if self._returned:  # the unrouted queue itself is missing
            others += [f"{m.exchange}/{m.routing_key}: {m.reply_text}"
                       for m, _p, _b in self._returned]
        if others:
            raise pika.exceptions.UnroutableError(others)

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass
        self._connection = None
        self._channel = None
        self._unconfirmed.clear()
        self._acked.clear()
