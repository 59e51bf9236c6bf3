"""The publisher of `aftersales simulate` (and of the benchmarks).

pika's `SelectConnection` with publisher confirms, many messages in flight (a window),
acknowledged asynchronously: waiting for each confirm in turn
(`BlockingChannel.confirm_delivery` + `basic_publish`) is too slow to offer a benchmark's
load (figures in docs/benchmarks.md), and every message is still confirmed (nacks and
returns are counted and reported). The topology is `shared.amqp.topology`, declared
asynchronously.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aftersales_cli.simulate.generator import Message
from shared.amqp import declare_topology_async


class ConfirmedStreamPublisher:
    """Publishes a paced stream with publisher confirms, many messages in flight.

    `feed(n)` returns up to n messages to publish now, or None when the stream is over.
    Runs pika's SelectConnection I/O loop in the calling thread until every published
    message is confirmed (or `confirm_timeout` passes after the end)."""

    def __init__(self, amqp_url: str, window: int = 2000, queue_type: str = "classic",
                 on_tick: Callable[[ConfirmedStreamPublisher], None] | None = None,
                 tick_seconds: float = 1.0, confirm_timeout: float = 30.0,
                 exchange: str = "aftersales.events", declare: bool = True) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.declare = declare
        self.window = window
        self.queue_type = queue_type
        self.on_tick = on_tick
        self.tick_seconds = tick_seconds
        self.confirm_timeout = confirm_timeout
        self.published = 0
        self.confirmed = 0
        self.nacked = 0
        self.returned = 0
        self.error: str | None = None
        self._unconfirmed: dict[int, None] = {}
        self._next_tag = 1
        self._feed: Callable[[int], list[Message] | None] = lambda n: None
        self._done_feeding = False
        self._ended_at = 0.0
        self._conn: Any = None
        self._channel: Any = None

    def run(self, feed: Callable[[int], list[Message] | None]) -> None:
        import pika

        from shared.amqp import connection_parameters_list

        self._feed = feed
        self._conn = pika.SelectConnection(
            connection_parameters_list(self.amqp_url)[0],  # a random node of the list
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=lambda _c, reason: self._conn.ioloop.stop(),
        )
        self._conn.ioloop.start()
        if self.error:
            raise RuntimeError(self.error)

    def _on_open_error(self, _conn: Any, exc: BaseException) -> None:
        self.error = f"cannot connect to RabbitMQ: {exc}"
        self._conn.ioloop.stop()

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        def confirm_mode() -> None:
            channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._start())

        # declare the topology as `aftersales publish` does (idempotent), then confirm mode
        if self.declare:
            declare_topology_async(channel, self.queue_type, confirm_mode)
        else:
            confirm_mode()

    def _on_channel_closed(self, _channel: Any, reason: Any) -> None:
        if not (self._done_feeding and not self._unconfirmed):
            self.error = f"channel closed: {reason}"
        if self._conn.is_open:
            self._conn.close()

    def _start(self) -> None:
        self._pump()
        if self.on_tick:
            self._tick()

    def _tick(self) -> None:
        if self.on_tick:
            self.on_tick(self)
        if not (self._done_feeding and not self._unconfirmed):
            self._conn.ioloop.call_later(self.tick_seconds, self._tick)

    def _pump(self) -> None:
        import pika

        if not self._done_feeding:
            room = self.window - len(self._unconfirmed)
            if room > 0:
                batch = self._feed(min(room, 500))
                if batch is None:
                    self._done_feeding = True
                    self._ended_at = time.monotonic()
                else:
                    props = pika.BasicProperties(content_type="application/json",
                                                 delivery_mode=2)
                    for msg in batch:
                        self._channel.basic_publish(self.exchange, msg.routing_key,
                                                    msg.body, props, mandatory=True)
                        self._unconfirmed[self._next_tag] = None
                        self._next_tag += 1
                        self.published += 1
        if self._done_feeding and (not self._unconfirmed or
                                   time.monotonic() - self._ended_at > self.confirm_timeout):
            if self._unconfirmed:
                self.error = f"{len(self._unconfirmed)} messages not confirmed in time"
            if self.on_tick:
                self.on_tick(self)
            self._channel.close()
            return
        self._conn.ioloop.call_later(0.002, self._pump)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        name = method.NAME.split(".")[1].lower()  # "ack" | "nack"
        tags = [method.delivery_tag]
        if method.multiple:
            tags = []
            for tag in self._unconfirmed:
                if tag > method.delivery_tag:
                    break
                tags.append(tag)
        for tag in tags:
            if self._unconfirmed.pop(tag, 0) is None:
                if name == "ack":
                    self.confirmed += 1
                else:
                    self.nacked += 1

    def _on_return(self, _channel: Any, _method: Any, _props: Any, _body: bytes) -> None:
        self.returned += 1
