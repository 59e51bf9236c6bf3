"""Writing what applied domain outcomes change, in bulk, through a unit of work.

A service applies a batch of events (intake) or fired deadlines (resolver) to the cases
in memory and collects the changes in a `ChangeSet` (shared/apply.py fills it: it also
decides who is notified and builds the outbound messages). `write` stores them with a
handful of statements inside the transaction that holds the case locks:
- the cases' final states (one upsert),
- for every case whose deadlines changed: its open deadlines made the new full set (the
  domain always gives the full set; only the rows that change are written),
- the decisions, each new one with an outbox row (a decision already stored, e.g.
  decided again after a crash, gets no second row),
- the notifications, written `new` (a dedup key already stored is not written again);
  the notifications table is the notifier's own outbox: the timer hands new rows over.
Statements are built once, with bound parameters (building them per call was most of the
resolver's CPU), and rows go as one array per column (`shared/db/bulk.py`), so a batch is
one execution per table (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from shared.db.cases import lock_cases as lock_cases
from shared.db.cases import try_lock_cases as try_lock_cases
from shared.db.deadlines import WantedSetChanges
from shared.db.notifications import NewNotification
from shared.db.outbox import DecisionRecord
from shared.db.uow import UnitOfWork
from shared.domain import Case, DeadlineSpec, Outcome


@dataclass
class ChangeSet:
    """Applied outcomes, in the order they were applied, collected for one write."""

    now: datetime
    cases: dict[str, Case] = field(default_factory=dict)
    deadlines: dict[str, Sequence[DeadlineSpec]] = field(default_factory=dict)
    decisions: dict[str, DecisionRecord] = field(default_factory=dict)
    notifications: dict[str, NewNotification] = field(default_factory=dict)

    def add(self, outcome: Outcome, decisions: Iterable[DecisionRecord] = (),
            notifications: Iterable[NewNotification] = ()) -> None:
        case = outcome.case
        if case is None or not outcome.applied:
            raise ValueError("only an applied outcome with a case can be stored")
        self.cases[case.case_id] = case
        if outcome.deadlines is not None:
            self.deadlines[case.case_id] = outcome.deadlines  # the latest full set wins
        for record in decisions:
            self.decisions[record.decision_id] = record
        for notification in notifications:
            self.notifications.setdefault(notification.dedup_key, notification)

    def add_case(self, case: Case) -> None:
        """Store a case whose bookkeeping changed without an applied change (its deadlines,
        decisions and notifications stay as they are)."""
        self.cases[case.case_id] = case

    def __bool__(self) -> bool:
        return bool(self.cases)


@dataclass(frozen=True)
class Written:
    new_decisions: list[DecisionRecord] = field(default_factory=list)
    notifications: int = 0  # rows offered (a dedup key already stored is skipped)
    deadlines: WantedSetChanges = field(default_factory=WantedSetChanges)


def write(uow: UnitOfWork, changes: ChangeSet) -> Written:
    if not changes:
        return Written()
    uow.cases.save(changes.cases.values(), changes.now)
    deadlines = uow.deadlines.set_wanted(changes.deadlines)
    records = list(changes.decisions.values())
    inserted = uow.outbox.add_decisions(records)
    notifications = uow.notifications.add_new(list(changes.notifications.values()))
    # Already decided (a redelivery): no second decision row, no second publish.
    return Written([r for r in records if r.decision_id in inserted], notifications,
                   deadlines)
