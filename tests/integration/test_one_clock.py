"""The resolver decides by the database's clock; a deadline that is not due by that clock
goes back to the timer (pending), never recorded stale."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text

from services.intake.processor import IntakeProcessor
from services.resolver.resolve import Resolver
from shared.db.models import DeadlineRow
from shared.db.session import Database, db_now
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy

pytestmark = pytest.mark.integration

OPS = {"emails": [], "phones": []}


@pytest.fixture
def policy() -> NotificationPolicy:
    return NotificationPolicy.load(None)


def open_case(db: Database, engine: Engine, policy: NotificationPolicy, case_id: str,
              due_at: datetime) -> int:
    IntakeProcessor(db, engine, policy, OPS, 64 * 1024).process([json.dumps({
        "event_id": f"{case_id}-open", "type": "case.opened",
        "occurred_at": datetime.now(UTC).isoformat(), "platform": "kuaishou",
        "shop_id": "S1", "order_id": "O1", "case_id": case_id, "due_at": due_at.isoformat(),
        "data": {"kind": "exchange", "amount_fen": 100,
                 "buyer": {"phone": "13800000000"}, "merchant": {"email": "s@example.com"}},
    }).encode()])
    with db.transaction() as s:
        return int(s.execute(select(DeadlineRow.id).where(
            DeadlineRow.case_id == case_id, DeadlineRow.purpose == "deadline")).scalar_one())


def test_not_due_by_the_database_clock_goes_back_to_pending(
    db: Database, policy: NotificationPolicy
) -> None:
    engine = Engine(RuleBook.load(None), WorkCalendar(None))
    with db.transaction() as s:
        db_time = db_now(s)
    deadline_id = open_case(db, engine, policy, "CLOCK-1", db_time + timedelta(minutes=5))
    # As if a timer had dispatched it (a database clock stepped back, a bug elsewhere).
    with db.transaction() as s:
        s.execute(text("UPDATE deadlines SET status = 'dispatched' WHERE id = :i"),
                  {"i": deadline_id})
    # Even a resolver whose own clock says the deadline is long past.
    batch = Resolver(db, engine, policy, OPS).fire_many([deadline_id])
    assert [r.outcome for r in batch.resolutions] == ["early"]
    with db.transaction() as s:
        status = s.execute(select(DeadlineRow.status).where(
            DeadlineRow.id == deadline_id)).scalar_one()
    assert status == "pending"  # the timer hands it over again when it is due


def test_due_by_the_database_clock_fires(db: Database, policy: NotificationPolicy) -> None:
    engine = Engine(RuleBook.load(None), WorkCalendar(None))
    with db.transaction() as s:
        db_time = db_now(s)
    deadline_id = open_case(db, engine, policy, "CLOCK-2", db_time - timedelta(seconds=1))
    batch = Resolver(db, engine, policy, OPS).fire_many([deadline_id])
    assert [r.outcome for r in batch.resolutions] == ["fired"]
    assert [d.type for d in batch.stored.decisions] == ["decision.auto_approved"]
