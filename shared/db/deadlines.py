"""Owner of the `deadlines` table: the timers of open cases.

Written by intake and the resolver (a case's wanted set after each applied change), by
the timer (claiming due rows, handing them over) and by the resolver (finishing them).
A deadline its case no longer wants is deleted, not kept marked: nothing reads it again
(the case's events say why it went), and kept it made the table and its indexes grow
with every case ever opened. Fired, stale and error rows stay until retention.
A row belongs to the case version in its `fence`: the resolver, under the case's lock,
acts on a row only if its fence equals the case's version (`Engine.fire`), so a row set
for a version the case has left is stale and does nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, cast

from sqlalchemy import Table, any_, bindparam, select, text
from sqlalchemy.orm import Session

from shared.db.bulk import BulkStatement, bulk_insert
from shared.db.models import DeadlineRow
from shared.domain import DeadlineSpec, RuleRef


class DeadlineStatus(StrEnum):
    pending = "pending"  # waiting for its time (the timer claims it when due)
    dispatched = "dispatched"  # handed to the resolver
    fired = "fired"
    stale = "stale"  # its case had moved on when it fired
    # no longer wanted by its case: only rows written by versions that kept such rows
    # (they are deleted now); they stay until retention removes their case
    cancelled = "cancelled"
    error = "error"  # firing it raised: a bug, kept for ops


OPEN_STATUSES = (DeadlineStatus.pending, DeadlineStatus.dispatched)

_DEADLINES = cast(Table, DeadlineRow.__table__)

# --- written for a case's wanted set (intake, resolver, recounts) ---
INSERT_DEADLINES = bulk_insert(_DEADLINES, [
    "case_id", "step", "purpose", "action", "party", "due_at", "deadline_at", "fence",
    "rule_set", "rule_version", "rule_id", "status", "calendar_source"])
# The open rows of the cases whose wanted set changes (ix_deadlines_open_case): the id,
# then the columns of `same_deadline`, in its order, then the fence.
OPEN_DEADLINES_OF = (
    select(_DEADLINES.c.id, _DEADLINES.c.case_id, _DEADLINES.c.step, _DEADLINES.c.purpose,
           _DEADLINES.c.action, _DEADLINES.c.party, _DEADLINES.c.due_at,
           _DEADLINES.c.deadline_at, _DEADLINES.c.rule_set, _DEADLINES.c.rule_version,
           _DEADLINES.c.rule_id, _DEADLINES.c.calendar_source, _DEADLINES.c.fence)
    .where(_DEADLINES.c.case_id == any_(bindparam("ids")))
    .where(_DEADLINES.c.status.in_(OPEN_STATUSES))
)
# By id, and only while open: the timer may have dispatched a row meanwhile (it claims
# without the case lock), never finished it (the resolver takes the case lock). A
# dispatched row's message then finds nothing to claim, as for a row retention removed.
# A delete writes no index entry, where marking the row cancelled wrote a new version of
# it into the heap and two indexes.
DELETE_CANCELLED = text(
    "DELETE FROM deadlines WHERE id = ANY(:ids) AND status IN ('pending', 'dispatched')")
# A row still wanted, unchanged but for the case version it belongs to: moved to the new
# version in place (same id; `fence` is in no index, so PostgreSQL can update it in the
# same page without touching the indexes).
REFENCE = BulkStatement(
    _DEADLINES, ["id", "fence"],
    "UPDATE deadlines d SET fence = rows.fence FROM rows "
    "WHERE d.id = rows.id AND d.status IN ('pending', 'dispatched')")

# --- the timer ---
CLAIM_DUE = text(
    """
    SELECT id, purpose, EXTRACT(EPOCH FROM (now() - due_at)) AS lateness
    FROM deadlines
    WHERE status = 'pending' AND due_at <= now()
    ORDER BY due_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
# Dispatched long ago and never finished (the message or the resolver died): send again.
CLAIM_STUCK = text(
    """
    SELECT id FROM deadlines
    WHERE status = 'dispatched' AND dispatched_at < now() - make_interval(secs => :after)
    ORDER BY dispatched_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
MARK_DISPATCHED = text(
    """
    UPDATE deadlines
    SET status = 'dispatched', dispatched_at = now(), dispatch_count = dispatch_count + 1
    WHERE id = ANY(:ids)
    """
)

# --- the resolver ---
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

# --- recounts (shared/recount.py) ---
ESTIMATED_CASES = text(
    """SELECT DISTINCT case_id FROM deadlines
       WHERE status = 'pending' AND calendar_source = 'estimated' ORDER BY case_id"""
)


@dataclass(frozen=True)
class Due:
    id: int
    purpose: str
    lateness: float  # seconds past due, by the database clock


@dataclass(frozen=True)
class StoredDeadline:
    """A deadline row as the resolver re-reads it under its case's lock."""

    id: int
    status: DeadlineStatus
    spec: DeadlineSpec

    @property
    def case_id(self) -> str:
        return self.spec.case_id

    @property
    def purpose(self) -> str:
        return self.spec.purpose

    @property
    def due_at(self) -> datetime:
        return self.spec.due_at


@dataclass(frozen=True)
class Finished:
    id: int
    status: DeadlineStatus
    fired_at: datetime | None
    result: str | None


@dataclass(frozen=True)
class WantedSetChanges:
    kept: int = 0  # rows left in place (moved to the case's new version)
    cancelled: int = 0
    inserted: int = 0


class DeadlineRepository(Protocol):
    def set_wanted(self, wanted: Mapping[str, Sequence[DeadlineSpec]]) -> WantedSetChanges:
        """Make each case's open deadlines the given full set: rows no longer wanted are
        deleted (`cancelled` counts them), new ones inserted, and a row still wanted
        stays (same id), moved to the fence of the wanted one."""

    def claim_due(self, limit: int) -> list[Due]:
        """Lock pending rows due by the database clock, oldest first (skips rows another
        timer holds)."""

    def claim_stuck(self, after_seconds: float, limit: int) -> list[int]: ...

    def mark_dispatched(self, ids: Sequence[int]) -> None: ...

    def cases_of(self, ids: Sequence[int]) -> list[str]: ...

    def claim(self, ids: Sequence[int]) -> list[StoredDeadline]:
        """These rows, locked, in case and due order (missing ids are left out)."""

    def finish(self, rows: Sequence[Finished]) -> None: ...

    def estimated_cases(self) -> list[str]:
        """Cases with a pending deadline counted on an estimated calendar."""


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


def deadline_row(d: DeadlineSpec) -> dict[str, Any]:
    return {
        "case_id": d.case_id,
        "step": d.step,
        "purpose": d.purpose,
        "action": d.action,
        "party": d.party,
        "due_at": d.due_at,
        "deadline_at": d.deadline_at,
        "fence": d.fence,
        "rule_set": d.rule.set,
        "rule_version": d.rule.version,
        "rule_id": d.rule.id,
        "status": DeadlineStatus.pending,
        "calendar_source": calendar_source(d),
    }


def calendar_source(spec: DeadlineSpec) -> str | None:
    return spec.calendar.get("source") if spec.calendar else None


def same_deadline(spec: DeadlineSpec, source: str | None) -> tuple[Any, ...]:
    """What makes a stored row the wanted deadline, whatever case version it was set for
    (the fence moves with the case; everything else, the calendar data it stands on
    included, must be equal). The order of `OPEN_DEADLINES_OF`'s columns after the id,
    without the fence."""
    return (spec.case_id, spec.step, spec.purpose, spec.action, spec.party, spec.due_at,
            spec.deadline_at, spec.rule.set, spec.rule.version, spec.rule.id, source)


@dataclass(frozen=True)
class WantedSetPlan:
    cancel: list[int]
    refence: list[tuple[int, int]]  # (id, new fence)
    insert: list[DeadlineSpec]
    kept: int


def plan_wanted_set(open_rows: Iterable[tuple[int, tuple[Any, ...], int]],
                    wanted: Mapping[str, Sequence[DeadlineSpec]]) -> WantedSetPlan:
    """Compare the open rows (id, `same_deadline` key, fence) of the cases with their
    wanted sets (pure: shared by the SQL repository and the in-memory fake)."""
    by_key: dict[tuple[Any, ...], list[tuple[int, int]]] = defaultdict(list)
    for row_id, key, fence in sorted(open_rows, key=lambda r: r[0]):
        by_key[key].append((row_id, fence))
    refence: list[tuple[int, int]] = []
    insert: list[DeadlineSpec] = []
    kept = 0
    for specs in wanted.values():
        for spec in specs:
            matches = by_key.get(same_deadline(spec, calendar_source(spec)))
            if not matches:
                insert.append(spec)
                continue
            row_id, fence = matches.pop(0)
            kept += 1
            if fence != spec.fence:
                refence.append((row_id, spec.fence))
    cancel = sorted(row_id for rows in by_key.values() for row_id, _fence in rows)
    return WantedSetPlan(cancel, refence, insert, kept)


class SqlDeadlines:
    def __init__(self, session: Session) -> None:
        self.session = session

    def set_wanted(self, wanted: Mapping[str, Sequence[DeadlineSpec]]) -> WantedSetChanges:
        if not wanted:
            return WantedSetChanges()
        conn = self.session.connection()
        open_rows = [(row[0], tuple(row[1:12]), row[12])
                     for row in conn.execute(OPEN_DEADLINES_OF, {"ids": sorted(wanted)})]
        plan = plan_wanted_set(open_rows, wanted)
        if plan.cancel:
            conn.execute(DELETE_CANCELLED, {"ids": plan.cancel})
        if plan.refence:
            REFENCE.execute(conn, [{"id": i, "fence": f} for i, f in plan.refence])
        if plan.insert:
            INSERT_DEADLINES.execute(conn, [deadline_row(d) for d in plan.insert])
        return WantedSetChanges(plan.kept, len(plan.cancel), len(plan.insert))

    def claim_due(self, limit: int) -> list[Due]:
        return [Due(r.id, r.purpose, float(r.lateness))
                for r in self.session.execute(CLAIM_DUE, {"limit": limit})]

    def claim_stuck(self, after_seconds: float, limit: int) -> list[int]:
        return [r.id for r in self.session.execute(
            CLAIM_STUCK, {"after": after_seconds, "limit": limit})]

    def mark_dispatched(self, ids: Sequence[int]) -> None:
        if ids:
            self.session.execute(MARK_DISPATCHED, {"ids": list(ids)})

    def cases_of(self, ids: Sequence[int]) -> list[str]:
        return list(self.session.execute(CASES_OF, {"ids": list(ids)}).scalars())

    def claim(self, ids: Sequence[int]) -> list[StoredDeadline]:
        return [StoredDeadline(row.id, DeadlineStatus(row.status), spec_from_row(row))
                for row in self.session.execute(CLAIM, {"ids": list(ids)})]

    def finish(self, rows: Sequence[Finished]) -> None:
        if rows:
            FINISH.execute(self.session, [
                {"id": r.id, "status": r.status, "fired_at": r.fired_at, "result": r.result}
                for r in rows])

    def estimated_cases(self) -> list[str]:
        return list(self.session.execute(ESTIMATED_CASES).scalars())
