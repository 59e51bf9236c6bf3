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

from shared.domain.calendar import CALENDAR_KEY, calendar_record
from shared.domain.engine import Engine
from shared.domain.flows import step_def
from shared.domain.model import Case, Notice, Outcome, Party, RuleRef
from shared.domain.rules import STEP_START, shortened_rule
from shared.domain.timeutil import as_utc, local_text, parse_moment

NOTE_TYPE = "calendar.recomputed"
SWITCH_NOTE_TYPE = "rules.applied_to_running_step"


@dataclass(frozen=True)
class Recount:
    outcome: Outcome
    old_due_at: datetime
    new_due_at: datetime
    old_source: str
    new_source: str
    reason: str = ""
    note_type: str = NOTE_TYPE

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
            "reason": self.reason or f"working days recounted on the {self.new_source} "
                                     f"calendar (was {self.old_source})",
            "rule": {"set": self.case.rule_set, "version": self.case.rule_version,
                     "id": self.case.rule_id},
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
    outcome = Outcome(case=changed, applied=True, problem=None,
                      deadlines=engine.deadlines_for(changed, as_utc(now)),
                      notices=_told(case, old_due, new_due, NOTE_TYPE))
    return Recount(outcome, old_due, new_due, str(record.get("source")), str(basis["source"]))


def switch_running(engine: Engine, case: Case, now: datetime,
                   until: datetime | None = None) -> Recount | None:
    """A rule version that says it applies to running steps took effect (by `until`,
    default `now`) after this step began, while the step still ran: the step takes its
    rule, counted from the step's start as any rule, but due no earlier than the moment
    the version took effect. None if the step keeps its version."""
    if not case.is_open or case.step_due_at is None or case.rule is None \
            or case.data.get("deadline_source") == "platform":
        return None
    found = engine.rules.running_switch(case.platform, case.kind, case.step,
                                        case.step_started_at, case.rule, until or now,
                                        shop=case.shop_id)
    if found is None:
        return None
    rule, effective_at = found
    if case.step_due_at <= effective_at:
        return None  # the step's deadline passed before the version took effect
    data = dict(case.data)
    data.pop(CALENDAR_KEY, None)
    anchor = case.step_started_at if rule.anchor == STEP_START \
        else (parse_moment(data.get(rule.anchor)) or case.step_started_at)
    rule_due = rule.duration.add_to(anchor, engine.calendar)
    if not rule.duration.is_fixed:
        data[CALENDAR_KEY] = calendar_record(engine.calendar, rule, anchor, rule_due)
    new_due = max(rule_due, effective_at)
    changed = replace(case, version=case.version + 1, step_due_at=new_due,
                      rule_set=rule.set_name, rule_version=rule.version, rule_id=rule.id,
                      data=data)
    outcome = Outcome(case=changed, applied=True, problem=None,
                      deadlines=engine.deadlines_for(changed, as_utc(now)),
                      notices=_told(case, case.step_due_at, new_due, SWITCH_NOTE_TYPE))
    return Recount(outcome, case.step_due_at, new_due, "", "",
                   reason=f"rule version {_version_of(rule.ref)} applies to running "
                          f"steps from {effective_at.isoformat()} (was "
                          f"{_version_of(case.rule)})", note_type=SWITCH_NOTE_TYPE)


def _version_of(ref: RuleRef) -> str:
    """The set and version a rule comes from; for a shop's variant, the platform's (the
    version that applies to running steps), with the shop policy that shortens it."""
    named = shortened_rule(ref)
    if named is None:
        return f"{ref.set} {ref.version}"
    return f"{named[0].set} {named[0].version} (shortened by {ref.set} {ref.version})"


def _told(case: Case, old_due: datetime, new_due: datetime, cause: str
          ) -> tuple[Notice, ...]:
    """The party who must act hears of a moved deadline (as for the platform's
    `deadline.changed`); the platform itself is upstream and knows."""
    step = step_def(case.kind, case.step)
    if new_due == old_due or step is None or step.party == Party.platform:
        return ()
    return (Notice(
        reason="deadline.changed", case_id=case.case_id, step=case.step,
        party=step.party.value, due_at=new_due, urgent=False,
        params={"kind": case.kind.value, "step": case.step, "order_id": case.order_id,
                "shop_id": case.shop_id, "amount_fen": case.amount_fen,
                "refund_fen": case.refund_fen, "due_at_local": local_text(new_due),
                "cause": cause},
    ),)
