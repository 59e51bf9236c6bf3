"""`aftersales.decisions` as upstream sees it, on the real broker: a consumer declaring the
exchange exactly as docs/asyncapi.yaml documents it is accepted, and a decision nobody is
bound for is kept in `aftersales.decisions.unrouted` (by the broker policy, or by the
relay when the policy is missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

from services.resolver.outbox import OutboxRelay
from shared.amqp import DECISIONS_EXCHANGE, UNROUTED_QUEUE, declare_topology, make_broker
from shared.broker_policy import POLICY_NAME, apply_with_rabbitmqctl, vhost_of
from shared.confirms import ConfirmedBatchPublisher
from shared.db.models import OutboxRow
from shared.db.session import Database

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _ctl(*args: str) -> str:
    ctl = shutil.which("rabbitmqctl")
    assert ctl, "rabbitmqctl is needed to set the vhost's policy"
    return subprocess.run([ctl, "-q", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture
def no_policy(amqp_url: str) -> Iterator[None]:
    subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", vhost_of(amqp_url), POLICY_NAME],
                   capture_output=True, timeout=60)  # absent is fine
    yield


@pytest.fixture
def policy(amqp_url: str, no_policy: None) -> Iterator[None]:
    apply_with_rabbitmqctl(amqp_url)
    yield
    _ctl("clear_policy", "-p", vhost_of(amqp_url), POLICY_NAME)


@pytest.fixture
def fresh(amqp: Any) -> Any:
    """The decisions exchange recreated by our topology, the unrouted queue empty."""
    amqp.exchange_delete(DECISIONS_EXCHANGE)
    amqp.queue_delete(UNROUTED_QUEUE)
    declare_topology(amqp)
    return amqp


def publish_through_relay(db: Database, amqp_url: str, routing_keys: list[str]) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in routing_keys]
    with db.transaction() as s:
        s.add_all([OutboxRow(exchange=DECISIONS_EXCHANGE, routing_key=key, message_id=i,
                             body=json.dumps({"decision_id": i}).encode(), headers={})
                   for key, i in zip(routing_keys, ids, strict=True)])
    relay = OutboxRelay(db, ConfirmedBatchPublisher(amqp_url, make_broker(amqp_url)), batch=100)
    try:
        while relay.relay_once():
            pass
    finally:
        relay.close()
    return ids


def drain(channel: Any, queue: str) -> list[tuple[Any, bytes]]:
    got = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return got
        got.append((props, body))


def test_a_consumer_declares_the_exchange_as_documented(fresh: Any, amqp_url: str,
                                                        policy: None) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        # exactly as docs/asyncapi.yaml documents it (406 before the fix)
        contract = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
        documented = contract["channels"]["decisions"]["bindings"]["amqp"]["exchange"]
        assert "arguments" not in documented
        channel.exchange_declare(documented["name"], exchange_type=documented["type"],
                                 durable=documented["durable"],
                                 auto_delete=documented["autoDelete"])
        channel.queue_declare("upstream.orders", durable=True)
        channel.queue_bind("upstream.orders", DECISIONS_EXCHANGE, "decision.#")
        # and our own services' declaration still agrees with it afterwards
        declare_topology(channel)
        channel.queue_delete("upstream.orders")
    finally:
        connection.close()
    listed = _ctl("list_policies", "-p", vhost_of(amqp_url))
    assert POLICY_NAME in listed and "aftersales.decisions.unrouted" in listed


def test_the_policy_keeps_unrouted_decisions_and_routes_the_others(
    fresh: Any, db: Database, amqp_url: str, policy: None
) -> None:
    fresh.queue_declare("upstream.approved", durable=True)
    fresh.queue_bind("upstream.approved", DECISIONS_EXCHANGE, "decision.auto_approved")
    try:
        routed, unrouted = publish_through_relay(
            db, amqp_url, ["decision.auto_approved", "decision.auto_closed"])
        got = drain(fresh, "upstream.approved")
        kept = drain(fresh, UNROUTED_QUEUE)
    finally:
        fresh.queue_delete("upstream.approved")
    assert [json.loads(b)["decision_id"] for _p, b in got] == [routed]
    assert [json.loads(b)["decision_id"] for _p, b in kept] == [unrouted]
    assert kept[0][0].message_id == unrouted


def test_without_the_policy_the_relay_keeps_what_comes_back(
    fresh: Any, db: Database, amqp_url: str, no_policy: None
) -> None:
    ids = publish_through_relay(db, amqp_url, ["decision.auto_closed"] * 3)
    kept = drain(fresh, UNROUTED_QUEUE)
    assert sorted(json.loads(b)["decision_id"] for _p, b in kept) == sorted(ids)
    props = kept[0][0]
    assert props.headers["x-unrouted-reason"] == "NO_ROUTE"
    assert props.headers["x-original-routing-key"] == "decision.auto_closed"
    assert props.delivery_mode == 2
