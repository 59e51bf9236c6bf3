"""The resolver's work: turn a fired deadline into the platform's automatic decision.

Idempotent by construction: the deadline row is re-read under the case lock, and only a
row still `pending`/`dispatched` whose fence equals the case version is acted on. Any
redelivery, a second timer dispatch or a deadline whose step moved on does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from shared.db.models import DeadlineRow
from shared.db.persist import NotificationExpander, Stored, load_case, store_outcome
from shared.db.session import Database, lock_case
from shared.domain import DeadlineSpec, Engine, RuleRef, StepResult, seconds_to_resolution

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolution:
    outcome: str  # fired | stale | duplicate | missing
    purpose: str | None = None
    problem: str | None = None
    stored: Stored | None = None
    steps: tuple[StepResult, ...] = ()
    platform: str | None = None
    kind: str | None = None
    late_seconds: float | None = None  # decided_at - due_at
    resolved_after_seconds: float | None = None  # set when this decision closed the case
    decision_types: list[str] = field(default_factory=list)


def spec_from_row(row: DeadlineRow) -> DeadlineSpec:
    return DeadlineSpec(
        case_id=row.case_id,
        step=row.step,
        purpose=row.purpose,
        due_at=row.due_at,
        action=row.action,
        party=row.party,
        fence=row.fence,
        rule=RuleRef(set=row.rule_set, version=row.rule_version, id=row.rule_id),
        deadline_at=row.deadline_at,
    )


class Resolver:
    def __init__(
        self,
        db: Database,
        engine: Engine,
        policy: NotificationExpander,
        ops_contacts: Any,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.engine = engine
        self.policy = policy
        self.ops_contacts = ops_contacts
        self.clock = clock

    def fire(self, deadline_id: int) -> Resolution:
        with self.db.transaction() as s:
            case_id = s.execute(
                select(DeadlineRow.case_id).where(DeadlineRow.id == deadline_id)
            ).scalar_one_or_none()
            if case_id is None:
                return Resolution("missing")
            lock_case(s, case_id)
            row = s.execute(
                select(DeadlineRow).where(DeadlineRow.id == deadline_id).with_for_update()
            ).scalar_one()
            if row.status not in ("pending", "dispatched"):
                return Resolution("duplicate", row.purpose)
            now = self.clock()
            case = load_case(s, case_id)
            if case is None:
                self._finish(s, row, "stale", "stale: case not found", now)
                return Resolution("stale", row.purpose, "stale: case not found")
            outcome = self.engine.fire(case, spec_from_row(row), now)
            if not outcome.applied:
                self._finish(s, row, "stale", outcome.problem, now)
                return Resolution("stale", row.purpose, outcome.problem)
            # Mark this row first: store_outcome cancels the case's other open deadlines.
            self._finish(s, row, "fired", None, now)
            stored = store_outcome(
                s, outcome, now=now, policy=self.policy, ops_contacts=self.ops_contacts
            )
            return Resolution(
                "fired",
                row.purpose,
                stored=stored,
                steps=outcome.steps,
                platform=case.platform,
                kind=str(case.kind),
                late_seconds=(now - row.due_at).total_seconds(),
                decision_types=stored.decision_types,
                resolved_after_seconds=(seconds_to_resolution(case, outcome.case)
                                        if outcome.case else None),
            )

    @staticmethod
    def _finish(s: Any, row: DeadlineRow, status: str, problem: str | None, now: datetime) -> None:
        s.execute(
            update(DeadlineRow)
            .where(DeadlineRow.id == row.id)
            .values(status=status, fired_at=now, result=problem)
        )
