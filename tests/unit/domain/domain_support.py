"""Helpers for the domain tests: China-time moments, events and a case driver."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared.domain import Case, DeadlineSpec, Engine, Event, Outcome, RuleBook, WorkCalendar
from shared.domain.timeutil import CHINA_TZ

_ids = itertools.count(1)


def examples(n: int) -> int:
    """Hypothesis example count, scaled by AFTERSALES_PROPERTY_SCALE (the mutation run
    uses fewer: every mutant runs the tests again)."""
    return max(5, int(n * float(os.environ.get("AFTERSALES_PROPERTY_SCALE", "1"))))


def cst(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A China-time moment, e.g. cst(2026, 11, 22, 10) = 2026-11-22 10:00 +08:00."""
    return datetime(year, month, day, hour, minute, tzinfo=CHINA_TZ)


def make_event(type_: str, at: datetime, *, case_id: str = "AS1", platform: str = "kuaishou",
               due_at: datetime | None = None, **data: Any) -> Event:
    return Event(event_id=f"ev-{next(_ids)}", type=type_, occurred_at=at, platform=platform,
                 shop_id="S1", order_id="O1", case_id=case_id, due_at=due_at, data=data)


def opened(kind: str, amount_fen: int = 10000, **data: Any) -> dict[str, Any]:
    return {"kind": kind, "amount_fen": amount_fen, "reason": "broken",
            "evidence": ["https://img/1.jpg"], "buyer": {"phone": "13800000000"},
            "merchant": {"email": "shop@example.com"}, **data}


def default_engine() -> Engine:
    return Engine(RuleBook.load(None), WorkCalendar())


@dataclass
class Driver:
    """Drives one case through events and deadline firings, keeping the last outcome."""

    engine: Engine
    platform: str = "kuaishou"
    case: Case | None = None
    last: Outcome | None = None
    pending: tuple[DeadlineSpec, ...] = ()
    history: list[Outcome] = field(default_factory=list)

    def send(self, type_: str, at: datetime, *, due_at: datetime | None = None,
             now: datetime | None = None, **data: Any) -> Outcome:
        event = make_event(type_, at, platform=self.platform, due_at=due_at, **data)
        return self._keep(self.engine.apply(self.case, event, now or at))

    def open(self, kind: str, at: datetime, **data: Any) -> Outcome:
        due_at = data.pop("due_at", None)
        return self.send("case.opened", at, due_at=due_at, **opened(kind, **data))

    @property
    def deadline(self) -> DeadlineSpec:
        found = [d for d in self.pending if d.purpose == "deadline"]
        assert len(found) == 1, f"expected one pending deadline, got {self.pending}"
        return found[0]

    @property
    def reminders(self) -> list[DeadlineSpec]:
        return [d for d in self.pending if d.purpose == "reminder"]

    def fire(self, spec: DeadlineSpec | None = None, late: timedelta = timedelta(0)) -> Outcome:
        spec = spec or self.deadline
        assert self.case is not None
        return self._keep(self.engine.fire(self.case, spec, spec.due_at + late))

    def _keep(self, outcome: Outcome) -> Outcome:
        self.history.append(outcome)
        self.last = outcome
        if outcome.applied:
            self.case = outcome.case
            if outcome.deadlines is not None:
                self.pending = outcome.deadlines
        return outcome

    @property
    def step(self) -> str:
        assert self.case is not None
        return self.case.step

    def due_local(self) -> datetime:
        assert self.case is not None and self.case.step_due_at is not None
        return self.case.step_due_at.astimezone(CHINA_TZ)
