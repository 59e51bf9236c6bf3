"""Intake's work on a batch of inbound messages, independent of how they were received.

One transaction per batch, with a fixed number of statements whatever its size: lock the
batch's cases (in case-id order, so concurrent intake workers cannot deadlock), find the
event ids already seen, load the cases, apply every event in memory in arrival order
(stable per case), then write the case log, the cases and everything their changes
caused in bulk. Only after the commit are the messages acknowledged.

Event time (docs/design.md): an event that happened after every fact of its case is
applied on top; one that happened at or before a fact already folded (it reached us late)
makes intake read the case's log and rebuild the case in event-time order
(`Engine.replay`): every logged event is judged again and its row updated, and decisions
the rebuilt history no longer reaches are superseded.
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
from shared.db.models import CaseEventRow, EventConflictRow, EventIdRow
from shared.db.persist import (
    NotificationExpander,
    OutcomeWriter,
    Stored,
    load_cases,
    lock_cases,
    try_lock_cases,
)
from shared.db.session import Database, db_now, is_infrastructure
from shared.domain import Case, Engine, Event, Outcome, StepResult, seconds_to_resolution
from shared.schemas.events import Accepted, Limits, Rejection, RejectReason, parse_event

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

_EVENTS = CaseEventRow.__table__
assert isinstance(_EVENTS, Table)
_CONFLICTS = EventConflictRow.__table__
assert isinstance(_CONFLICTS, Table)
_EVENT_IDS = EventIdRow.__table__
assert isinstance(_EVENT_IDS, Table)
# From `event_ids` (kept by triggers in step with `case_events`): one index probe, not one
# per monthly partition of `case_events` (docs/design.md "Partitioning by time").
SEEN_EVENTS = select(_EVENT_IDS.c.event_id, _EVENT_IDS.c.body_sha256).where(
    _EVENT_IDS.c.event_id == any_(bindparam("ids")))
PARKED_EVENTS = (
    select(_EVENTS.c.event_id, _EVENTS.c.case_id, _EVENTS.c.body)
    .where(_EVENTS.c.case_id == any_(bindparam("ids")))
    .where(_EVENTS.c.outcome == "parked")
    .order_by(_EVENTS.c.occurred_at, _EVENTS.c.received_at)
)
INSERT_EVENTS = bulk_insert(_EVENTS, [
    "event_id", "case_id", "type", "occurred_at", "outcome", "problem", "case_version", "body",
    "body_sha256"], "ON CONFLICT DO NOTHING")
INSERT_CONFLICTS = bulk_insert(_CONFLICTS, [
    "event_id", "case_id", "body", "body_sha256", "first_sha256"])
# The case's log for a rebuild: every accepted event (an `error` row is a bug, not a fact).
CASE_LOG = (
    select(_EVENTS.c.event_id, _EVENTS.c.body)
    .where(_EVENTS.c.case_id == bindparam("case_id"))
    .where(_EVENTS.c.outcome.in_(("applied", "out_of_state", "parked")))
)
UPDATE_EVENT = (
    update(_EVENTS)
    .where(_EVENTS.c.event_id == bindparam("b_event_id"))
    .values(outcome=bindparam("b_outcome"), problem=bindparam("b_problem"),
            case_version=bindparam("b_version"))
)


@dataclass(frozen=True)
class Handled:
    """What became of one accepted message."""

    event_type: str
    platform: str
    outcome: str  # accepted | duplicate | conflict | out_of_state | parked | error
    problem: str | None = None
    kind: str | None = None
    steps: tuple[StepResult, ...] = ()
    resolved_after_seconds: float | None = None  # set when this event closed the case
    rebuilt: bool = False  # the case was rebuilt from its log in event-time order
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
        clock: Clock | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.db = db
        self.engine = engine
        self.policy = policy
        self.ops_contacts = ops_contacts
        self.max_event_bytes = max_event_bytes
        # None: the database's clock, the one that decides due-ness (tests may fix one).
        self.clock = clock
        limits = limits or Limits()
        self.limits = Limits(max_event_bytes, limits.max_depth, limits.max_future,
                             limits.max_past, limits.max_due_ahead)

    def process(self, bodies: Sequence[bytes]) -> BatchResult:
        """Validate and apply a batch. Raises only for infrastructure failures (the
        caller retries the whole batch: nothing of it was committed). Any other exception
        while handling one event gives that event its verdict (an error recorded in the case
        log, or failing that a rejection) and the rest of the batch goes on."""
        result = BatchResult()
        accepted: list[tuple[int, Accepted]] = []
        # The plausible-time window is judged by the same clock as due-ness.
        received_at = self.clock() if self.clock is not None else self._db_clock()
        for index, body in enumerate(bodies):
            parsed = _parse(body, self.limits, received_at)
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
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            # One event hit a bug in the code, or a value the database refuses. Redo the
            # batch one event per transaction so the good ones go through and the bad one
            # is recorded, not retried forever.
            log.warning("batch failed (%s); applying its events one by one",
                        type(exc).__name__)
            result.handled = []
            for index, one in indexed:
                verdict = self._apply_alone(one)
                if isinstance(verdict, Rejection):
                    result.rejected.append((index, verdict))
                else:
                    result.handled.append(verdict)
            result.rejected.sort(key=lambda item: item[0])
        return result

    def _apply_alone(self, accepted: Accepted) -> Handled | Rejection:
        try:
            return self._apply_batch([accepted], wait=True)[0][0]
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            cause = exc.__cause__ if isinstance(exc, _EventBug) else exc
            if isinstance(cause, DBAPIError):
                cause = cause.orig
            problem = f"error: {cause!r}"[:1000]
            log.error("event %s could not be applied: %s", accepted.event.event_id, problem)
        try:
            with self.db.transaction() as session:
                INSERT_EVENTS.execute(session, [_event_row(accepted, "error", problem, None)])
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            # Not even the error could be recorded: the message itself goes to ops.
            log.error("event %s could not be recorded either (%r)",
                      accepted.event.event_id, exc)
            return Rejection(RejectReason.internal_error, problem)
        return Handled(accepted.event.type, accepted.event.platform, "error", problem)

    def _db_clock(self) -> datetime:
        with self.db.transaction() as session:
            return db_now(session)

    def _apply_batch(self, ordered: list[Accepted], *, wait: bool
                     ) -> tuple[list[Handled], Stored, set[str]]:
        """Apply the events whose cases this transaction can lock; returns what became of
        them and the cases left alone. Without `wait`, a case another worker holds is left
        for the next batch instead of stalling the whole batch behind that worker's
        transaction (with two intake workers that wait was 41 % of intake's time). If
        every case is held, it waits: a batch always makes progress."""
        with self.db.transaction() as session:
            now = self.clock() if self.clock is not None else db_now(session)
            batch = _Batch(self.engine, OutcomeWriter(self.policy, self.ops_contacts, now), now)
            wanted = {a.event.case_id for a in ordered}
            case_ids = set() if wait else try_lock_cases(session, wanted)
            if not case_ids:  # asked to wait, or every case is held: wait for all
                lock_cases(session, wanted)
                case_ids = wanted
            busy = wanted - case_ids
            ordered = [a for a in ordered if a.event.case_id in case_ids]
            batch.seen = dict(session.execute(  # event_id -> content hash
                SEEN_EVENTS, {"ids": sorted({a.event.event_id for a in ordered})}).all())
            batch.cases = load_cases(session, case_ids)
            batch.load_log = lambda case_id: [
                (event_id, body) for event_id, body in session.execute(
                    CASE_LOG, {"case_id": case_id})]
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
    seen: dict[str, str | None] = field(default_factory=dict)  # event_id -> content hash
    # Parked events per case not opened yet: (event_id, stored body).
    parked: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    new_rows: list[dict[str, Any]] = field(default_factory=list)
    updated_rows: list[dict[str, Any]] = field(default_factory=list)
    conflict_rows: list[dict[str, Any]] = field(default_factory=list)
    # (event_id, stored body) of every accepted event of a case, read for a rebuild
    load_log: Callable[[str], list[tuple[str, dict[str, Any]]]] = lambda _case_id: []

    def apply(self, accepted: Accepted) -> Handled:
        ev = accepted.event
        if ev.event_id in self.seen:
            first = self.seen[ev.event_id]
            if first is None or first == accepted.content_hash:
                return Handled(ev.type, ev.platform, "duplicate")
            # Same id, other content: never applied over the first, kept for ops.
            problem = f"conflict: event_id {ev.event_id!r} was first received with other content"
            self.conflict_rows.append({
                "event_id": ev.event_id, "case_id": ev.case_id, "body": accepted.body,
                "body_sha256": accepted.content_hash, "first_sha256": first})
            log.warning("%s", problem[:300])
            return Handled(ev.type, ev.platform, "conflict", problem)
        self.seen[ev.event_id] = accepted.content_hash
        before = self.cases.get(ev.case_id)
        if before is not None and self.engine.needs_replay(before, to_domain_event(accepted)):
            return self._rebuild(accepted, before)
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
            if outcome.case is not None and outcome.case != before:
                # unchanged but for its fact time: an earlier fact arriving later rebuilds
                self.cases[ev.case_id] = outcome.case
                self.writer.add_case(outcome.case)
            self.new_rows.append(_event_row(accepted, "out_of_state", outcome.problem, version))
            return Handled(ev.type, ev.platform, "out_of_state", outcome.problem)
        self._keep(outcome)
        # deadlines that passed before the event happened fired first; the event itself
        # may not fit the state they left
        verdict = "out_of_state" if outcome.problem else "applied"
        self.new_rows.append(_event_row(accepted, verdict, outcome.problem,
                                        outcome.case.version))
        if before is None and self.parked.get(ev.case_id):
            self._apply_parked(ev.case_id)
        after = self.cases[ev.case_id]
        if outcome.problem:
            return Handled(ev.type, ev.platform, "out_of_state", outcome.problem,
                           str(after.kind), outcome.steps)
        rating = (after.data.get("buyer_rating") or {}).get("rating") \
            if ev.type == "buyer.rated" else None
        return Handled(ev.type, ev.platform, "accepted", None, str(after.kind), outcome.steps,
                       seconds_to_resolution(before, after), rating=rating)

    def _rebuild(self, accepted: Accepted, before: Case | None,
                 arrived: tuple[str, ...] = ()) -> Handled:
        """The event happened before facts already folded into the case: rebuild the case
        from its whole log in event-time order and judge every logged event again."""
        ev = accepted.event
        case_id = ev.case_id
        bodies = dict(self.load_log(case_id))
        for row in self.new_rows:  # written by this batch, not in the database yet
            if row["case_id"] == case_id and row["outcome"] != "error":
                bodies[row["event_id"]] = row["body"]
        bodies[ev.event_id] = accepted.body
        log_events = []
        for event_id, body in bodies.items():
            parsed = parse_event(json.dumps(body, ensure_ascii=False).encode(), 10**9)
            if isinstance(parsed, Rejection):
                # Stored before the contract was this strict: kept, with what is wrong.
                self._set_outcome(event_id, "error", f"error: stored event no longer "
                                  f"validates: {parsed.detail}"[:1000], None)
                continue
            log_events.append(to_domain_event(parsed))
        try:
            outcome = self.engine.replay(before, log_events, self.now,
                                         arrived=arrived or (ev.event_id,))
        except Exception as exc:  # a bug for this event; infrastructure is not touched here
            raise _EventBug(accepted) from exc
        problem = outcome.verdicts.get(ev.event_id)
        if not outcome.applied or outcome.case is None:  # no opening event in the log
            self.new_rows.append(_event_row(accepted, "parked", outcome.problem, None))
            return Handled(ev.type, ev.platform, "parked", outcome.problem)
        self._keep(outcome)
        version = outcome.case.version
        if ev.event_id not in {row["event_id"] for row in self.new_rows}:
            self.new_rows.append(_event_row(accepted, "out_of_state" if problem else "applied",
                                            problem, version))
        for event_id, verdict in outcome.verdicts.items():
            self._set_outcome(event_id, "out_of_state" if verdict else "applied", verdict,
                              version)
        after = outcome.case
        return Handled(ev.type, ev.platform, "out_of_state" if problem else "accepted",
                       problem, str(after.kind), outcome.steps,
                       None if problem else seconds_to_resolution(before, after), rebuilt=True)

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
        """The case was just opened: the events that waited for it take effect, in event
        time (a rebuild of the case from its log, which holds them)."""
        waiting = self.parked.pop(case_id, [])
        opener = next(row for row in reversed(self.new_rows) if row["case_id"] == case_id)
        self._rebuild(_reparse(opener["body"]), self.cases[case_id],
                      arrived=(opener["event_id"], *(event_id for event_id, _ in waiting)))

    def _set_outcome(self, event_id: str, outcome: str, problem: str | None,
                     version: int | None) -> None:
        for row in self.new_rows:  # parked earlier in this same batch: not written yet
            if row["event_id"] == event_id:
                row.update(outcome=outcome, problem=problem, case_version=version)
                return
        self.updated_rows.append({"b_event_id": event_id, "b_outcome": outcome,
                                  "b_problem": problem, "b_version": version})


def _reparse(body: dict[str, Any]) -> Accepted:
    parsed = parse_event(json.dumps(body, ensure_ascii=False).encode(), 10**9)
    assert isinstance(parsed, Accepted), "a stored event always validates again"
    return parsed


def _event_row(accepted: Accepted, outcome: str, problem: str | None,
               version: int | None) -> dict[str, Any]:
    ev = accepted.event
    return {"event_id": ev.event_id, "case_id": ev.case_id, "type": ev.type,
            "occurred_at": ev.occurred_at, "outcome": outcome, "problem": problem,
            "case_version": version, "body": accepted.body,
            "body_sha256": accepted.content_hash}


class _SeenMeanwhile(Exception):
    """Another worker logged one of these event ids after this batch looked (same id on
    another case: their case locks do not serialise them). Nothing of the batch is
    committed; applied again one event at a time, the id is seen: duplicate or conflict."""


def _write_events(session: Session, batch: _Batch) -> None:
    if batch.new_rows:
        inserted = INSERT_EVENTS.execute(session, batch.new_rows).rowcount
        if inserted != len(batch.new_rows):
            raise _SeenMeanwhile(f"{len(batch.new_rows) - inserted} event id(s)")
    if batch.updated_rows:
        session.connection().execute(UPDATE_EVENT, batch.updated_rows)
    if batch.conflict_rows:
        INSERT_CONFLICTS.execute(session, batch.conflict_rows)


def _is_infrastructure(exc: BaseException) -> bool:
    """PostgreSQL unreachable or restarting: the caller retries the whole batch."""
    return isinstance(exc, DBAPIError) and is_infrastructure(exc)


def _parse(body: bytes, limits: Limits, received_at: datetime) -> Accepted | Rejection:
    try:
        return parse_event(body, limits=limits, now=received_at)
    except Exception as exc:  # a bug in validation must not end the worker
        log.exception("validating a message raised")
        return Rejection(RejectReason.internal_error, f"validation raised {exc!r}"[:1000])
