"""The timer hands notifications to the notifier only while the notifier's queue has room
(AFTERSALES_NOTIFIER_QUEUE_MAX_MESSAGES), on the real RabbitMQ and PostgreSQL: a backlog
waits in the table as rows not yet handed over, and none is handed over twice while its
first message still waits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pika
import pytest
from sqlalchemy import func, select

from services.intake.processor import IntakeProcessor
from services.timer.loop import Timer
from shared.amqp import NOTIFIER_QUEUE, make_broker
from shared.db.models import NotificationRow
from shared.db.notifications import NotificationStatus
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from shared.publisher import ConfirmedPublisher

pytestmark = pytest.mark.integration


def _opened(n: int) -> bytes:
    at = datetime.now(UTC) - timedelta(hours=1)
    return json.dumps({
        "event_id": f"qb-e{n}", "type": "case.opened", "occurred_at": at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": f"O{n}", "case_id": f"AS-QB{n}",
        "data": {"kind": "exchange", "amount_fen": 12900, "reason": "尺码不合适",
                 "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"}},
    }).encode()


def _by_status(db: Database) -> dict[str, int]:
    with db.transaction() as s:
        return {str(status): int(n) for status, n in s.execute(
            select(NotificationRow.status, func.count()).group_by(NotificationRow.status))}


@pytest.fixture
def publisher(amqp_url: str, amqp: object) -> Iterator[ConfirmedPublisher]:
    broker = make_broker(amqp_url)
    try:
        yield ConfirmedPublisher(broker)
    finally:
        broker.close()


def test_a_full_notifier_queue_keeps_the_backlog_in_the_table(
        db: Database, amqp_url: str, publisher: ConfirmedPublisher) -> None:
    policy = NotificationPolicy.load(None)
    intake = IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)), policy,
                             {"emails": [], "phones": []}, 64 * 1024)
    assert all(h.outcome == "accepted" for h in intake.process(
        [_opened(n) for n in range(8)]).handled)
    written = sum(_by_status(db).values())
    assert written >= 6, "each opened case tells its merchant"

    # One notification per message, at most three messages waiting in the queue.
    timer = Timer(db, publisher, batch=100, redispatch_after=0.0, max_rate=1000,
                  message_size=1, notifier_queue_max=3)
    assert timer.tick().notifications == 3
    assert publisher.waiting(NOTIFIER_QUEUE) == 3
    assert _by_status(db) == {NotificationStatus.QUEUED: 3,
                              NotificationStatus.NEW: written - 3}

    # Full: nothing more is handed over, and the queued rows are not handed over again
    # although they are older than the redispatch time (0 s here).
    assert timer.tick().notifications == 0
    assert publisher.waiting(NOTIFIER_QUEUE) == 3

    # The notifier takes two messages: room for two more.
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for _ in range(2):
            method, _props, _body = channel.basic_get(NOTIFIER_QUEUE, auto_ack=True)
            assert method is not None
    finally:
        connection.close()
    assert publisher.waiting(NOTIFIER_QUEUE) == 1
    assert timer.tick().notifications == 2
    assert publisher.waiting(NOTIFIER_QUEUE) == 3
    assert _by_status(db)[NotificationStatus.NEW] == written - 5
