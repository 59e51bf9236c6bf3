"""Recount, in the database, every pending deadline that stood on an estimated calendar
(`shared.domain.recompute`): run by the timer at start and by `aftersales calendar
recompute`.

Cases are found through their pending deadlines marked `calendar_source = 'estimated'`
(a partial index), then handled in batches, each in one transaction under the cases'
locks like any other change: the case, its new deadlines and the notices are written by
the `OutcomeWriter` (shared/apply.py), and a `case_notes` row records each move for the
timeline. Safe to run from several timer copies at once: a case already recounted is no
longer estimated (or gives the same day) and is left alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.apply import NotificationExpander, OutcomeWriter, lock_and_load
from shared.db.cases import CaseNote
from shared.db.session import Database
from shared.db.uow import UnitOfWorkFactory, as_unit_of_work_factory
from shared.domain import Engine
from shared.domain.model import Case
from shared.domain.recompute import Recount, recount, switch_running


@dataclass
class RecountSummary:
    label: str = "pending deadlines on an estimated calendar"
    checked: int = 0  # cases looked at
    earlier: int = 0
    later: int = 0
    same_day: int = 0  # now on official data, the deadline did not move
    still_estimated: int = 0
    shifts: Counter[int] = field(default_factory=Counter)  # shift in days -> cases
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return self.earlier + self.later + self.same_day

    def lines(self) -> list[str]:
        out = [f"{self.label}: {self.checked} case(s)",
               f"  recounted on official data: {self.changed} (earlier {self.earlier}, "
               f"later {self.later}, same day {self.same_day})",
               f"  still estimated (no official data yet): {self.still_estimated}"]
        if self.label != RecountSummary.label:
            out[1:] = [f"  changed: {self.changed} (earlier {self.earlier}, later "
                       f"{self.later}, same time {self.same_day})"]
        for days, n in sorted(self.shifts.items()):
            out.append(f"  moved {days:+d} day(s): {n}")
        for ex in self.examples:
            out.append(f"  e.g. {ex['case_id']} step {ex['step']}: {ex['old_due_at']} -> "
                       f"{ex['new_due_at']}")
        return out


Change = Callable[[Engine, Case, datetime], Recount | None]


def recount_estimated(db: Database | UnitOfWorkFactory, engine: Engine,
                      policy: NotificationExpander, ops_contacts: Any, *, batch: int = 500,
                      examples: int = 5,
                      clock: Callable[[], datetime] = lambda: datetime.now(UTC)
                      ) -> RecountSummary:
    summary = RecountSummary()
    uow_factory = as_unit_of_work_factory(db)
    with uow_factory() as uow:
        case_ids = uow.deadlines.estimated_cases()
    for start in range(0, len(case_ids), batch):
        _recount_batch(uow_factory, engine, policy, ops_contacts, case_ids[start:start + batch],
                       summary, examples, clock(), recount)
    return summary


def switch_running_steps(db: Database | UnitOfWorkFactory, engine: Engine,
                         policy: NotificationExpander, ops_contacts: Any, *, batch: int = 500,
                         examples: int = 5
                         ) -> RecountSummary:
    """Give running steps the rule of a version that says it applies to them, once it
    is in effect (the timer runs this at start and when such a version takes effect)."""
    summary = RecountSummary(label="running steps switched to a newer rule version")
    uow_factory = as_unit_of_work_factory(db)
    with uow_factory() as uow:  # one clock decides: the database's
        now = uow.now()
    moments = [m for m in engine.rules.switch_moments if m <= now]
    if not moments:
        return summary
    with uow_factory() as uow:
        case_ids = uow.cases.running_candidates(moments[0], moments[-1])
    for start in range(0, len(case_ids), batch):
        _recount_batch(uow_factory, engine, policy, ops_contacts, case_ids[start:start + batch],
                       summary, examples, now, switch_running)
    return summary


def _recount_batch(uow_factory: UnitOfWorkFactory, engine: Engine,
                   policy: NotificationExpander, ops_contacts: Any, case_ids: list[str],
                   summary: RecountSummary, examples: int, now: datetime, change: Change
                   ) -> None:
    with uow_factory() as uow:
        _locked, cases = lock_and_load(uow, case_ids)
        writer = OutcomeWriter(policy, ops_contacts, now)
        notes = []
        for case in cases.values():
            summary.checked += 1
            result = change(engine, case, now)
            if result is None:
                summary.still_estimated += 1
                continue
            writer.add(result.outcome)
            notes.append(CaseNote(case.case_id, now, result.note_type, result.note()))
            shift = result.shift_seconds
            if shift < 0:
                summary.earlier += 1
            elif shift > 0:
                summary.later += 1
            else:
                summary.same_day += 1
            if result.new_source == "estimated":  # a new estimate, still not official
                summary.still_estimated += 1
            summary.shifts[round(shift / 86400)] += 1
            if len(summary.examples) < examples:
                summary.examples.append({"case_id": case.case_id, **result.note()})
        if notes:
            writer.flush(uow)
            uow.cases.add_notes(notes)
        uow.commit()
