"""Owner of the case log (`case_events`, and `event_conflicts` beside it): every accepted
event with its verdict, kept as received; what intake dedups on and rebuilds cases from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, cast

from sqlalchemy import (
    Table,
    any_,
    bindparam,
    case,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from shared.db.bulk import bulk_insert, bulk_insert_claiming
from shared.db.models import (
    UNAPPLIED_OUTCOMES,
    CaseEventRow,
    CaseRow,
    EventConflictRow,
    EventIdRow,
)
from shared.db.session import index_plans_kept


class EventOutcome(StrEnum):
    """The verdict stored with a logged event (`case_events.outcome`)."""

    applied = "applied"
    out_of_state = "out_of_state"
    parked = "parked"  # its case is not opened yet: applied when it is
    expired = "expired"  # parked too long: copied to the rejected queue
    error = "error"  # applying it raised: a bug, not a fact


# What a rebuild reads: every accepted event (an `error` row is a bug, not a fact).
ACCEPTED_OUTCOMES = (EventOutcome.applied, EventOutcome.out_of_state, EventOutcome.parked)

_EVENTS = cast(Table, CaseEventRow.__table__)
_CONFLICTS = cast(Table, EventConflictRow.__table__)
_EVENT_IDS = cast(Table, EventIdRow.__table__)
_CASES = cast(Table, CaseRow.__table__)
# From `event_ids` (claimed by INSERT_EVENTS with each row): one index probe, not one
# per monthly partition of `case_events` (docs/design.md "Partitioning by time").
SEEN_EVENTS = select(_EVENT_IDS.c.event_id, _EVENT_IDS.c.body_sha256).where(
    _EVENT_IDS.c.event_id == any_(bindparam("ids")))
# What a row about a case written before the case existed can be: the outcomes the
# partial index `ix_case_events_unapplied` holds.
EARLY_OUTCOMES = tuple(EventOutcome(o) for o in UNAPPLIED_OUTCOMES)
# The rows about cases not created yet: parked ones (applied when the case is created,
# in the order they occurred) and expired or error ones, whose times lower the case's
# `records_since`. The outcomes are written out, not bound, so the predicate matches the
# partial index `ix_case_events_unapplied` in every plan: one small probe per month. Read
# for the new cases of nearly every batch, and planned per month, so its plan is kept
# (`index_plans_kept`).
EARLY_ROWS = (
    select(_EVENTS.c.event_id, _EVENTS.c.case_id, _EVENTS.c.outcome, _EVENTS.c.received_at,
           case((_EVENTS.c.outcome == literal_column("'parked'"), _EVENTS.c.body),
                else_=None))
    .where(_EVENTS.c.case_id == any_(bindparam("ids")))
    .where(text(f"outcome IN ({', '.join(repr(str(o)) for o in EARLY_OUTCOMES)})"))
    .order_by(_EVENTS.c.occurred_at, _EVENTS.c.received_at)
)
INSERT_EVENTS = bulk_insert_claiming(_EVENTS, [
    "event_id", "case_id", "type", "occurred_at", "outcome", "problem", "case_version", "body",
    "body_sha256"], _EVENT_IDS, ["event_id", "body_sha256"])
INSERT_CONFLICTS = bulk_insert(_CONFLICTS, [
    "event_id", "case_id", "body", "body_sha256", "first_sha256"])
# The case's log for a rebuild: every accepted event (an `error` row is a bug, not a fact).
# From the case's `records_since` on (all months when it has none, or no row yet): the
# subquery is evaluated once, before the scan, and PostgreSQL skips the months before it.
# By case id, not the partition key, so planned per month on every run: its plan is kept
# (`index_plans_kept`); the months are still skipped at run time.
_CASE_RECORDS_SINCE = (
    select(_CASES.c.records_since)
    .where(_CASES.c.case_id == bindparam("case_id"))
    .scalar_subquery()
)
CASE_LOG = (
    select(_EVENTS.c.event_id, _EVENTS.c.body)
    .where(_EVENTS.c.case_id == bindparam("case_id"))
    .where(_EVENTS.c.outcome.in_(ACCEPTED_OUTCOMES))
    .where(_EVENTS.c.received_at >= func.coalesce(
        _CASE_RECORDS_SINCE, literal_column("'-infinity'::timestamptz")))
)
UPDATE_EVENT = (
    update(_EVENTS)
    .where(_EVENTS.c.event_id == bindparam("b_event_id"))
    .values(outcome=bindparam("b_outcome"), problem=bindparam("b_problem"),
            case_version=bindparam("b_version"))
)
# Parked events that waited too long (services/intake/parked.py).
PARKED_CANDIDATES = text(
    "SELECT event_id, case_id FROM case_events WHERE outcome = 'parked' "
    "AND received_at < now() - make_interval(secs => :max_age) "
    "ORDER BY received_at LIMIT :limit")
STILL_PARKED = text(
    "SELECT event_id, case_id, body, received_at FROM case_events "
    "WHERE event_id = ANY(:ids) AND outcome = 'parked' ORDER BY received_at FOR UPDATE")
EXPIRE = text(
    "UPDATE case_events SET outcome = 'expired', problem = :problem "
    "WHERE event_id = ANY(:ids)")
PARKED_STATS = text(
    "SELECT count(*), extract(epoch FROM now() - min(received_at)) FROM case_events "
    "WHERE outcome = 'parked'")


@dataclass
class LoggedEvent:
    """A row for the case log (what `add` writes); intake may still change its verdict
    before it is written (an event parked earlier in the same batch)."""

    event_id: str
    case_id: str
    type: str
    occurred_at: datetime
    outcome: EventOutcome
    problem: str | None
    case_version: int | None
    body: dict[str, Any]
    body_sha256: str | None


@dataclass(frozen=True)
class OutcomeChange:
    """A logged event judged again (a rebuild): its new verdict."""

    event_id: str
    outcome: EventOutcome
    problem: str | None
    case_version: int | None


@dataclass(frozen=True)
class Conflict:
    """An event id received again with other content: kept for ops, never applied."""

    event_id: str
    case_id: str
    body: dict[str, Any]
    body_sha256: str | None
    first_sha256: str | None


@dataclass(frozen=True)
class EarlyRow:
    """A row about a case written before the case existed (`EARLY_ROWS`)."""

    event_id: str
    case_id: str
    outcome: str  # parked | expired | error
    received_at: datetime
    body: dict[str, Any] | None  # parked rows only: they are applied


@dataclass(frozen=True)
class ParkedEvent:
    event_id: str
    case_id: str
    body: dict[str, Any]
    received_at: datetime


@dataclass(frozen=True)
class ParkedStats:
    count: int
    oldest_age_seconds: float | None


class CaseLogRepository(Protocol):
    def seen(self, event_ids: Iterable[str]) -> dict[str, str | None]:
        """event_id -> content hash of the ids already logged."""

    def early_rows_of(self, case_ids: Iterable[str]) -> list[EarlyRow]:
        """The rows about these cases written while they did not exist (parked, expired,
        error), in event time."""

    def accepted_of(self, case_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(event_id, body) of every accepted event of the case (for a rebuild)."""

    def add(self, events: Sequence[LoggedEvent]) -> int:
        """Log these events (an id already logged is skipped); returns how many were new."""

    def change_outcomes(self, changes: Sequence[OutcomeChange]) -> None: ...

    def add_conflicts(self, conflicts: Sequence[Conflict]) -> None: ...

    def parked_longer_than(self, max_age_seconds: float, limit: int) -> list[tuple[str, str]]:
        """(event_id, case_id) of events parked longer than this, oldest first (by the
        database clock)."""

    def still_parked(self, event_ids: Sequence[str]) -> list[ParkedEvent]:
        """These events if still parked, locked, oldest first."""

    def expire(self, event_ids: Sequence[str], problem: str) -> None: ...

    def parked_stats(self) -> ParkedStats: ...


def _row(event: LoggedEvent) -> dict[str, Any]:
    return {"event_id": event.event_id, "case_id": event.case_id, "type": event.type,
            "occurred_at": event.occurred_at, "outcome": event.outcome,
            "problem": event.problem, "case_version": event.case_version,
            "body": event.body, "body_sha256": event.body_sha256}


class SqlCaseLog:
    def __init__(self, session: Session) -> None:
        self.session = session

    def seen(self, event_ids: Iterable[str]) -> dict[str, str | None]:
        return {event_id: sha for event_id, sha in self.session.execute(
            SEEN_EVENTS, {"ids": sorted(set(event_ids))})}

    def early_rows_of(self, case_ids: Iterable[str]) -> list[EarlyRow]:
        ids = sorted(set(case_ids))
        if not ids:
            return []
        with index_plans_kept(self.session):
            return [EarlyRow(*row) for row in self.session.execute(EARLY_ROWS, {"ids": ids})]

    def accepted_of(self, case_id: str) -> list[tuple[str, dict[str, Any]]]:
        with index_plans_kept(self.session):
            return [(e, b) for e, b in self.session.execute(CASE_LOG, {"case_id": case_id})]

    def add(self, events: Sequence[LoggedEvent]) -> int:
        if not events:
            return 0
        return int(INSERT_EVENTS.execute(self.session, [_row(e) for e in events]).rowcount)

    def change_outcomes(self, changes: Sequence[OutcomeChange]) -> None:
        if not changes:
            return
        # One statement per row, found by event id in every month: plans kept.
        with index_plans_kept(self.session):
            self.session.connection().execute(UPDATE_EVENT, [
                {"b_event_id": c.event_id, "b_outcome": c.outcome, "b_problem": c.problem,
                 "b_version": c.case_version} for c in changes])

    def add_conflicts(self, conflicts: Sequence[Conflict]) -> None:
        if conflicts:
            INSERT_CONFLICTS.execute(self.session, [
                {"event_id": c.event_id, "case_id": c.case_id, "body": c.body,
                 "body_sha256": c.body_sha256, "first_sha256": c.first_sha256}
                for c in conflicts])

    def parked_longer_than(self, max_age_seconds: float, limit: int) -> list[tuple[str, str]]:
        return [(e, c) for e, c in self.session.execute(
            PARKED_CANDIDATES, {"max_age": max_age_seconds, "limit": limit})]

    def still_parked(self, event_ids: Sequence[str]) -> list[ParkedEvent]:
        if not event_ids:
            return []
        return [ParkedEvent(*row) for row in self.session.execute(
            STILL_PARKED, {"ids": list(event_ids)})]

    def expire(self, event_ids: Sequence[str], problem: str) -> None:
        if event_ids:
            self.session.execute(EXPIRE, {"ids": list(event_ids), "problem": problem})

    def parked_stats(self) -> ParkedStats:
        count, oldest = self.session.execute(PARKED_STATS).one()
        return ParkedStats(int(count), float(oldest) if oldest is not None else None)
