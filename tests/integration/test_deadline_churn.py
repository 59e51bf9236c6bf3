"""Applying an event changes only the deadlines that change (issue 19, 'less churn'), on
PostgreSQL: a deadline the event leaves as it was keeps its row, moved to the case's new
version (so it still fires); a changed one is deleted and replaced."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from services.intake.processor import IntakeProcessor
from services.resolver.resolve import NO_SUCH_ROW, Resolver
from shared.db.deadlines import SqlDeadlines
from shared.db.models import CaseRow, DeadlineRow, DecisionRow
from shared.db.session import Database, db_now
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy

pytestmark = pytest.mark.integration

OPS = {"emails": [], "phones": []}


def event(event_id: str, type_: str, at: datetime, data: dict[str, Any] | None = None,
          **extra: Any) -> bytes:
    return json.dumps({
        "event_id": event_id, "type": type_, "occurred_at": at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": "O1", "case_id": "CHURN-1",
        "data": data or {}, **extra}).encode()


def open_rows(db: Database) -> dict[int, tuple[str, datetime, int]]:
    with db.transaction() as s:
        return {r.id: (r.purpose, r.due_at, r.fence) for r in s.execute(
            select(DeadlineRow).where(DeadlineRow.case_id == "CHURN-1",
                                      DeadlineRow.status == "pending")).scalars()}


def version(db: Database) -> int:
    with db.transaction() as s:
        case = s.get(CaseRow, "CHURN-1")
        assert case is not None
        return case.version


@pytest.fixture
def engine() -> Engine:
    return Engine(RuleBook.load(None), WorkCalendar(None))


@pytest.fixture
def intake(db: Database, engine: Engine) -> IntakeProcessor:
    return IntakeProcessor(db, engine, NotificationPolicy.load(None), OPS, 64 * 1024)


def test_an_unchanged_deadline_keeps_its_row_and_a_changed_one_is_replaced(
        db: Database, intake: IntakeProcessor, engine: Engine) -> None:
    with db.transaction() as s:
        t0 = db_now(s) - timedelta(minutes=10)
    intake.process([event("c1", "case.opened", t0, {
        "kind": "exchange", "amount_fen": 100, "buyer": {"phone": "13800000000"},
        "merchant": {"email": "s@example.com"}})])
    first = open_rows(db)
    [(deadline_id, (_p, due_at, _f))] = [(i, r) for i, r in first.items() if r[0] == "deadline"]

    # The platform restates the deadline the case has: the rows stay, same ids.
    intake.process([event("c2", "deadline.changed", t0 + timedelta(minutes=1),
                           due_at=due_at.astimezone(UTC).isoformat())])
    kept = open_rows(db)
    assert set(kept) == set(first)
    assert {fence for _p, _d, fence in kept.values()} == {version(db)}

    # ... and such a row still fires when due (its fence is the case's version).
    fired_at = due_at + timedelta(seconds=1)
    resolution = Resolver(db, engine, NotificationPolicy.load(None), OPS,
                          clock=lambda: fired_at).fire(deadline_id)
    assert resolution.outcome == "fired"


def test_a_changed_deadline_is_deleted_and_replaced(db: Database,
                                                    intake: IntakeProcessor) -> None:
    with db.transaction() as s:
        t0 = db_now(s) - timedelta(minutes=10)
    intake.process([event("c1", "case.opened", t0, {
        "kind": "exchange", "amount_fen": 100, "buyer": {"phone": "13800000000"},
        "merchant": {"email": "s@example.com"}})])
    first = open_rows(db)
    new_due = t0 + timedelta(hours=30)
    intake.process([event("c2", "deadline.changed", t0 + timedelta(minutes=1),
                           due_at=new_due.isoformat())])
    after = open_rows(db)
    [(new_id, (_p, due, _f))] = [(i, r) for i, r in after.items() if r[0] == "deadline"]
    assert due == new_due and new_id not in first
    with db.transaction() as s:
        old_deadline = next(i for i, r in first.items() if r[0] == "deadline")
        assert s.get(DeadlineRow, old_deadline) is None  # no longer wanted: not kept


def test_a_dispatched_deadline_the_case_no_longer_wants_is_deleted_and_fires_nothing(
        db: Database, engine: Engine, intake: IntakeProcessor) -> None:
    """The timer handed the row over (its message is on its way to the resolver) when the
    merchant's answer arrives: the row goes, and the message finds nothing to fire."""
    with db.transaction() as s:
        t0 = db_now(s) - timedelta(minutes=10)
    intake.process([event("c1", "case.opened", t0, {
        "kind": "exchange", "amount_fen": 100, "buyer": {"phone": "13800000000"},
        "merchant": {"email": "s@example.com"}})])
    [(deadline_id, (_p, due_at, _f))] = [
        (i, r) for i, r in open_rows(db).items() if r[0] == "deadline"]
    with db.transaction() as s:  # handed over, as the timer does it
        SqlDeadlines(s).mark_dispatched([deadline_id])
    intake.process([event("c2", "merchant.approved", t0 + timedelta(minutes=1))])
    with db.transaction() as s:
        assert s.get(DeadlineRow, deadline_id) is None
    resolution = Resolver(db, engine, NotificationPolicy.load(None), OPS,
                          clock=lambda: due_at + timedelta(seconds=1)).fire(deadline_id)
    assert (resolution.outcome, resolution.problem) == ("missing", NO_SUCH_ROW)
    with db.transaction() as s:
        assert s.execute(select(func.count()).select_from(DecisionRow)
                         .where(DecisionRow.case_id == "CHURN-1")).scalar_one() == 0
