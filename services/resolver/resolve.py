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

from shared.apply import NotificationExpander, OutcomeWriter, Stored, lock_and_load, whole_or_each
from shared.db.deadlines import OPEN_STATUSES, DeadlineStatus, Finished, StoredDeadline
from shared.db.session import Database
from shared.db.uow import UnitOfWork, UnitOfWorkFactory, as_unit_of_work_factory
from shared.domain import Case, Engine, StepResult, seconds_to_resolution

log = logging.getLogger(__name__)


# A deadline id with no row: its case no longer wanted it (deleted as the case moved on)
# or retention removed the case; the message that named it does nothing.
NO_SUCH_ROW = "no such deadline: no longer wanted by its case, or removed by retention"


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


class _FireBug(Exception):
    pass


class Resolver:
    def __init__(
        self,
        db: Database | UnitOfWorkFactory,
        engine: Engine,
        policy: NotificationExpander,
        ops_contacts: Any,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.uow = as_unit_of_work_factory(db)
        self.engine = engine
        self.policy = policy
        self.ops_contacts = ops_contacts
        # None: the database's clock (production). Tests may pass a fixed clock.
        self.clock = clock

    def fire(self, deadline_id: int) -> Resolution:
        return self.fire_many([deadline_id]).resolutions[0]

    def fire_many(self, deadline_ids: Sequence[int]) -> BatchResolution:
        ids = sorted(set(deadline_ids))
        # One deadline hit a bug (or a value the database refuses): the others must still
        # fire. One at a time, and the bad one is recorded as an error.
        done = whole_or_each(ids, self._fire_batch, lambda i: self._fire_batch([i]),
                             self._record_error)
        if not isinstance(done, list):
            return done
        out = BatchResolution()
        for one in done:
            out.resolutions += one.resolutions
            out.stored.decisions += one.stored.decisions
        return out

    def _record_error(self, deadline_id: int, exc: Exception) -> BatchResolution:
        cause = exc.__cause__ if isinstance(exc, _FireBug) else getattr(exc, "orig", exc)
        problem = f"error: {cause!r}"[:1000]
        log.error("deadline %s could not be resolved: %s", deadline_id, problem)
        with self.uow() as uow:
            uow.deadlines.finish([Finished(deadline_id, DeadlineStatus.error, self._now(uow),
                                           problem)])
            uow.commit()
        return BatchResolution([Resolution(deadline_id, "error", problem=problem)])

    def _now(self, uow: UnitOfWork) -> datetime:
        return self.clock() if self.clock is not None else uow.now()

    def _fire_batch(self, ids: Sequence[int]) -> BatchResolution:
        resolutions: dict[int, Resolution] = {}
        with self.uow() as uow:
            _locked, cases = lock_and_load(uow, uow.deadlines.cases_of(ids))
            rows = uow.deadlines.claim(ids)
            # Read after the locks: the time at which this transaction decides.
            now = self._now(uow)
            writer = OutcomeWriter(self.policy, self.ops_contacts, now)
            finished = []
            for row in rows:
                resolution = self._fire_one(row, cases, writer, now)
                resolutions[row.id] = resolution
                if resolution.outcome in ("fired", "stale"):
                    finished.append(Finished(row.id, DeadlineStatus(resolution.outcome), now,
                                             resolution.problem))
                elif resolution.outcome == "early":
                    # Back to the timer, which hands it over again once it is due.
                    finished.append(Finished(row.id, DeadlineStatus.pending, None,
                                             resolution.problem))
            # Mark these rows first: the flush makes the cases' open deadlines their new
            # sets, and a row fired here is no longer open.
            uow.deadlines.finish(finished)
            stored = writer.flush(uow)
            uow.commit()
        return BatchResolution(
            [resolutions.get(i) or Resolution(i, "missing", problem=NO_SUCH_ROW) for i in ids],
            stored)

    def _fire_one(self, row: StoredDeadline, cases: dict[str, Case], writer: OutcomeWriter,
                  now: datetime) -> Resolution:
        if row.status not in OPEN_STATUSES:
            return Resolution(row.id, "duplicate", row.purpose)
        case = cases.get(row.case_id)
        if case is None:
            return Resolution(row.id, "stale", row.purpose, "stale: case not found")
        try:
            outcome = self.engine.fire(case, row.spec, now)
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
