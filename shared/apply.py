"""Applying outcomes under case locks, shared by intake, the resolver and the recounts.

Each of them runs the same steps in one unit of work: lock the cases (`lock_and_load`),
load them, apply the domain in memory, collect the applied outcomes in an
`OutcomeWriter` and `flush` it. Here, not in storage, it is decided who is notified (the
notification policy expands each notice) and what the outbound decision message says
(`shared.schemas.decisions`). A batch that fails for a reason other than the database
being away is done again one item at a time (`whole_or_each`), so the good items go
through and the bad one gets its verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from shared.amqp import DECISIONS_EXCHANGE
from shared.db.outbox import DecisionRecord
from shared.db.persist import ChangeSet, write
from shared.db.uow import UnitOfWork
from shared.domain import Case, Notice, Outcome, decision_id
from shared.errors import is_transient
from shared.schemas.decisions import decision_message

log = logging.getLogger(__name__)


class NotificationExpander(Protocol):
    def expand(self, notice: Notice, contacts: Mapping[str, Any], ops_contacts: Any) -> list[Any]:
        ...


@dataclass(frozen=True)
class StoredDecision:
    type: str
    case_id: str
    platform: str
    kind: str
    superseded_type: str | None = None  # for decision.superseded: the withdrawn one's type


@dataclass
class Stored:
    """What a flush wrote, for metrics after the commit."""

    decisions: list[StoredDecision] = field(default_factory=list)
    notifications: int = 0  # notification rows offered (a dedup key already stored is skipped)
    deadlines_set: int = 0  # deadline rows inserted (rows still wanted are kept)


@dataclass
class OutcomeWriter:
    """Collects applied outcomes (in the order they were applied) and writes them in bulk."""

    policy: NotificationExpander
    ops_contacts: Any
    now: datetime
    changes: ChangeSet = field(init=False)
    _stored: dict[str, StoredDecision] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.changes = ChangeSet(self.now)

    def add(self, outcome: Outcome) -> None:
        case = outcome.case
        if case is None or not outcome.applied:
            raise ValueError("only an applied outcome with a case can be stored")
        records = []
        for decision in outcome.decisions:
            record = DecisionRecord(
                decision_id=decision_id(decision.key), case_id=case.case_id,
                type=decision.type, step=decision.step, decided_at=decision.decided_at,
                message=decision_message(decision, case), exchange=DECISIONS_EXCHANGE,
                routing_key=decision.type)
            records.append(record)
            self._stored[record.decision_id] = StoredDecision(
                decision.type, case.case_id, case.platform, str(case.kind),
                decision.data.get("superseded_type"))
        notifications = [request for notice in outcome.notices
                         for request in self.policy.expand(notice, case.contacts,
                                                           self.ops_contacts)]
        self.changes.add(outcome, records, notifications)

    def add_case(self, case: Case) -> None:
        """Store a case whose bookkeeping changed without an applied change (its deadlines,
        decisions and notifications stay as they are)."""
        self.changes.add_case(case)

    def __bool__(self) -> bool:
        return bool(self.changes)

    def flush(self, uow: UnitOfWork) -> Stored:
        written = write(uow, self.changes)
        return Stored([self._stored[r.decision_id] for r in written.new_decisions],
                      written.notifications, written.deadlines.inserted)


def lock_and_load(uow: UnitOfWork, wanted: Iterable[str], *, wait: bool = True
                  ) -> tuple[set[str], dict[str, Case]]:
    """Lock the wanted cases and load those that exist; returns (locked, cases).

    Without `wait`, only the cases free now are locked: one another worker holds is left
    for the caller's next batch instead of stalling the whole batch behind that worker's
    transaction. If every case is held, it waits: a batch always makes progress."""
    wanted = set(wanted)
    locked = set() if wait else uow.cases.try_lock(wanted)
    if not locked:  # asked to wait, or every case is held: wait for all
        uow.cases.lock(wanted)
        locked = wanted
    return locked, uow.cases.load(locked)


T = TypeVar("T")
B = TypeVar("B")
O = TypeVar("O")  # noqa: E741


def whole_or_each(items: Sequence[T], whole: Callable[[Sequence[T]], B],
                  alone: Callable[[T], O], failed: Callable[[T, Exception], O]
                  ) -> B | list[O]:
    """`whole(items)`, in one unit of work. If that raises anything but a transient
    database failure (which the caller retries), each item is done alone, in its own unit
    of work, and an item that still raises gets `failed(item, exc)`: one bad item cannot
    hold back the others, nor be retried forever."""
    try:
        return whole(items)
    except Exception as exc:
        if is_transient(exc):
            raise
        log.warning("batch of %d failed (%s); one at a time", len(items), type(exc).__name__)
    out: list[O] = []
    for item in items:
        try:
            out.append(alone(item))
        except Exception as exc:
            if is_transient(exc):
                raise
            out.append(failed(item, exc))
    return out
