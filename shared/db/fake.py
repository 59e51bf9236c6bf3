"""An in-memory unit of work with the same repositories as `SqlUnitOfWork`, for unit
tests of the services' logic (cosmicpython's FakeUnitOfWork).

`FakeDatabase` holds the tables; each `FakeUnitOfWork` works on a copy and writes it back
on `commit`, so a unit of work left without a commit changes nothing, as in PostgreSQL.
Its clock is `FakeDatabase.clock` (what the database's clock would say); `held` are case
ids another worker holds locked (try_lock leaves them, lock would wait: here it raises).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from shared.db.case_log import (
    ACCEPTED_OUTCOMES,
    EARLY_OUTCOMES,
    Conflict,
    EarlyRow,
    EventOutcome,
    LoggedEvent,
    OutcomeChange,
    ParkedEvent,
    ParkedStats,
)
from shared.db.cases import CaseNote
from shared.db.deadlines import (
    OPEN_STATUSES,
    DeadlineStatus,
    Due,
    Finished,
    StoredDeadline,
    WantedSetChanges,
    calendar_source,
    plan_wanted_set,
    same_deadline,
)
from shared.db.notifications import NEW, NewNotification
from shared.db.outbox import DecisionRecord, OutboxMessage
from shared.db.uow import UnitOfWork
from shared.domain import Case, DeadlineSpec


@dataclass
class DeadlineRecord:
    id: int
    spec: DeadlineSpec
    status: DeadlineStatus = DeadlineStatus.pending
    calendar_source: str | None = None
    dispatched_at: datetime | None = None
    dispatch_count: int = 0
    fired_at: datetime | None = None
    result: str | None = None


@dataclass
class NotificationRecord:
    id: int
    request: NewNotification
    created_at: datetime
    status: str = NEW
    queued_at: datetime | None = None
    send_after: datetime | None = None


@dataclass
class Tables:
    cases: dict[str, Case] = field(default_factory=dict)
    notes: list[CaseNote] = field(default_factory=list)
    events: dict[str, LoggedEvent] = field(default_factory=dict)
    received_at: dict[str, datetime] = field(default_factory=dict)
    records_since: dict[str, datetime] = field(default_factory=dict)  # per case
    conflicts: list[Conflict] = field(default_factory=list)
    deadlines: dict[int, DeadlineRecord] = field(default_factory=dict)
    decisions: dict[str, DecisionRecord] = field(default_factory=dict)
    outbox: dict[int, OutboxMessage] = field(default_factory=dict)
    notifications: dict[int, NotificationRecord] = field(default_factory=dict)
    next_id: int = 1

    def copy(self) -> Tables:
        """A copy a unit of work may change: the mutable rows copied, the immutable domain
        values (cases, specs, bodies as written) shared."""
        return Tables(
            cases=dict(self.cases), notes=list(self.notes),
            events={k: replace(v) for k, v in self.events.items()},
            received_at=dict(self.received_at), records_since=dict(self.records_since),
            conflicts=list(self.conflicts),
            deadlines={k: replace(v) for k, v in self.deadlines.items()},
            decisions=dict(self.decisions), outbox=dict(self.outbox),
            notifications={k: replace(v) for k, v in self.notifications.items()},
            next_id=self.next_id)

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


class FakeDatabase:
    def __init__(self, clock: datetime | None = None) -> None:
        self.tables = Tables()
        self.clock = clock or datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
        self.held: set[str] = set()
        self.commits = 0

    def unit_of_work(self) -> FakeUnitOfWork:
        return FakeUnitOfWork(self)

    def __call__(self) -> FakeUnitOfWork:  # a UnitOfWorkFactory
        return self.unit_of_work()

    def advance(self, seconds: float) -> None:
        self.clock += timedelta(seconds=seconds)


class FakeCases:
    def __init__(self, t: Tables, db: FakeDatabase) -> None:
        self.t, self.db = t, db

    def lock(self, case_ids: Iterable[str]) -> None:
        if self.db.held & set(case_ids):
            raise RuntimeError("would wait for another worker's lock")

    def try_lock(self, case_ids: Iterable[str]) -> set[str]:
        return set(case_ids) - self.db.held

    def load(self, case_ids: Iterable[str]) -> dict[str, Case]:
        return {c: self.t.cases[c] for c in set(case_ids) if c in self.t.cases}

    def save(self, cases: Iterable[Case], now: datetime) -> None:
        for case in cases:
            if case.case_id not in self.t.cases:
                self.t.records_since[case.case_id] = self.db.clock
            self.t.cases[case.case_id] = case

    def lower_records_since_to_now(self, case_id: str) -> None:
        self.lower_records_since({case_id: self.db.clock})

    def lower_records_since(self, earliest: Mapping[str, datetime]) -> None:
        for case_id, at in earliest.items():
            if case_id in self.t.records_since:
                self.t.records_since[case_id] = min(self.t.records_since[case_id], at)

    def running_candidates(self, first: datetime, last: datetime) -> list[str]:
        return sorted(c.case_id for c in self.t.cases.values()
                      if c.is_open and c.opened_at < last and c.step_due_at is not None
                      and c.step_due_at > first)

    def add_notes(self, notes: Sequence[CaseNote]) -> None:
        self.t.notes.extend(notes)


class FakeCaseLog:
    def __init__(self, t: Tables, db: FakeDatabase) -> None:
        self.t, self.db = t, db

    def seen(self, event_ids: Iterable[str]) -> dict[str, str | None]:
        return {e: self.t.events[e].body_sha256 for e in set(event_ids) if e in self.t.events}

    def early_rows_of(self, case_ids: Iterable[str]) -> list[EarlyRow]:
        ids = set(case_ids)
        early = [e for e in self.t.events.values()
                 if e.case_id in ids and e.outcome in EARLY_OUTCOMES]
        early.sort(key=lambda e: (e.occurred_at, self.t.received_at[e.event_id]))
        return [EarlyRow(e.event_id, e.case_id, e.outcome, self.t.received_at[e.event_id],
                         e.body if e.outcome == EventOutcome.parked else None)
                for e in early]

    def accepted_of(self, case_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [(e.event_id, e.body) for e in self.t.events.values()
                if e.case_id == case_id and e.outcome in ACCEPTED_OUTCOMES]

    def add(self, events: Sequence[LoggedEvent]) -> int:
        added = 0
        for event in events:
            if event.event_id not in self.t.events:
                self.t.events[event.event_id] = replace(event)
                self.t.received_at[event.event_id] = self.db.clock
                added += 1
        return added

    def change_outcomes(self, changes: Sequence[OutcomeChange]) -> None:
        for c in changes:
            event = self.t.events[c.event_id]
            event.outcome, event.problem, event.case_version = \
                c.outcome, c.problem, c.case_version

    def add_conflicts(self, conflicts: Sequence[Conflict]) -> None:
        self.t.conflicts.extend(conflicts)

    def parked_longer_than(self, max_age_seconds: float, limit: int) -> list[tuple[str, str]]:
        since = self.db.clock - timedelta(seconds=max_age_seconds)
        parked = sorted((self.t.received_at[e.event_id], e.event_id, e.case_id)
                        for e in self.t.events.values()
                        if e.outcome == EventOutcome.parked
                        and self.t.received_at[e.event_id] < since)
        return [(event_id, case_id) for _at, event_id, case_id in parked[:limit]]

    def still_parked(self, event_ids: Sequence[str]) -> list[ParkedEvent]:
        rows = [ParkedEvent(e.event_id, e.case_id, e.body, self.t.received_at[e.event_id])
                for e in (self.t.events[i] for i in event_ids if i in self.t.events)
                if e.outcome == EventOutcome.parked]
        return sorted(rows, key=lambda r: r.received_at)

    def expire(self, event_ids: Sequence[str], problem: str) -> None:
        for event_id in event_ids:
            event = self.t.events[event_id]
            event.outcome, event.problem = EventOutcome.expired, problem

    def parked_stats(self) -> ParkedStats:
        times = [self.t.received_at[e.event_id] for e in self.t.events.values()
                 if e.outcome == EventOutcome.parked]
        oldest = (self.db.clock - min(times)).total_seconds() if times else None
        return ParkedStats(len(times), oldest)


class FakeDeadlines:
    def __init__(self, t: Tables, db: FakeDatabase) -> None:
        self.t, self.db = t, db

    def open_of(self, case_id: str) -> list[DeadlineRecord]:
        return [d for d in self.t.deadlines.values()
                if d.spec.case_id == case_id and d.status in OPEN_STATUSES]

    def set_wanted(self, wanted: Mapping[str, Sequence[DeadlineSpec]]) -> WantedSetChanges:
        open_rows = [(d.id, same_deadline(d.spec, d.calendar_source), d.spec.fence)
                     for d in self.t.deadlines.values()
                     if d.spec.case_id in wanted and d.status in OPEN_STATUSES]
        plan = plan_wanted_set(open_rows, wanted)
        for row_id in plan.cancel:
            del self.t.deadlines[row_id]
        for row_id, fence in plan.refence:
            record = self.t.deadlines[row_id]
            record.spec = replace(record.spec, fence=fence)
        for spec in plan.insert:
            row_id = self.t.new_id()
            # stored as the SQL repository reads it back: the calendar only as its source
            self.t.deadlines[row_id] = DeadlineRecord(row_id, replace(spec, calendar=None),
                                                      calendar_source=calendar_source(spec))
        return WantedSetChanges(plan.kept, len(plan.cancel), len(plan.insert))

    def claim_due(self, limit: int) -> list[Due]:
        due = sorted((d for d in self.t.deadlines.values()
                      if d.status == DeadlineStatus.pending and d.spec.due_at <= self.db.clock),
                     key=lambda d: d.spec.due_at)
        return [Due(d.id, d.spec.purpose, (self.db.clock - d.spec.due_at).total_seconds())
                for d in due[:limit]]

    def claim_stuck(self, after_seconds: float, limit: int) -> list[int]:
        since = self.db.clock - timedelta(seconds=after_seconds)
        stuck = sorted((d for d in self.t.deadlines.values()
                        if d.status == DeadlineStatus.dispatched
                        and d.dispatched_at is not None and d.dispatched_at < since),
                       key=lambda d: d.dispatched_at or since)
        return [d.id for d in stuck[:limit]]

    def mark_dispatched(self, ids: Sequence[int]) -> None:
        for row_id in ids:
            d = self.t.deadlines[row_id]
            d.status, d.dispatched_at = DeadlineStatus.dispatched, self.db.clock
            d.dispatch_count += 1

    def cases_of(self, ids: Sequence[int]) -> list[str]:
        return [self.t.deadlines[i].spec.case_id for i in ids if i in self.t.deadlines]

    def claim(self, ids: Sequence[int]) -> list[StoredDeadline]:
        rows = sorted((self.t.deadlines[i] for i in set(ids) if i in self.t.deadlines),
                      key=lambda d: (d.spec.case_id, d.spec.due_at, d.id))
        return [StoredDeadline(d.id, d.status, d.spec) for d in rows]

    def finish(self, rows: Sequence[Finished]) -> None:
        for r in rows:
            d = self.t.deadlines[r.id]
            d.status, d.fired_at, d.result = r.status, r.fired_at, r.result

    def estimated_cases(self) -> list[str]:
        return sorted({d.spec.case_id for d in self.t.deadlines.values()
                       if d.status == DeadlineStatus.pending
                       and d.calendar_source == "estimated"})


class FakeOutbox:
    def __init__(self, t: Tables) -> None:
        self.t = t

    def add_decisions(self, decisions: Sequence[DecisionRecord]) -> set[str]:
        import json

        inserted = set()
        for d in decisions:
            if d.decision_id in self.t.decisions:
                continue
            self.t.decisions[d.decision_id] = d
            inserted.add(d.decision_id)
            row_id = self.t.new_id()
            self.t.outbox[row_id] = OutboxMessage(
                row_id, d.exchange, d.routing_key, d.decision_id,
                json.dumps(d.message, ensure_ascii=False).encode(), None)
        return inserted


class FakeNotifications:
    def __init__(self, t: Tables, db: FakeDatabase) -> None:
        self.t, self.db = t, db

    def add_new(self, notifications: Sequence[NewNotification]) -> int:
        stored = {n.request.dedup_key for n in self.t.notifications.values()}
        for n in notifications:
            if n.dedup_key not in stored:
                row_id = self.t.new_id()
                self.t.notifications[row_id] = NotificationRecord(row_id, n, self.db.clock)
                stored.add(n.dedup_key)
        return len(notifications)

    def claim_for_notifier(self, limit: int, requeue_after_seconds: float
                           ) -> list[tuple[int, datetime]]:
        rows = self.t.notifications.values()
        since = self.db.clock - timedelta(seconds=requeue_after_seconds)
        new = sorted(n.id for n in rows if n.status == NEW)
        deferred = [n.id for n in sorted(
            (n for n in rows if n.status == "deferred" and n.send_after is not None
             and n.send_after <= self.db.clock), key=lambda n: n.send_after or since)]
        lost = [n.id for n in sorted(
            (n for n in rows if n.status == "queued" and n.queued_at is not None
             and n.queued_at < since), key=lambda n: n.queued_at or since)]
        return [(i, self.t.notifications[i].created_at)
                for i in (deferred + new + lost)[:limit]]

    def mark_queued(self, rows: Sequence[tuple[int, datetime]]) -> None:
        for row_id, _created in rows:
            n = self.t.notifications[row_id]
            n.status, n.queued_at = "queued", self.db.clock


class FakeUnitOfWork(UnitOfWork):
    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self.committed = False
        self._open(db.tables.copy())

    def _open(self, tables: Tables) -> None:
        self.tables = tables
        self.cases = FakeCases(tables, self.db)
        self.case_log = FakeCaseLog(tables, self.db)
        self.deadlines = FakeDeadlines(tables, self.db)
        self.outbox = FakeOutbox(tables)
        self.notifications = FakeNotifications(tables, self.db)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.rollback()

    def commit(self) -> None:
        self.db.tables = self.tables
        self.db.commits += 1
        self.committed = True
        self._open(self.tables.copy())

    def rollback(self) -> None:
        self._open(self.db.tables.copy())

    def now(self) -> datetime:
        return self.db.clock


class FakeRelayStore:
    """The relay's side of the fake outbox: leadership is a flag another relay may hold."""

    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self.other_leads = False
        self.leading = False
        self._tables: Tables | None = None

    def lead(self) -> bool:
        self.leading = self.leading or not self.other_leads
        return self.leading

    def step_down(self) -> None:
        self.leading = False
        self._tables = None

    def claim(self, after: int, limit: int) -> list[OutboxMessage]:
        self._tables = self.db.tables.copy()
        return [self._tables.outbox[i] for i in sorted(self._tables.outbox) if i > after][:limit]

    def delete(self, ids: Sequence[int]) -> None:
        assert self._tables is not None
        for row_id in ids:
            self._tables.outbox.pop(row_id, None)

    def end(self, commit: bool) -> None:
        if commit and self._tables is not None:
            self.db.tables = self._tables
        self._tables = None
