"""The outbox relay on the real RabbitMQ and PostgreSQL: every decision reaches
`aftersales.decisions` exactly once, including when the relay dies between RabbitMQ's
commit and PostgreSQL's, and only one relay publishes at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.resolver.outbox import OutboxRelay
from shared.amqp import DECISIONS_EXCHANGE, OUTBOX_LEDGER_QUEUE, make_broker
from shared.db.models import OutboxRow
from shared.db.session import Database
from shared.publisher import BatchPublisher
from tests.conftest import wait_for
from tests.harness import ROOT, DecisionTap


class CrashAfterBrokerCommit(Exception):
    """Stands for the relay dying after RabbitMQ committed and before PostgreSQL did."""


class CrashingPublisher(BatchPublisher):
    """The real publisher, failing once, before or after the broker's commit."""

    def __init__(self, amqp_url: str, when: str) -> None:
        super().__init__(amqp_url, make_broker(amqp_url))
        self.when = when

    def publish_batch(self, messages: Any, receipt: Any = None) -> None:
        if self.when == "before":
            self.when = ""
            raise ConnectionError("broker went away before the commit")
        super().publish_batch(messages, receipt)
        if self.when == "after":
            self.when = ""
            raise CrashAfterBrokerCommit


def add_decisions_in(session: Session, n: int) -> set[str]:
    ids = {str(uuid.uuid4()) for _ in range(n)}
    session.add_all([
        OutboxRow(exchange=DECISIONS_EXCHANGE, routing_key="decision.auto_approved",
                  message_id=i, body=json.dumps({"decision_id": i}).encode(), headers={})
        for i in sorted(ids)
    ])
    return ids


def add_decisions(db: Database, n: int) -> set[str]:
    with db.transaction() as s:
        return add_decisions_in(s, n)


def outbox_size(db: Database) -> int:
    with db.transaction() as s:
        return int(s.execute(select(func.count()).select_from(OutboxRow)).scalar_one())


def ledger_depth(amqp: Any) -> int:
    return int(amqp.queue_declare(OUTBOX_LEDGER_QUEUE, passive=True).method.message_count)


def relay(db: Database, amqp_url: str, publisher: BatchPublisher | None = None,
          batch: int = 200) -> OutboxRelay:
    return OutboxRelay(db, publisher or BatchPublisher(amqp_url, make_broker(amqp_url)), batch)


def drain(r: OutboxRelay) -> int:
    total = 0
    while published := r.relay_once():
        total += len(published)
    return total


@pytest.fixture
def tap(amqp: Any, amqp_url: str) -> Iterator[DecisionTap]:
    with DecisionTap(amqp_url) as t:
        yield t


def published_ids(tap: DecisionTap) -> Counter[str]:
    return Counter(m["decision_id"] for m in tap.catch_up())


def test_every_row_is_published_once_and_the_ledger_is_emptied(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 450)
    r = relay(db, amqp_url)
    assert drain(r) == 450
    assert outbox_size(db) == 0
    assert published_ids(tap) == Counter(ids)
    assert ledger_depth(amqp) == 0  # the idle call took the receipts off
    r.close()


def test_a_relay_dying_after_the_broker_commit_does_not_publish_again(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 300)
    crashing = relay(db, amqp_url, CrashingPublisher(amqp_url, "after"), batch=200)
    with pytest.raises(CrashAfterBrokerCommit):
        crashing.relay_once()
    # PostgreSQL rolled back: the 200 rows RabbitMQ has are still in the table.
    assert outbox_size(db) == 300
    assert ledger_depth(amqp) == 1
    crashing.close()

    restarted = relay(db, amqp_url)
    assert drain(restarted) == 100  # only the rows RabbitMQ did not have
    assert outbox_size(db) == 0
    counts = published_ids(tap)
    assert counts == Counter(ids)  # each exactly once
    restarted.close()


def test_the_same_relay_reconciles_before_publishing_again(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 150)
    r = relay(db, amqp_url, CrashingPublisher(amqp_url, "after"), batch=100)
    with pytest.raises(CrashAfterBrokerCommit):
        r.relay_once()
    assert drain(r) == 50  # the poll loop calls it again after a failure
    assert published_ids(tap) == Counter(ids)
    r.close()


def test_a_failure_before_the_broker_commit_publishes_the_batch_later(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 120)
    r = relay(db, amqp_url, CrashingPublisher(amqp_url, "before"), batch=100)
    with pytest.raises(ConnectionError):
        r.relay_once()
    assert outbox_size(db) == 120 and ledger_depth(amqp) == 0
    assert drain(r) == 120
    assert published_ids(tap) == Counter(ids)
    r.close()


def test_only_one_relay_publishes_at_a_time(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    add_decisions(db, 10)
    leader, standby = relay(db, amqp_url, batch=5), relay(db, amqp_url, batch=5)
    assert len(leader.relay_once()) == 5
    assert standby.relay_once() == []  # stands by while the leader's session lives
    assert outbox_size(db) == 5
    leader.close()  # a dead relay's session ends, and its lock with it
    assert drain(standby) == 5
    assert len(published_ids(tap)) == 10
    standby.close()


def test_a_stale_receipt_never_deletes_a_different_row(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 3)
    with db.transaction() as s:
        first = s.execute(select(OutboxRow.id).order_by(OutboxRow.id)).scalars().first()
    # A receipt naming the same outbox id with another message id (a recreated database).
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(OUTBOX_LEDGER_QUEUE, durable=True)
    channel.basic_publish("", OUTBOX_LEDGER_QUEUE,
                          json.dumps({"rows": [[first, "not-this-one"]]}).encode())
    connection.close()
    r = relay(db, amqp_url)
    assert drain(r) == 3
    assert published_ids(tap) == Counter(ids)
    r.close()


RELAY_KILLED_AFTER_BROKER_COMMIT = """
import signal, sys
from services.resolver.outbox import OutboxRelay
from shared.amqp import make_broker
from shared.db.session import Database, make_engine
from shared.publisher import BatchPublisher

class Stalls(BatchPublisher):
    def publish_batch(self, messages, receipt=None):
        super().publish_batch(messages, receipt)
        print("committed", flush=True)  # RabbitMQ has the batch; PostgreSQL does not know
        signal.pause()  # here until the test SIGKILLs this process

db_url, amqp_url = sys.argv[1:3]
OutboxRelay(Database(make_engine(db_url)), Stalls(amqp_url, make_broker(amqp_url)),
            batch=100).relay_once()
"""


def test_a_relay_process_killed_after_the_broker_commit_publishes_nothing_twice(
    db: Database, database_url: str, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 150)
    proc = subprocess.Popen(
        [sys.executable, "-c", RELAY_KILLED_AFTER_BROKER_COMMIT, database_url, amqp_url],
        cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"committed"
    finally:
        proc.kill()  # SIGKILL: its PostgreSQL session, and with it the lock, ends
        proc.wait()
    assert outbox_size(db) == 150  # its transaction never committed
    successor = relay(db, amqp_url)
    wait_for(lambda: drain(successor) >= 0 and outbox_size(db) == 0, timeout=30,
             what="the successor to take over and drain the outbox")
    assert published_ids(tap) == Counter(ids)
    successor.close()


def test_a_row_committed_late_with_a_lower_id_is_still_published(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    r = relay(db, amqp_url, batch=1)
    with db.transaction() as slow:  # a resolver transaction that commits late
        late = add_decisions_in(slow, 1)
        slow.flush()  # its row has its id (lower) before the next one is written
        early = add_decisions(db, 1)
        assert r.relay_once() == ["decision.auto_approved"]  # the higher id, committed
    # The relay went past the late row's id while it was invisible; it comes back for it.
    assert drain(r) + drain(r) == 1
    assert published_ids(tap) == Counter(late | early)
    r.close()
