"""A case and everything recorded about it, read in one transaction (for `case show`,
`case explain` and the console)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, select, text, true
from sqlalchemy.orm import InstrumentedAttribute

from shared.db.models import (
    CaseEventRow,
    CaseNoteRow,
    CaseRow,
    DeadlineRow,
    DecisionRow,
    NotificationRow,
)
from shared.db.session import Database

# Deadlines still to come: pending, or handed to the resolver and not decided yet.
_OUTSTANDING = ("pending", "dispatched")
NOW = text("SELECT now()")


@dataclass(frozen=True)
class CaseHistory:
    """What `case show` prints: the case row (None if only its events exist), its events
    in the order they were received, decisions, notifications, outstanding deadlines and
    notes."""

    case: CaseRow | None
    events: Sequence[CaseEventRow]
    decisions: Sequence[DecisionRow]
    notifications: Sequence[NotificationRow]
    deadlines: Sequence[DeadlineRow]
    notes: Sequence[CaseNoteRow]


@dataclass(frozen=True)
class CaseRecord:
    """What `case explain` reasons over, at the database's `now`: events in the order
    they occurred, decisions, outstanding deadlines."""

    now: datetime
    case: CaseRow
    events: list[CaseEventRow]
    decisions: list[DecisionRow]
    pending: list[DeadlineRow]


def _since(case: CaseRow | None, key: InstrumentedAttribute[datetime]
           ) -> ColumnElement[bool]:
    """A case's rows in a partitioned table are no older than its `records_since`: saying
    so lets PostgreSQL skip the months before (one index probe per month otherwise)."""
    if case is None or case.records_since is None:
        return true()
    return key >= case.records_since


def load_case_history(db: Database, case_id: str) -> CaseHistory | None:
    """None when neither the case nor any event of it exists."""
    with db.transaction() as s:
        case = s.get(CaseRow, case_id)
        events = s.execute(
            select(CaseEventRow)
            .where(CaseEventRow.case_id == case_id)
            .where(_since(case, CaseEventRow.received_at))
            .order_by(CaseEventRow.received_at, CaseEventRow.occurred_at)
        ).scalars().all()
        if case is None and not events:
            return None
        decisions = s.execute(
            select(DecisionRow)
            .where(DecisionRow.case_id == case_id)
            .where(_since(case, DecisionRow.decided_at))
            .order_by(DecisionRow.decided_at)
        ).scalars().all()
        notifications = s.execute(
            select(NotificationRow)
            .where(NotificationRow.case_id == case_id)
            .where(_since(case, NotificationRow.created_at))
            .order_by(NotificationRow.created_at, NotificationRow.id)
        ).scalars().all()
        deadlines = s.execute(
            select(DeadlineRow)
            .where(DeadlineRow.case_id == case_id)
            .where(DeadlineRow.status.in_(_OUTSTANDING))
            .order_by(DeadlineRow.due_at)
        ).scalars().all()
        notes = s.execute(
            select(CaseNoteRow).where(CaseNoteRow.case_id == case_id).order_by(CaseNoteRow.id)
        ).scalars().all()
    return CaseHistory(case, events, decisions, notifications, deadlines, notes)


def load_case_record(db: Database, case_id: str) -> CaseRecord | None:
    """None if the case does not exist."""
    with db.transaction() as s:
        now = s.execute(NOW).scalar_one()
        case = s.get(CaseRow, case_id)
        if case is None:
            return None
        events = list(s.execute(select(CaseEventRow).where(CaseEventRow.case_id == case_id)
                                .where(_since(case, CaseEventRow.received_at))
                                .order_by(CaseEventRow.occurred_at,
                                          CaseEventRow.received_at)).scalars())
        decisions = list(s.execute(select(DecisionRow).where(DecisionRow.case_id == case_id)
                                   .where(_since(case, DecisionRow.decided_at))
                                   .order_by(DecisionRow.decided_at)).scalars())
        pending = list(s.execute(
            select(DeadlineRow).where(DeadlineRow.case_id == case_id)
            .where(DeadlineRow.status.in_(_OUTSTANDING))
            .order_by(DeadlineRow.due_at)).scalars())
    return CaseRecord(now, case, events, decisions, pending)


def database_now(db: Database) -> datetime:
    """The database's clock, the one that decides."""
    with db.transaction() as s:
        value = s.execute(NOW).scalar_one()
    assert isinstance(value, datetime)
    return value


def load_case(db: Database, case_id: str) -> tuple[datetime, CaseRow | None]:
    """The database's `now` and the case row (None if there is no such case)."""
    with db.transaction() as s:
        now = s.execute(NOW).scalar_one()
        return now, s.get(CaseRow, case_id)


def event_verdict(db: Database, event_id: str) -> tuple[str, str | None] | None:
    """Intake's verdict on an event (outcome, problem); None until it has one."""
    with db.transaction() as s:
        row = s.get(CaseEventRow, event_id)
        return None if row is None else (row.outcome, row.problem)
