"""kill -9 of RabbitMQ while the outbox relay publishes, again and again: no decision is
lost. Counted independently, on a durable queue of our own bound to
`aftersales.decisions` on a RabbitMQ node of the test's own (the shared broker is never
touched). Repeats on the wire (a batch confirmed but not yet deleted when the broker
died) are measured and reported; upstream deduplicates them on `decision_id`."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from sqlalchemy import func, select

from services.resolver.outbox import OutboxRelay
from shared.amqp import DECISIONS_EXCHANGE, declare_topology, make_broker
from shared.confirms import ConfirmedBatchPublisher
from shared.db.models import OutboxRow
from shared.db.session import Database
from tests.conftest import wait_for
from tests.rabbit_node import RabbitNode

pytestmark = pytest.mark.e2e

COUNT_QUEUE = "test.outbox-kill.count"
KILLS = 3


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RabbitNode]:
    n = RabbitNode(tmp_path / "rabbit")
    n.start()
    try:
        yield n
    finally:
        n.stop()


def bind_count_queue(url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    declare_topology(channel)
    channel.queue_declare(COUNT_QUEUE, durable=True)
    channel.queue_bind(COUNT_QUEUE, DECISIONS_EXCHANGE, "#")
    connection.close()


def drain_count_queue(url: str) -> list[str]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    out: list[str] = []
    while True:
        method, _props, body = channel.basic_get(COUNT_QUEUE, auto_ack=True)
        if method is None:
            break
        out.append(json.loads(body)["decision_id"])
    connection.close()
    return out


class WatchedPublisher(ConfirmedBatchPublisher):
    """The real publisher; tells the test when a batch is on the wire."""

    def __init__(self, url: str) -> None:
        super().__init__(url, make_broker(url), confirm_timeout=10)
        self.in_flight = threading.Event()
        self.batches = 0
        self.failed_in_flight = 0

    def publish_batch(self, messages: Any) -> None:
        self.in_flight.set()
        try:
            super().publish_batch(messages)
            self.batches += 1
        except Exception:
            self.failed_in_flight += 1
            raise
        finally:
            self.in_flight.clear()


def outbox_size(db: Database) -> int:
    with db.transaction() as s:
        return int(s.execute(select(func.count()).select_from(OutboxRow)).scalar_one())


@pytest.mark.timeout(600)
def test_kill_9_of_rabbitmq_during_the_relays_publishes_loses_no_decision(
    db: Database, node: RabbitNode
) -> None:
    bind_count_queue(node.url)
    publisher = WatchedPublisher(node.url)
    relay = OutboxRelay(db, publisher, batch=200)
    stop = threading.Event()
    writing = threading.Event()
    writing.set()
    expected: list[str] = []
    relay_rounds = [0]  # relay_once calls that went through

    def write() -> None:  # the resolvers: decisions keep coming while the broker dies
        while writing.is_set():
            ids = [str(uuid.uuid4()) for _ in range(50)]
            with db.transaction() as s:
                s.add_all([OutboxRow(
                    exchange=DECISIONS_EXCHANGE, routing_key="decision.auto_approved",
                    message_id=i, body=json.dumps({"decision_id": i}).encode(), headers={})
                    for i in ids])
            expected.extend(ids)
            time.sleep(0.05)  # a steady stream, not a condition to await

    def run_relay() -> None:
        while not stop.is_set():
            try:
                if len(relay.relay_once()) < relay.batch:
                    time.sleep(0.02)
                relay_rounds[0] += 1
            except Exception:  # the broker is away: as the poll loop does, try again
                time.sleep(0.2)

    writer = threading.Thread(target=write)
    relayer = threading.Thread(target=run_relay)
    writer.start()
    relayer.start()
    kills_in_flight = 0
    try:
        for _ in range(KILLS):
            wait_for(publisher.in_flight.is_set, timeout=60, interval=0.001,
                     what="a batch on the wire")
            kills_in_flight += publisher.in_flight.is_set()
            node.kill9()
            node.start()
            done = relay_rounds[0]
            wait_for(lambda d=done: relay_rounds[0] > d, timeout=60,
                     what="the relay working again after the restart")
        writing.clear()
        writer.join(60)
        wait_for(lambda: outbox_size(db) == 0, timeout=120, what="the outbox to drain")
    finally:
        writing.clear()
        stop.set()
        relayer.join(30)
        relay.close()
    seen = drain_count_queue(node.url)
    counts = Counter(seen)
    lost = len(set(expected) - set(counts))
    print(f"\n[fault report] rabbitmq kill -9 during relay publishes: decisions={len(expected)}, "
          f"kills={KILLS}, kills_with_batch_in_flight={kills_in_flight}, "
          f"batches_failed={publisher.failed_in_flight}, on_wire={len(seen)}, "
          f"lost={lost}, duplicates={len(seen) - len(counts)}")
    assert len(expected) >= 1000
    assert kills_in_flight == KILLS, "a kill missed the relay's work: the test proved nothing"
    assert publisher.failed_in_flight >= 1
    assert lost == 0
    assert set(counts) == set(expected)
