"""Recounting working-day deadlines that stood on an estimated calendar.

When official holiday data arrives for a year that was estimated (a new chinesecalendar
release, or the year added to the user holiday file), every pending deadline counted on
the estimate is counted again from the same start with the same number of working days.
The step's deadline moves by the difference (so a clock paused for an intervention and
resumed keeps its shift), the case advances one version (its deadlines get a new fence),
and the party who must act hears of the new deadline as for a platform's
`deadline.changed`.

Pure, like the engine: the caller loads the case, passes `now`, stores the outcome and
writes the timeline note (`Recount.note`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from shared.domain.calendar import CALENDAR_KEY
from shared.domain.engine import Engine
from shared.domain.flows import step_def
from shared.domain.model import Case, Notice, Outcome, Party
from shared.domain.timeutil import as_utc, local_text, parse_moment

NOTE_TYPE = "calendar.recomputed"


@dataclass(frozen=True)
class Recount:
    outcome: Outcome
    old_due_at: datetime
    new_due_at: datetime
    old_source: str
    new_source: str

    @property
    def case(self) -> Case:
        assert self.outcome.case is not None
        return self.outcome.case

    @property
    def shift_seconds(self) -> float:
        return (self.new_due_at - self.old_due_at).total_seconds()

    def note(self) -> dict[str, Any]:
        """The timeline entry (`case_notes.body`)."""
        return {
            "step": self.case.step, "old_due_at": self.old_due_at.isoformat(),
            "new_due_at": self.new_due_at.isoformat(), "shift_s": int(self.shift_seconds),
            "old_source": self.old_source, "new_source": self.new_source,
            "case_version": self.case.version,
            "reason": f"working days recounted on the {self.new_source} calendar "
                      f"(was {self.old_source})",
        }


def needs_recount(case: Case) -> bool:
    record = case.data.get(CALENDAR_KEY)
    return (case.is_open and case.step_due_at is not None and isinstance(record, dict)
            and bool(record.get("estimated")) and case.data.get("deadline_source") != "platform")


def recount(engine: Engine, case: Case, now: datetime) -> Recount | None:
    """The case with its estimated working-day deadline counted again on the engine's
    calendar; None if nothing changes (still estimated and the same day, or not
    estimated at all)."""
    if not needs_recount(case):
        return None
    record = dict(case.data[CALENDAR_KEY])
    anchor = parse_moment(record.get("anchor"))
    old_rule_due = parse_moment(record.get("rule_due"))
    workdays = record.get("workdays")
    if anchor is None or old_rule_due is None or not isinstance(workdays, int):
        return None  # written by an older version without what a recount needs
    calendar = engine.calendar
    new_rule_due = calendar.add_workdays(anchor, workdays)
    basis = calendar.span_basis(anchor, new_rule_due)
    if new_rule_due == old_rule_due and basis["source"] == record.get("source"):
        return None
    assert case.step_due_at is not None
    old_due = case.step_due_at
    new_due = old_due + (new_rule_due - old_rule_due)
    new_record = {**basis, "anchor": record["anchor"], "workdays": workdays,
                  "rule_due": as_utc(new_rule_due).isoformat()}
    changed = replace(case, version=case.version + 1, step_due_at=new_due,
                      data={**case.data, CALENDAR_KEY: new_record})
    now = as_utc(now)
    notices: tuple[Notice, ...] = ()
    step = step_def(case.kind, case.step)
    if new_due != old_due and step is not None and step.party != Party.platform:
        notices = (Notice(
            reason="deadline.changed", case_id=case.case_id, step=case.step,
            party=step.party.value, due_at=new_due, urgent=False,
            params={"kind": case.kind.value, "step": case.step, "order_id": case.order_id,
                    "shop_id": case.shop_id, "amount_fen": case.amount_fen,
                    "refund_fen": case.refund_fen, "due_at_local": local_text(new_due),
                    "cause": NOTE_TYPE},
        ),)
    outcome = Outcome(case=changed, applied=True, problem=None,
                      deadlines=engine.deadlines_for(changed, now), notices=notices)
    return Recount(outcome, old_due, new_due, str(record.get("source")), str(basis["source"]))
