"""Quorum mode (AFTERSALES_QUEUE_TYPE=quorum) on the real RabbitMQ: every queue the system
declares is a quorum queue, and a poison message (one whose consumer dies or returns it
every time) is dead-lettered after the delivery limit: neither dropped nor redelivered for
ever. A quorum queue works on one node too, so this runs on the shared broker, in a vhost
of its own (the other tests declare the same queue names as classic queues)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import dramatiq
import pika
import pika.exceptions
import pytest

from services.ops.held import KINDS, depths, list_held
from shared.amqp import (
    DELIVERY_LIMIT,
    EVENTS_EXCHANGE,
    FIRE_DEADLINE_ACTOR,
    INTAKE_QUEUE,
    NOTIFIER_QUEUE,
    OUTBOX_LEDGER_QUEUE,
    REJECTED_QUEUE,
    RESOLVER_QUEUE,
    UNROUTED_QUEUE,
    declare_topology,
    make_broker,
)
from tests.conftest import AMQP_HOST, RUN_ID

pytestmark = pytest.mark.integration


def _ctl(*args: str) -> str:
    ctl = shutil.which("rabbitmqctl")
    assert ctl, "rabbitmqctl not found"
    return subprocess.run([ctl, "-q", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture
def quorum_url() -> Iterator[str]:
    vhost = f"aftersales-test-{RUN_ID}-quorum-{uuid.uuid4().hex[:4]}"
    _ctl("add_vhost", vhost)
    try:
        _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{AMQP_HOST}:5672/{quote(vhost, safe='')}"
    finally:
        _ctl("delete_vhost", vhost)


def _queue_types(url: str) -> dict[str, str]:
    vhost = pika.URLParameters(url).virtual_host
    out = _ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "type")
    return dict(line.split("\t")[:2] for line in out.strip().splitlines())


def test_every_queue_of_the_system_is_a_quorum_queue(quorum_url: str) -> None:
    broker = make_broker(quorum_url, "quorum")
    try:
        for queue in (RESOLVER_QUEUE, NOTIFIER_QUEUE):
            broker.declare_queue(queue, ensure=True)
        declare_topology(broker.channel, "quorum")
    finally:
        broker.close()
    types = _queue_types(quorum_url)
    expected = {INTAKE_QUEUE, REJECTED_QUEUE, UNROUTED_QUEUE, OUTBOX_LEDGER_QUEUE}
    for queue in (RESOLVER_QUEUE, NOTIFIER_QUEUE):
        expected |= {queue, f"{queue}.DQ", f"{queue}.XQ"}
    assert set(types) == expected
    assert set(types.values()) == {"quorum"}, types


def _deliver_until_gone(channel: pika.adapters.blocking_connection.BlockingChannel,
                        queue: str) -> int:
    """Take the queue's one message and give it back, as a consumer dying on it would,
    until RabbitMQ stops delivering it. Returns how often it was delivered."""
    deliveries = 0
    while True:
        method, _props, _body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return deliveries
        deliveries += 1
        assert deliveries <= DELIVERY_LIMIT + 1, "redelivered past the delivery limit"
        channel.basic_nack(method.delivery_tag, requeue=True)


def _wait_for_message(channel: pika.adapters.blocking_connection.BlockingChannel,
                      queue: str) -> tuple[pika.BasicProperties, bytes]:
    from tests.conftest import wait_for

    got: list[tuple[pika.BasicProperties, bytes]] = []

    def arrived() -> bool:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            got.append((props, body))
        return bool(got)

    wait_for(arrived, timeout=30, what=f"the poison message in {queue}")
    return got[0]


def test_a_poison_dramatiq_message_ends_in_the_dead_letter_queue(quorum_url: str) -> None:
    broker = make_broker(quorum_url, "quorum")
    try:
        broker.declare_queue(RESOLVER_QUEUE, ensure=True)
        message: dramatiq.Message[object] = dramatiq.Message(
            queue_name=RESOLVER_QUEUE, actor_name=FIRE_DEADLINE_ACTOR, args=([1, 2],),
            kwargs={}, options={})
        channel = broker.channel
        channel.basic_publish("", RESOLVER_QUEUE, message.encode(),
                              pika.BasicProperties(delivery_mode=2))
        deliveries = _deliver_until_gone(channel, RESOLVER_QUEUE)
        props, body = _wait_for_message(channel, f"{RESOLVER_QUEUE}.XQ")
    finally:
        broker.close()
    # The first delivery and DELIVERY_LIMIT returns (RabbitMQ 3.x counts from 0).
    assert DELIVERY_LIMIT <= deliveries <= DELIVERY_LIMIT + 1
    assert body == message.encode()  # unchanged, for ops to look at or send again
    death = (props.headers or {})["x-death"][0]
    assert (death["queue"], death["reason"]) == (RESOLVER_QUEUE, "delivery_limit")


def test_a_poison_event_ends_in_the_rejected_queue(quorum_url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(quorum_url))
    try:
        channel = connection.channel()
        declare_topology(channel, "quorum")
        channel.confirm_delivery()
        body = b'{"event_id": "poison", "type": "case.opened"}'
        channel.basic_publish(EVENTS_EXCHANGE, "case.opened", body,
                              pika.BasicProperties(delivery_mode=2), mandatory=True)
        deliveries = _deliver_until_gone(channel, INTAKE_QUEUE)
        props, rejected = _wait_for_message(channel, REJECTED_QUEUE)
    finally:
        connection.close()
    assert DELIVERY_LIMIT <= deliveries <= DELIVERY_LIMIT + 1
    assert rejected == body
    assert (props.headers or {})["x-first-death-reason"] == "delivery_limit"


def test_the_ops_tools_read_held_queues_of_quorum_mode(quorum_url: str) -> None:
    """`aftersales rejected|unrouted` and the console declare the queues as the services
    do: in quorum mode a classic declaration would be refused (406) and the console would
    show RabbitMQ as unreachable."""
    connection = pika.BlockingConnection(pika.URLParameters(quorum_url))
    try:
        channel = connection.channel()
        declare_topology(channel, "quorum")
        channel.confirm_delivery()
        channel.basic_publish("", REJECTED_QUEUE, b'{"not": "an event"}', pika.BasicProperties(
            delivery_mode=2, headers={"x-reject-reason": "invalid_event"}), mandatory=True)
    finally:
        connection.close()
    assert depths(quorum_url, "quorum") == {"rejected": 1, "unrouted": 0}
    found, total = list_held(quorum_url, KINDS["rejected"], queue_type="quorum")
    assert total == 1 and [m.reason for m in found] == ["invalid_event"]
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        depths(quorum_url)  # declared as classic queues
