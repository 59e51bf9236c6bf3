"""The outbox relay on the real RabbitMQ and PostgreSQL: every decision reaches
`aftersales.decisions`; a row leaves the outbox only once RabbitMQ confirmed it; a relay
dying between the confirms and its commit publishes that batch again (same `decision_id`,
upstream deduplicates), and only one relay publishes at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.resolver.outbox import OutboxRelay
from shared.amqp import DECISIONS_EXCHANGE, make_broker
from shared.confirms import ConfirmedBatchPublisher
from shared.db.models import OutboxRow
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import ROOT, DecisionTap


class CrashAfterConfirms(Exception):
    """Stands for the relay dying after RabbitMQ confirmed and before PostgreSQL committed."""


class CrashingPublisher(ConfirmedBatchPublisher):
    """The real publisher, failing once, before publishing or after the confirms."""

    def __init__(self, amqp_url: str, when: str) -> None:
        super().__init__(amqp_url, make_broker(amqp_url))
        self.when = when

    def publish_batch(self, messages: Any) -> None:
        if self.when == "before":
            self.when = ""
            raise ConnectionError("broker went away before the publish")
        super().publish_batch(messages)
        if self.when == "after":
            self.when = ""
            raise CrashAfterConfirms


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


def relay(db: Database, amqp_url: str, publisher: ConfirmedBatchPublisher | None = None,
          batch: int = 200) -> OutboxRelay:
    return OutboxRelay(db, publisher or ConfirmedBatchPublisher(amqp_url, make_broker(amqp_url)),
                       batch)


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


def test_every_row_is_published_once(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 450)
    r = relay(db, amqp_url)
    assert drain(r) == 450
    assert outbox_size(db) == 0
    assert published_ids(tap) == Counter(ids)
    r.close()


def test_a_relay_dying_after_the_confirms_publishes_that_batch_again(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 300)
    crashing = relay(db, amqp_url, CrashingPublisher(amqp_url, "after"), batch=200)
    with pytest.raises(CrashAfterConfirms):
        crashing.relay_once()
    # PostgreSQL rolled back: the 200 rows RabbitMQ has are still in the table.
    assert outbox_size(db) == 300
    crashing.close()

    restarted = relay(db, amqp_url)
    assert drain(restarted) == 300
    assert outbox_size(db) == 0
    counts = published_ids(tap)
    assert set(counts) == ids  # none lost
    # The crashed batch twice, with the same decision_id (upstream deduplicates on it).
    assert sorted(Counter(counts.values()).items()) == [(1, 100), (2, 200)]
    restarted.close()


def test_a_failure_before_the_publish_publishes_the_batch_later(
    db: Database, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 120)
    r = relay(db, amqp_url, CrashingPublisher(amqp_url, "before"), batch=100)
    with pytest.raises(ConnectionError):
        r.relay_once()
    assert outbox_size(db) == 120
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
    # PostgreSQL releases the lock when the leader's backend has exited, a moment after
    # the client closed: until then the standby still stands by.
    assert wait_for(lambda: drain(standby), what="the standby to take over") == 5
    assert len(published_ids(tap)) == 10
    standby.close()


RELAY_KILLED_AFTER_CONFIRMS = """
import signal, sys
from services.resolver.outbox import OutboxRelay
from shared.amqp import make_broker
from shared.confirms import ConfirmedBatchPublisher
from shared.db.session import Database, make_engine

class Stalls(ConfirmedBatchPublisher):
    def publish_batch(self, messages):
        super().publish_batch(messages)
        print("confirmed", flush=True)  # RabbitMQ has the batch; PostgreSQL does not know
        signal.pause()  # here until the test SIGKILLs this process

db_url, amqp_url = sys.argv[1:3]
OutboxRelay(Database(make_engine(db_url)), Stalls(amqp_url, make_broker(amqp_url)),
            batch=100).relay_once()
"""


def test_a_relay_process_killed_after_the_confirms_loses_nothing(
    db: Database, database_url: str, amqp: Any, amqp_url: str, tap: DecisionTap
) -> None:
    ids = add_decisions(db, 150)
    proc = subprocess.Popen(
        [sys.executable, "-c", RELAY_KILLED_AFTER_CONFIRMS, database_url, amqp_url],
        cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"confirmed"
    finally:
        proc.kill()  # SIGKILL: its PostgreSQL session, and with it the lock, ends
        proc.wait()
    assert outbox_size(db) == 150  # its transaction never committed
    successor = relay(db, amqp_url)
    wait_for(lambda: drain(successor) >= 0 and outbox_size(db) == 0, timeout=30,
             what="the successor to take over and drain the outbox")
    counts = published_ids(tap)
    assert set(counts) == ids
    assert sum(counts.values()) - len(ids) == 100  # the killed relay's batch, again
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
