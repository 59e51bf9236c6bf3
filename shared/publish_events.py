"""`aftersales publish`: publish JSON-lines events as an upstream system would
(topic exchange `aftersales.events`, routing key = event type, persistent, confirmed)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import IO

import pika

from shared.amqp import EVENTS_EXCHANGE, connection_parameters_list, declare_topology


def routing_key_for(line: bytes) -> str:
    try:
        doc = json.loads(line)
        value = doc.get("type") if isinstance(doc, dict) else None
        return value if isinstance(value, str) and value else "unknown"
    except ValueError:
        return "unknown"


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    for raw in stream:
        line = raw.rstrip(b"\r\n")
        if line.strip():
            yield line


def publish_lines(amqp_url: str, lines: Iterable[bytes], queue_type: str = "classic") -> int:
    connection = pika.BlockingConnection(connection_parameters_list(amqp_url))
    try:
        channel = connection.channel()
        declare_topology(channel, queue_type)
        channel.confirm_delivery()  # basic_publish now returns only once RabbitMQ has it
        count = 0
        for line in lines:
            channel.basic_publish(
                exchange=EVENTS_EXCHANGE,
                routing_key=routing_key_for(line),
                body=line,
                properties=pika.BasicProperties(
                    content_type="application/json", delivery_mode=2
                ),
                mandatory=True,
            )
            count += 1
        return count
    finally:
        connection.close()


def publish_file(amqp_url: str, path: str, queue_type: str = "classic") -> int:
    """Every line is published as it is: validating is intake's job, as in production."""
    if path == "-":
        return publish_lines(amqp_url, _lines(sys.stdin.buffer), queue_type)
    with open(path, "rb") as stream:
        return publish_lines(amqp_url, _lines(stream), queue_type)
