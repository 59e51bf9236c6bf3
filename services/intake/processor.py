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

from sqlalchemy.exc import DBAPIError

from shared.apply import NotificationExpander, OutcomeWriter, Stored, lock_and_load, whole_or_each
from shared.db.case_log import Conflict, EventOutcome, LoggedEvent, OutcomeChange
from shared.db.session import Database, DatabaseClock
from shared.db.uow import UnitOfWork, UnitOfWorkFactory, as_unit_of_work_factory
from shared.domain import Case, Engine, Event, Outcome, StepResult, seconds_to_resolution
from shared.errors import is_transient
from shared.schemas.events import Accepted, Limits, Rejection, RejectReason, parse_event

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

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


# How long a reading of the database's clock serves for the plausible-time window of the
# batches after it, advanced by the host's monotonic clock (never its wall clock). Each
# batch's own transaction reads the clock again, so a busy intake never reads it alone.
CLOCK_READING_MAX_AGE_S = 30.0


class _EventBug(Exception):
    """Applying one event raised something that is not an infrastructure failure."""

    def __init__(self, accepted: Accepted) -> None:
        super().__init__(accepted.event.event_id)
        self.accepted = accepted


class IntakeProcessor:
    def __init__(
        self,
        db: Database | UnitOfWorkFactory,
        engine: Engine,
        policy: NotificationExpander,
        ops_contacts: Any,
        max_event_bytes: int,
        clock: Clock | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.uow = as_unit_of_work_factory(db)
        self.engine = engine
        self.policy = policy
        self.ops_contacts = ops_contacts
        self.max_event_bytes = max_event_bytes
        # None: the database's clock, the one that decides due-ness (tests may fix one).
        self.clock = clock
        # The last reading of the database's clock.
        self._clock_reading: DatabaseClock | None = None
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
        received_at = self.clock() if self.clock is not None else self._received_at()
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
        # One event may hit a bug in the code, or a value the database refuses: then the
        # batch is done again one event per transaction, so the good ones go through and
        # the bad one is recorded, not retried forever.
        done = whole_or_each(
            indexed,
            lambda items: self._apply_batch([a for _i, a in items], wait=False),
            lambda item: self._apply_batch([item[1]], wait=True)[0][0],
            lambda item, exc: self._record_error(item[1], exc))
        if isinstance(done, list):
            for (index, _one), verdict in zip(indexed, done, strict=True):
                if isinstance(verdict, Rejection):
                    result.rejected.append((index, verdict))
                else:
                    result.handled.append(verdict)
            result.rejected.sort(key=lambda item: item[0])
        else:
            result.handled, result.stored, busy = done
            result.deferred = sorted(i for i, a in indexed if a.event.case_id in busy)
        return result

    def _record_error(self, accepted: Accepted, exc: Exception) -> Handled | Rejection:
        """Applied alone, the event still raised: its verdict is an error in the case log
        (or, if even that cannot be written, a rejection for ops)."""
        cause = exc.__cause__ if isinstance(exc, _EventBug) else exc
        if isinstance(cause, DBAPIError):
            cause = cause.orig
        problem = f"error: {cause!r}"[:1000]
        log.error("event %s could not be applied: %s", accepted.event.event_id, problem)
        try:
            with self.uow() as uow:
                # Under the case's lock, and lowering its `records_since` if it exists:
                # a worker creating the case meanwhile either sees this row or is seen.
                case_id = accepted.event.case_id
                uow.cases.lock([case_id])
                uow.case_log.add([_logged(accepted, EventOutcome.error, problem, None)])
                uow.cases.lower_records_since_to_now(case_id)
                uow.commit()
        except Exception as exc2:
            if is_transient(exc2):
                raise
            # Not even the error could be recorded: the message itself goes to ops.
            log.error("event %s could not be recorded either (%r)",
                      accepted.event.event_id, exc2)
            return Rejection(RejectReason.internal_error, problem)
        return Handled(accepted.event.type, accepted.event.platform, "error", problem)

    def _received_at(self) -> datetime:
        """The database's time now, for the plausible-time window: the last batch's reading
        of it advanced by the monotonic clock, or a reading of its own when there is none
        this recent (a transaction of its own cost every batch one more round trip)."""
        reading = self._clock_reading
        if reading is None or reading.age() > CLOCK_READING_MAX_AGE_S:
            with self.uow() as uow:
                reading = self._clock_reading = DatabaseClock(uow.now())
        return reading()

    def _apply_batch(self, ordered: list[Accepted], *, wait: bool
                     ) -> tuple[list[Handled], Stored, set[str]]:
        """Apply the events whose cases this transaction can lock; returns what became of
        them and the cases left alone. Without `wait`, a case another worker holds is left
        for the next batch instead of stalling the whole batch behind that worker's
        transaction (with two intake workers that wait was 41 % of intake's time). If
        every case is held, it waits: a batch always makes progress."""
        with self.uow() as uow:
            if self.clock is not None:
                now = self.clock()
            else:
                now = uow.now()
                self._clock_reading = DatabaseClock(now)
            batch = _Batch(self.engine, OutcomeWriter(self.policy, self.ops_contacts, now), now)
            wanted = {a.event.case_id for a in ordered}
            case_ids, batch.cases = lock_and_load(uow, wanted, wait=wait)
            busy = wanted - case_ids
            ordered = [a for a in ordered if a.event.case_id in case_ids]
            batch.seen = uow.case_log.seen(a.event.event_id for a in ordered)
            batch.load_log = uow.case_log.accepted_of
            missing = case_ids - batch.cases.keys()
            for row in uow.case_log.early_rows_of(missing):
                if row.outcome == EventOutcome.parked and row.body is not None:
                    batch.parked.setdefault(row.case_id, []).append((row.event_id, row.body))
                first = batch.early.get(row.case_id)
                if first is None or row.received_at < first:
                    batch.early[row.case_id] = row.received_at
            handled = [batch.apply(a) for a in ordered]
            _write_events(uow, batch)
            stored = batch.writer.flush(uow)
            # The cases created now start their `records_since` at this transaction's
            # time; rows written about them before they existed are older.
            uow.cases.lower_records_since(batch.early)
            uow.commit()
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
    # Per case not opened yet: when its first row was written (parked, expired, error).
    early: dict[str, datetime] = field(default_factory=dict)
    new_rows: list[LoggedEvent] = field(default_factory=list)
    updated_rows: list[OutcomeChange] = field(default_factory=list)
    conflict_rows: list[Conflict] = field(default_factory=list)
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
            self.conflict_rows.append(Conflict(ev.event_id, ev.case_id, accepted.body,
                                               accepted.content_hash, first))
            log.warning("%s", problem[:300])
            return Handled(ev.type, ev.platform, "conflict", problem)
        self.seen[ev.event_id] = accepted.content_hash
        before = self.cases.get(ev.case_id)
        event = to_domain_event(accepted)
        if before is not None and self.engine.needs_replay(before, event):
            return self._rebuild(accepted, before)
        outcome = self._engine_apply(accepted, event, before)
        if before is None and outcome.case is None:
            # Out of order: the case is not opened yet. Keep the event; it is applied when
            # the event that opens the case arrives.
            problem = f"parked: case not opened yet ({outcome.problem})"
            self.new_rows.append(_logged(accepted, EventOutcome.parked, problem, None))
            self.parked.setdefault(ev.case_id, []).append((ev.event_id, accepted.body))
            return Handled(ev.type, ev.platform, "parked", problem)
        if not outcome.applied or outcome.case is None:
            version = before.version if before else None
            if outcome.case is not None and outcome.case != before:
                # unchanged but for its fact time: an earlier fact arriving later rebuilds
                self.cases[ev.case_id] = outcome.case
                self.writer.add_case(outcome.case)
            self.new_rows.append(_logged(accepted, EventOutcome.out_of_state, outcome.problem,
                                         version))
            return Handled(ev.type, ev.platform, "out_of_state", outcome.problem)
        self._keep(outcome)
        # deadlines that passed before the event happened fired first; the event itself
        # may not fit the state they left
        verdict = EventOutcome.out_of_state if outcome.problem else EventOutcome.applied
        self.new_rows.append(_logged(accepted, verdict, outcome.problem,
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
            if row.case_id == case_id and row.outcome != EventOutcome.error:
                bodies[row.event_id] = row.body
        bodies[ev.event_id] = accepted.body
        log_events = []
        for event_id, body in bodies.items():
            parsed = parse_event(json.dumps(body, ensure_ascii=False).encode(), 10**9)
            if isinstance(parsed, Rejection):
                # Stored before the contract was this strict: kept, with what is wrong.
                self._set_outcome(event_id, EventOutcome.error, f"error: stored event no longer "
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
            self.new_rows.append(_logged(accepted, EventOutcome.parked, outcome.problem, None))
            return Handled(ev.type, ev.platform, "parked", outcome.problem)
        self._keep(outcome)
        version = outcome.case.version
        if ev.event_id not in {row.event_id for row in self.new_rows}:
            self.new_rows.append(_logged(
                accepted, EventOutcome.out_of_state if problem else EventOutcome.applied,
                problem, version))
        for event_id, verdict in outcome.verdicts.items():
            self._set_outcome(event_id,
                              EventOutcome.out_of_state if verdict else EventOutcome.applied,
                              verdict, version)
        after = outcome.case
        return Handled(ev.type, ev.platform, "out_of_state" if problem else "accepted",
                       problem, str(after.kind), outcome.steps,
                       None if problem else seconds_to_resolution(before, after), rebuilt=True)

    def _engine_apply(self, accepted: Accepted, event: Event, case: Case | None) -> Outcome:
        try:
            return self.engine.apply(case, event, self.now)
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
        opener = next(row for row in reversed(self.new_rows) if row.case_id == case_id)
        self._rebuild(_reparse(opener.body), self.cases[case_id],
                      arrived=(opener.event_id, *(event_id for event_id, _ in waiting)))

    def _set_outcome(self, event_id: str, outcome: EventOutcome, problem: str | None,
                     version: int | None) -> None:
        for row in self.new_rows:  # parked earlier in this same batch: not written yet
            if row.event_id == event_id:
                row.outcome, row.problem, row.case_version = outcome, problem, version
                return
        self.updated_rows.append(OutcomeChange(event_id, outcome, problem, version))


def _reparse(body: dict[str, Any]) -> Accepted:
    parsed = parse_event(json.dumps(body, ensure_ascii=False).encode(), 10**9)
    assert isinstance(parsed, Accepted), "a stored event always validates again"
    return parsed


def _logged(accepted: Accepted, outcome: EventOutcome, problem: str | None,
            version: int | None) -> LoggedEvent:
    ev = accepted.event
    return LoggedEvent(ev.event_id, ev.case_id, ev.type, ev.occurred_at, outcome, problem,
                       version, accepted.body, accepted.content_hash)


class _SeenMeanwhile(Exception):
    """Another worker logged one of these event ids after this batch looked (same id on
    another case: their case locks do not serialise them). Nothing of the batch is
    committed; applied again one event at a time, the id is seen: duplicate or conflict."""


def _write_events(uow: UnitOfWork, batch: _Batch) -> None:
    inserted = uow.case_log.add(batch.new_rows)
    if inserted != len(batch.new_rows):
        raise _SeenMeanwhile(f"{len(batch.new_rows) - inserted} event id(s)")
    uow.case_log.change_outcomes(batch.updated_rows)
    uow.case_log.add_conflicts(batch.conflict_rows)


def _parse(body: bytes, limits: Limits, received_at: datetime) -> Accepted | Rejection:
    try:
        return parse_event(body, limits=limits, now=received_at)
    except Exception as exc:  # a bug in validation must not end the worker
        log.exception("validating a message raised")
        return Rejection(RejectReason.internal_error, f"validation raised {exc!r}"[:1000])
