"""The rejected queue is bounded by the shipped broker policy (deploy/rabbitmq/policies.sh):
also a queue declared before the policy existed, and without touching its arguments."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from shared.amqp import REJECTED_QUEUE, declare_topology
from tests.conftest import VHOST, wait_for
from tests.resources import own_vhost

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLICY_VHOST = f"{VHOST}-policy"  # its own: the limits here are tiny


@pytest.fixture
def channel() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    with own_vhost(POLICY_VHOST) as url:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        yield connection.channel()
        connection.close()


def test_the_policy_bounds_an_already_declared_rejected_queue(
        channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
    declare_topology(channel)  # as a running deployment has it, before the policy
    applied = subprocess.run(
        ["sh", str(ROOT / "deploy/rabbitmq/policies.sh"), POLICY_VHOST],
        env={**os.environ, "AFTERSALES_REJECTED_MAX_LENGTH": "3",
             "AFTERSALES_REJECTED_TTL_DAYS": "14"}, capture_output=True, text=True, timeout=60)
    assert applied.returncode == 0, applied.stderr
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_operator_policies", "-p", POLICY_VHOST],
        capture_output=True, text=True, timeout=60).stdout
    line = next(x for x in listed.splitlines() if "aftersales-rejected-bounded" in x)
    assert "1209600000" in line and "536870912" in line  # 14 days in ms, 512 MiB

    # It takes effect on the queue declared before it: the oldest messages are dropped.
    for i in range(5):
        channel.basic_publish("", REJECTED_QUEUE, f"rejected {i}".encode())
    wait_for(lambda: channel.queue_declare(REJECTED_QUEUE, passive=True)
             .method.message_count == 3, what="the queue at its max length")
    kept = []
    while (got := channel.basic_get(REJECTED_QUEUE, auto_ack=True))[0] is not None:
        kept.append(got[2])
    assert kept == [b"rejected 2", b"rejected 3", b"rejected 4"]  # the oldest went
