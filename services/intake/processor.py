"""Intake's work on a batch of inbound messages, independent of how they were received.

One transaction per batch, with a fixed number of statements whatever its size: lock the
batch's cases (in case-id order, so concurrent intake workers cannot deadlock), find the
event ids already seen, load the cases, apply every event in memory in arrival order
(stable per case), then write the case log, the cases and everything their changes
caused in bulk. Only after the commit are the messages acknowledged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, any_, bindparam, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.db.bulk import bulk_insert
from shared.db.models import CaseEventRow
from shared.db.persist import (
    NotificationExpander,
    OutcomeWriter,
    Stored,
    load_cases,
    lock_cases,
    try_lock_cases,
)
from shared.db.session import Database, is_infrastructure
from shared.domain import Case, Engine, Event, Outcome, StepResult, seconds_to_resolution
from shared.schemas.events import Accepted, Rejection, parse_event

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

_EVENTS = CaseEventRow.__table__
assert isinstance(_EVENTS, Table)
SEEN_EVENTS = select(_EVENTS.c.event_id).where(
    _EVENTS.c.event_id == any_(bindparam("ids")))
PARKED_EVENTS = (
    select(_EVENTS.c.event_id, _EVENTS.c.case_id, _EVENTS.c.body)
    .where(_EVENTS.c.case_id == any_(bindparam("ids")))
    .where(_EVENTS.c.outcome == "parked")
    .order_by(_EVENTS.c.occurred_at, _EVENTS.c.received_at)
)
INSERT_EVENTS = bulk_insert(_EVENTS, [
    "event_id", "case_id", "type", "occurred_at", "outcome", "problem", "case_version", "body"],
    "ON CONFLICT (event_id) DO NOTHING")
UPDATE_EVENT = (
    update(_EVENTS)
    .where(_EVENTS.c.event_id == bindparam("b_event_id"))
    .values(outcome=bindparam("b_outcome"), problem=bindparam("b_problem"),
            case_version=bindparam("b_version"))
)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Handled:
    """What became of one accepted message."""

    event_type: str
    platform: str
    outcome: str  # accepted | duplicate | out_of_state | parked | error
    problem: str | None = None
    kind: str | None = None
    steps: tuple[StepResult, ...] = ()
    resolved_after_seconds: float | None = None  # set when this event closed the case
    rating: int | None = None  # buyer.rated: the rating recorded


@dataclass
class BatchResult:
    rejected: list[tuple[int, Rejection]] = field(default_factory=list)  # (index in batch, why)
    # Indices of events left for the next batch: another worker held their case's lock.
    deferred: list[int] = field(default_factory=list)
    handled: list[Handled] = field(default_factory=list)
    stored: Stored = field(default_factory=Stored)


def to_domain_event(accepted: Accepted) -> Event:
    ev = accepted.event
    return Event(
        event_id=ev.event_id,
        type=ev.type,
        occurred_at=ev.occurred_at.astimezone(UTC),
        platform=ev.platform,
        shop_id=ev.shop_id,
        order_id=ev.order_id,
        case_id=ev.case_id,
        due_at=ev.due_at.astimezone(UTC) if ev.due_at else None,
        data=accepted.data,
    )


class _EventBug(Exception):
    """Applying one event raised something that is not an infrastructure failure."""

    def __init__(self, accepted: Accepted) -> None:
        super().__init__(accepted.event.event_id)
        self.accepted = accepted


class IntakeProcessor:
    def __init__(
        self,
        db: Database,
        engine: Engine,
        policy: NotificationExpander,
        ops_contacts: Any,
        max_event_bytes: int,
        clock: Clock = utcnow,
    ) -> None:
        self.db = db
        self.engine = engine
        self.policy = policy
        self.ops_contacts = ops_contacts
        self.max_event_bytes = max_event_bytes
        self.clock = clock

    def process(self, bodies: Sequence[bytes]) -> BatchResult:
        """Validate and apply a batch. Raises only for infrastructure failures (the
        caller retries the whole batch: nothing of it was committed)."""
        result = BatchResult()
        accepted: list[tuple[int, Accepted]] = []
        for index, body in enumerate(bodies):
            parsed = parse_event(body, self.max_event_bytes)
            if isinstance(parsed, Rejection):
                result.rejected.append((index, parsed))
            else:
                accepted.append((index, parsed))
        if not accepted:
            return result
        # stable: keeps arrival order within a case
        indexed = sorted(accepted, key=lambda ia: ia[1].event.case_id)
        ordered = [a for _i, a in indexed]
        try:
            result.handled, result.stored, busy = self._apply_batch(ordered, wait=False)
            result.deferred = sorted(i for i, a in indexed if a.event.case_id in busy)
        except (_EventBug, DBAPIError) as exc:
            if isinstance(exc, DBAPIError) and is_infrastructure(exc):
                raise
            # One event hit a bug in the code, or a value the database refuses. Redo the
            # batch one event per transaction so the good ones go through and the bad one
            # is recorded, not retried forever.
            result.handled = [self._apply_alone(a) for a in ordered]
        return result

    def _apply_alone(self, accepted: Accepted) -> Handled:
        try:
            return self._apply_batch([accepted], wait=True)[0][0]
        except (_EventBug, DBAPIError) as exc:
            if isinstance(exc, DBAPIError) and is_infrastructure(exc):
                raise
            cause = exc.__cause__ if isinstance(exc, _EventBug) else exc.orig
            problem = f"error: {cause!r}"[:1000]
            log.error("event %s could not be applied: %s", accepted.event.event_id, problem)
            with self.db.transaction() as session:
                INSERT_EVENTS.execute(session, [_event_row(accepted, "error", problem, None)])
            return Handled(accepted.event.type, accepted.event.platform, "error", problem)

    def _apply_batch(self, ordered: list[Accepted], *, wait: bool
                     ) -> tuple[list[Handled], Stored, set[str]]:
        """Apply the events whose cases this transaction can lock; returns what became of
        them and the cases left alone. Without `wait`, a case another worker holds is left
        for the next batch instead of stalling the whole batch behind that worker's
        transaction (with two intake workers that wait was 41 % of intake's time). If
        every case is held, it waits: a batch always makes progress."""
        now = self.clock()
        with self.db.transaction() as session:
            batch = _Batch(self.engine, OutcomeWriter(self.policy, self.ops_contacts, now), now)
            wanted = {a.event.case_id for a in ordered}
            case_ids = set() if wait else try_lock_cases(session, wanted)
            if not case_ids:  # asked to wait, or every case is held: wait for all
                lock_cases(session, wanted)
                case_ids = wanted
            busy = wanted - case_ids
            ordered = [a for a in ordered if a.event.case_id in case_ids]
            batch.seen = set(session.execute(
                SEEN_EVENTS, {"ids": sorted({a.event.event_id for a in ordered})}).scalars())
            batch.cases = load_cases(session, case_ids)
            missing = sorted(case_ids - batch.cases.keys())
            if missing:
                for event_id, case_id, body in session.execute(PARKED_EVENTS, {"ids": missing}):
                    batch.parked.setdefault(case_id, []).append((event_id, body))
            handled = [batch.apply(a) for a in ordered]
            _write_events(session, batch)
            stored = batch.writer.flush(session)
        return handled, stored, busy


@dataclass
class _Batch:
    """The in-memory state of one batch while its events are applied."""

    engine: Engine
    writer: OutcomeWriter
    now: datetime
    cases: dict[str, Case] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    # Parked events per case not opened yet: (event_id, stored body).
    parked: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    new_rows: list[dict[str, Any]] = field(default_factory=list)
    updated_rows: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, accepted: Accepted) -> Handled:
        ev = accepted.event
        if ev.event_id in self.seen:
            return Handled(ev.type, ev.platform, "duplicate")
        self.seen.add(ev.event_id)
        before = self.cases.get(ev.case_id)
        outcome = self._engine_apply(accepted, before)
        if before is None and outcome.case is None:
            # Out of order: the case is not opened yet. Keep the event; it is applied when
            # the event that opens the case arrives.
            problem = f"parked: case not opened yet ({outcome.problem})"
            self.new_rows.append(_event_row(accepted, "parked", problem, None))
            self.parked.setdefault(ev.case_id, []).append((ev.event_id, accepted.body))
            return Handled(ev.type, ev.platform, "parked", problem)
        if not outcome.applied or outcome.case is None:
            version = before.version if before else None
            self.new_rows.append(_event_row(accepted, "out_of_state", outcome.problem, version))
            return Handled(ev.type, ev.platform, "out_of_state", outcome.problem)
        self._keep(outcome)
        self.new_rows.append(_event_row(accepted, "applied", None, outcome.case.version))
        if before is None:
            self._apply_parked(ev.case_id)
        after = self.cases[ev.case_id]
        rating = (after.data.get("buyer_rating") or {}).get("rating") \
            if ev.type == "buyer.rated" else None
        return Handled(ev.type, ev.platform, "accepted", None, str(after.kind), outcome.steps,
                       seconds_to_resolution(before, outcome.case), rating)

    def _engine_apply(self, accepted: Accepted, case: Case | None) -> Outcome:
        try:
            return self.engine.apply(case, to_domain_event(accepted), self.now)
        except Exception as exc:  # a bug for this event; infrastructure is not touched here
            raise _EventBug(accepted) from exc

    def _keep(self, outcome: Outcome) -> None:
        assert outcome.case is not None
        self.cases[outcome.case.case_id] = outcome.case
        self.writer.add(outcome)

    def _apply_parked(self, case_id: str) -> None:
        """The case was just opened: apply the events that waited for it, oldest first."""
        waiting = sorted(self.parked.pop(case_id, []),
                         key=lambda item: str(item[1].get("occurred_at", "")))
        for event_id, body in waiting:
            parsed = parse_event(json.dumps(body, ensure_ascii=False).encode(), 10**9)
            assert isinstance(parsed, Accepted), "a stored event always validates again"
            case = self.cases.get(case_id)
            outcome = self._engine_apply(parsed, case)
            row: tuple[str, str | None, int | None]
            if outcome.applied and outcome.case is not None:
                self._keep(outcome)
                row = ("applied", None, outcome.case.version)
            else:
                row = ("out_of_state", outcome.problem, case.version if case else None)
            self._set_outcome(event_id, *row)

    def _set_outcome(self, event_id: str, outcome: str, problem: str | None,
                     version: int | None) -> None:
        for row in self.new_rows:  # parked earlier in this same batch: not written yet
            if row["event_id"] == event_id:
                row.update(outcome=outcome, problem=problem, case_version=version)
                return
        self.updated_rows.append({"b_event_id": event_id, "b_outcome": outcome,
                                  "b_problem": problem, "b_version": version})


def _event_row(accepted: Accepted, outcome: str, problem: str | None,
               version: int | None) -> dict[str, Any]:
    ev = accepted.event
    return {"event_id": ev.event_id, "case_id": ev.case_id, "type": ev.type,
            "occurred_at": ev.occurred_at, "outcome": outcome, "problem": problem,
            "case_version": version, "body": accepted.body}


def _write_events(session: Session, batch: _Batch) -> None:
    if batch.new_rows:
        INSERT_EVENTS.execute(session, batch.new_rows)
    if batch.updated_rows:
        session.connection().execute(UPDATE_EVENT, batch.updated_rows)
