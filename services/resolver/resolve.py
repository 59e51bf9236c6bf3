"""The resolver's work: turn fired deadlines into the platform's automatic decisions.

The timer hands over deadline ids in batches; one transaction handles a batch with a
fixed number of statements. Idempotent by construction: each deadline row is re-read
under its case's lock, and only a row still `pending`/`dispatched` whose fence equals the
case version is acted on. A redelivery, a second dispatch or a deadline whose step moved
on does nothing.

One clock decides due-ness: the database's (`clock_timestamp()` read in the batch's own
transaction), the clock the timer claims due rows by. A resolver host whose clock is
minutes off decides exactly as a correct one. A deadline that is not due yet by that
clock (only possible if the database clock stepped back) is put back `pending`, for the
timer to hand over again when it is due: never recorded as stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, any_, bindparam, select
from sqlalchemy.exc import DBAPIError

from shared.db.bulk import BulkStatement
from shared.db.models import DeadlineRow
from shared.db.persist import (
    NotificationExpander,
    OutcomeWriter,
    Stored,
    load_cases,
    lock_cases,
)
from shared.db.session import Database, db_now
from shared.domain import DeadlineSpec, Engine, RuleRef, StepResult, seconds_to_resolution
from shared.errors import is_transient

log = logging.getLogger(__name__)

_DEADLINES = DeadlineRow.__table__
assert isinstance(_DEADLINES, Table)
CASES_OF = select(_DEADLINES.c.case_id).where(
    _DEADLINES.c.id == any_(bindparam("ids")))
CLAIM = (
    select(_DEADLINES)
    .where(_DEADLINES.c.id == any_(bindparam("ids")))
    .order_by(_DEADLINES.c.case_id, _DEADLINES.c.due_at, _DEADLINES.c.id)
    .with_for_update()
)
FINISH = BulkStatement(
    _DEADLINES, ["id", "status", "fired_at", "result"],
    "UPDATE deadlines d SET status = rows.status, fired_at = rows.fired_at, "
    "result = rows.result FROM rows WHERE d.id = rows.id")


@dataclass(frozen=True)
class Resolution:
    """What became of one deadline id."""

    deadline_id: int
    outcome: str  # fired | stale | early | duplicate | missing | error
    purpose: str | None = None
    problem: str | None = None
    steps: tuple[StepResult, ...] = ()
    platform: str | None = None
    kind: str | None = None
    late_seconds: float | None = None  # decided_at - due_at
    resolved_after_seconds: float | None = None  # set when this decision closed the case


@dataclass
class BatchResolution:
    resolutions: list[Resolution] = field(default_factory=list)
    stored: Stored = field(default_factory=Stored)


def spec_from_row(row: Any) -> DeadlineSpec:
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


class _FireBug(Exception):
    pass


class Resolver:
    def __init__(
        self,
        db: Database,
        engine: Engine,
        policy: NotificationExpander,
        ops_contacts: Any,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.db = db
        self.engine = engine
        self.policy = policy
        self.ops_contacts = ops_contacts
        # None: the database's clock (production). Tests may pass a fixed clock.
        self.clock = clock

    def fire(self, deadline_id: int) -> Resolution:
        return self.fire_many([deadline_id]).resolutions[0]

    def fire_many(self, deadline_ids: Sequence[int]) -> BatchResolution:
        ids = sorted(set(deadline_ids))
        try:
            return self._fire_batch(ids)
        except (_FireBug, DBAPIError) as exc:
            if is_transient(exc):
                raise
            if len(ids) == 1:
                return self._record_error(ids[0], exc)
            # One deadline hit a bug: the others must still fire. One at a time.
            out = BatchResolution()
            for deadline_id in ids:
                one = self.fire_many([deadline_id])
                out.resolutions += one.resolutions
                out.stored.decisions += one.stored.decisions
            return out

    def _record_error(self, deadline_id: int, exc: Exception) -> BatchResolution:
        cause = exc.__cause__ if isinstance(exc, _FireBug) else getattr(exc, "orig", exc)
        problem = f"error: {cause!r}"[:1000]
        log.error("deadline %s could not be resolved: %s", deadline_id, problem)
        with self.db.transaction() as s:
            FINISH.execute(s, [{"id": deadline_id, "status": "error",
                                "fired_at": self._now(s), "result": problem}])
        return BatchResolution([Resolution(deadline_id, "error", problem=problem)])

    def _now(self, s: Any) -> datetime:
        return self.clock() if self.clock is not None else db_now(s)

    def _fire_batch(self, ids: list[int]) -> BatchResolution:
        resolutions: dict[int, Resolution] = {}
        with self.db.transaction() as s:
            lock_cases(s, s.execute(CASES_OF, {"ids": ids}).scalars())
            rows = s.execute(CLAIM, {"ids": ids}).all()
            # Read after the locks: the time at which this transaction decides.
            now = self._now(s)
            writer = OutcomeWriter(self.policy, self.ops_contacts, now)
            cases = load_cases(s, {r.case_id for r in rows})
            finished = []
            for row in rows:
                resolution = self._fire_one(row, cases, writer, now)
                resolutions[row.id] = resolution
                if resolution.outcome in ("fired", "stale"):
                    finished.append({"id": row.id, "status": resolution.outcome,
                                     "fired_at": now, "result": resolution.problem})
                elif resolution.outcome == "early":
                    # Back to the timer, which hands it over again once it is due.
                    finished.append({"id": row.id, "status": "pending",
                                     "fired_at": None, "result": resolution.problem})
            # Mark these rows first: the flush cancels the cases' other open deadlines.
            if finished:
                FINISH.execute(s, finished)
            stored = writer.flush(s)
        return BatchResolution(
            [resolutions.get(i) or Resolution(i, "missing") for i in ids], stored)

    def _fire_one(self, row: Any, cases: dict[str, Any], writer: OutcomeWriter,
                  now: datetime) -> Resolution:
        if row.status not in ("pending", "dispatched"):
            return Resolution(row.id, "duplicate", row.purpose)
        case = cases.get(row.case_id)
        if case is None:
            return Resolution(row.id, "stale", row.purpose, "stale: case not found")
        try:
            outcome = self.engine.fire(case, spec_from_row(row), now)
        except Exception as exc:
            raise _FireBug(row.id) from exc
        if not outcome.applied or outcome.case is None:
            problem = outcome.problem or ""
            if problem.startswith("early"):
                return Resolution(row.id, "early", row.purpose, problem)
            return Resolution(row.id, "stale", row.purpose, outcome.problem)
        cases[row.case_id] = outcome.case
        writer.add(outcome)
        return Resolution(
            row.id, "fired", row.purpose,
            steps=outcome.steps,
            platform=case.platform,
            kind=str(case.kind),
            late_seconds=(now - row.due_at).total_seconds(),
            resolved_after_seconds=seconds_to_resolution(case, outcome.case),
        )
