"""What a proposed rule or holiday file would do to the open cases (pure; the reading is in
`aftersales_cli/whatif.py`, the command is `aftersales rules what-if`).

Two engines: the configuration in force and the proposed one. For each open case with a
pending deadline:
- **its pending deadline** under the proposal: a running step keeps the rule version in
  force when it began (the stored rule) unless a proposed version says it applies to
  running steps and takes effect while the step runs (within the horizon); a deadline
  counted on an estimated calendar is recounted on a proposed holiday file; both exactly
  as the timer does once the proposal is in force (`shared.domain.recompute`); a
  platform's own deadline never moves;
- **the automatic decisions ahead** if nobody acts: each engine fires the case's next
  deadline, then the deadline of the step it leads to, and so on up to the horizon, so a
  rule change shows in the steps that follow (they begin under the proposal).

Counts are kept for the next 24 hours and 7 days, by platform, kind, missed step and
decision type; a few cases whose outcome changes are kept as examples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared.domain.engine import Engine
from shared.domain.model import Case, DeadlineSpec
from shared.domain.recompute import recount, switch_running

HORIZONS = {"24h": timedelta(hours=24), "7d": timedelta(days=7)}
MAX_CHAIN = 12  # fired deadlines per case and engine: a guard, flows end well before
REMINDER = "reminder.due_soon"


@dataclass(frozen=True)
class Projected:
    """A decision an engine would take if nobody acts."""

    at: datetime
    type: str
    step: str


@dataclass(frozen=True)
class CaseComparison:
    case: Case
    old_due: datetime
    new_due: datetime
    before: tuple[Projected, ...]
    after: tuple[Projected, ...]

    @property
    def shift_seconds(self) -> float:
        return (self.new_due - self.old_due).total_seconds()

    @property
    def changed(self) -> bool:
        return self.old_due != self.new_due or self.before != self.after


def project(engine: Engine, case: Case, deadline: DeadlineSpec, until: datetime
            ) -> tuple[Projected, ...]:
    """The automatic decisions (reminders aside) the engine takes up to `until` if nobody
    acts, starting from the case's pending `deadline`."""
    out: list[Projected] = []
    pending: DeadlineSpec | None = deadline
    for _ in range(MAX_CHAIN):
        if pending is None or pending.due_at > until:
            break
        outcome = engine.fire(case, pending, pending.due_at)
        if not outcome.applied or outcome.case is None:
            break
        out.extend(Projected(d.due_at, d.type, d.step) for d in outcome.decisions
                   if d.type != REMINDER)
        case = outcome.case
        pending = next((d for d in outcome.deadlines or () if d.purpose == "deadline"), None)
    return tuple(out)


def compare_case(current: Engine, proposed: Engine, case: Case, deadline: DeadlineSpec,
                 now: datetime, horizon: timedelta = HORIZONS["7d"]) -> CaseComparison:
    until = now + horizon
    new_case, new_deadline = case, deadline
    # a version that applies to running steps (in effect within the horizon), then the
    # calendar: exactly what the timer's jobs would do once the proposal is in force
    switched = switch_running(proposed, case, now, until=until)
    if switched is not None:
        new_case = switched.case
    recounted = recount(proposed, new_case, now)
    if recounted is not None:
        new_case = recounted.case
    if new_case is not case:
        new_deadline = next(d for d in proposed.deadlines_for(new_case, now)
                            if d.purpose == "deadline")
    return CaseComparison(
        case=case, old_due=deadline.due_at, new_due=new_deadline.due_at,
        before=project(current, case, deadline, until),
        after=project(proposed, new_case, new_deadline, until),
    )


@dataclass
class WhatIfReport:
    now: datetime
    open_cases: int = 0
    compared: int = 0  # open cases with a pending deadline
    earlier: int = 0
    later: int = 0
    shifts_days: Counter[int] = field(default_factory=Counter)
    max_earlier_s: float = 0.0
    max_later_s: float = 0.0
    # (horizon, "before"|"after", platform, kind, step, type) -> decisions
    decisions: Counter[tuple[str, str, str, str, str, str]] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    example_limit: int = 5

    def add(self, c: CaseComparison) -> None:
        self.compared += 1
        shift = c.shift_seconds
        if shift < 0:
            self.earlier += 1
            self.max_earlier_s = max(self.max_earlier_s, -shift)
        elif shift > 0:
            self.later += 1
            self.max_later_s = max(self.max_later_s, shift)
        if shift:
            self.shifts_days[round(shift / 86400)] += 1
        case = c.case
        for when, projected in (("before", c.before), ("after", c.after)):
            for p in projected:
                for name, span in HORIZONS.items():
                    if p.at <= self.now + span:
                        self.decisions[(name, when, case.platform, case.kind.value, p.step,
                                        p.type)] += 1
        if c.changed and len(self.examples) < self.example_limit:
            self.examples.append({
                "case_id": case.case_id, "platform": case.platform, "kind": case.kind.value,
                "step": case.step, "due_before": c.old_due.isoformat(),
                "due_after": c.new_due.isoformat(),
                "decisions_before": [[p.at.isoformat(), p.type, p.step] for p in c.before],
                "decisions_after": [[p.at.isoformat(), p.type, p.step] for p in c.after],
            })

    def totals(self) -> dict[str, dict[str, int]]:
        out = {name: {"before": 0, "after": 0} for name in HORIZONS}
        for (name, when, *_rest), n in self.decisions.items():
            out[name][when] += n
        return out

    def breakdown(self) -> list[dict[str, Any]]:
        rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for (name, when, platform, kind, step, type_), n in self.decisions.items():
            row = rows.setdefault((platform, kind, step, type_), {
                "platform": platform, "kind": kind, "step": step, "decision": type_,
                **{f"{h}_{w}": 0 for h in HORIZONS for w in ("before", "after")}})
            row[f"{name}_{when}"] += n
        return [rows[k] for k in sorted(rows)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(), "open_cases": self.open_cases,
            "with_pending_deadline": self.compared,
            "deadlines_moved": {
                "earlier": self.earlier, "later": self.later,
                "unchanged": self.compared - self.earlier - self.later,
                "by_days": {f"{k:+d}": v for k, v in sorted(self.shifts_days.items())},
                "max_earlier_s": int(self.max_earlier_s), "max_later_s": int(self.max_later_s),
            },
            "automatic_decisions": self.totals(),
            "breakdown": self.breakdown(),
            "examples": self.examples,
        }
