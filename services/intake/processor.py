"""Intake's work on a batch of inbound messages, independent of how they were received.

One transaction per batch: every accepted event is recorded in the case log and applied
to its case, and only after the commit are the messages acknowledged. Events are handled
in case-id order (stable, so one case's events keep their arrival order): every
transaction takes case locks in the same order, so concurrent intake workers cannot
deadlock each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared.db.models import CaseEventRow
from shared.db.persist import NotificationExpander, Stored, load_case, store_outcome
from shared.db.session import Database, lock_case
from shared.domain import Engine, Event, StepResult, seconds_to_resolution
from shared.schemas.events import Accepted, Rejection, parse_event

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Handled:
    """What became of one accepted message."""

    event_type: str
    platform: str
    outcome: str  # accepted | duplicate | out_of_state | parked | error
    problem: str | None = None
    stored: Stored | None = None
    kind: str | None = None
    steps: tuple[StepResult, ...] = ()
    resolved_after_seconds: float | None = None  # set when this event closed the case


@dataclass
class BatchResult:
    rejected: list[tuple[int, Rejection]] = field(default_factory=list)  # (index in batch, why)
    handled: list[Handled] = field(default_factory=list)


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
        accepted: list[Accepted] = []
        for index, body in enumerate(bodies):
            parsed = parse_event(body, self.max_event_bytes)
            if isinstance(parsed, Rejection):
                result.rejected.append((index, parsed))
            else:
                accepted.append(parsed)
        if not accepted:
            return result
        ordered = sorted(accepted, key=lambda a: a.event.case_id)
        try:
            with self.db.transaction() as session:
                result.handled = [self._handle(session, a) for a in ordered]
        except _EventBug:
            # One event hit a bug in the code. Redo the batch one event per transaction so
            # the good ones go through and the bad one is recorded, not retried forever.
            result.handled = [self._handle_alone(a) for a in ordered]
        return result

    def _handle_alone(self, accepted: Accepted) -> Handled:
        try:
            with self.db.transaction() as session:
                return self._handle(session, accepted)
        except _EventBug as bug:
            problem = f"error: {bug.__cause__!r}"[:1000]
            log.exception("event %s could not be applied", accepted.event.event_id)
            with self.db.transaction() as session:
                _record_event(session, accepted, "error", problem, None)
            return Handled(accepted.event.type, accepted.event.platform, "error", problem)

    def _handle(self, session: Session, accepted: Accepted) -> Handled:
        ev = accepted.event
        lock_case(session, ev.case_id)
        if not _record_event(session, accepted, "applied", None, None):
            return Handled(ev.type, ev.platform, "duplicate")
        try:
            return self._apply(session, accepted)
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            raise _EventBug() from exc

    def _apply(self, session: Session, accepted: Accepted) -> Handled:
        ev = accepted.event
        now = self.clock()
        case = load_case(session, ev.case_id)
        outcome = self.engine.apply(case, to_domain_event(accepted), now)
        if case is None and outcome.case is None:
            # Out of order: the case is not opened yet. Keep the event and apply it
            # when the event that opens the case arrives.
            problem = f"parked: case not opened yet ({outcome.problem})"
            _set_event_outcome(session, ev.event_id, "parked", problem, None)
            return Handled(ev.type, ev.platform, "parked", problem)
        if not outcome.applied or outcome.case is None:
            version = case.version if case else None
            _set_event_outcome(session, ev.event_id, "out_of_state", outcome.problem, version)
            return Handled(ev.type, ev.platform, "out_of_state", outcome.problem)
        stored = store_outcome(
            session, outcome, now=now, policy=self.policy, ops_contacts=self.ops_contacts
        )
        _set_event_outcome(session, ev.event_id, "applied", None, outcome.case.version)
        if case is None:
            self._apply_parked(session, ev.case_id, now)
        return Handled(ev.type, ev.platform, "accepted", None, stored, str(outcome.case.kind),
                       outcome.steps, seconds_to_resolution(case, outcome.case))

    def _apply_parked(self, session: Session, case_id: str, now: datetime) -> None:
        parked = session.execute(
            select(CaseEventRow.event_id, CaseEventRow.body)
            .where(CaseEventRow.case_id == case_id, CaseEventRow.outcome == "parked")
            .order_by(CaseEventRow.occurred_at, CaseEventRow.received_at)
        ).all()
        for event_id, body in parked:
            accepted = parse_event(_json_bytes(body), 10**9)
            assert isinstance(accepted, Accepted), "a stored event always re-validates"
            case = load_case(session, case_id)
            outcome = self.engine.apply(case, to_domain_event(accepted), now)
            if outcome.applied and outcome.case is not None:
                store_outcome(
                    session, outcome, now=now, policy=self.policy, ops_contacts=self.ops_contacts
                )
                _set_event_outcome(session, event_id, "applied", None, outcome.case.version)
            else:
                version = case.version if case else None
                _set_event_outcome(session, event_id, "out_of_state", outcome.problem, version)


class _EventBug(Exception):
    """An exception from applying one event that is not an infrastructure failure."""


def _is_infrastructure(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        # Lost connections and deadlocks are worth a retry of the whole batch; data errors
        # (a value PostgreSQL refuses) are about this event only.
        return bool(exc.connection_invalidated) or exc.orig.__class__.__name__ in {
            "OperationalError",
            "DeadlockDetected",
            "SerializationFailure",
            "AdminShutdown",
        }
    return isinstance(exc, (ConnectionError, TimeoutError))


def _json_bytes(body: dict[str, Any]) -> bytes:
    import json

    return json.dumps(body, ensure_ascii=False).encode()


def _record_event(
    session: Session, accepted: Accepted, outcome: str, problem: str | None, version: int | None
) -> bool:
    """Insert into the case log; False if this event_id was seen before (a duplicate)."""
    ev = accepted.event
    inserted = session.execute(
        pg_insert(CaseEventRow)
        .values(
            event_id=ev.event_id,
            case_id=ev.case_id,
            type=ev.type,
            occurred_at=ev.occurred_at,
            outcome=outcome,
            problem=problem,
            case_version=version,
            body=accepted.body,
        )
        .on_conflict_do_nothing(index_elements=[CaseEventRow.event_id])
        .returning(CaseEventRow.event_id)
    ).scalar_one_or_none()
    return inserted is not None


def _set_event_outcome(
    session: Session, event_id: str, outcome: str, problem: str | None, version: int | None
) -> None:
    session.execute(
        update(CaseEventRow)
        .where(CaseEventRow.event_id == event_id)
        .values(outcome=outcome, problem=problem, case_version=version)
    )
