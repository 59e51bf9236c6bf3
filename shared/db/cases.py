"""Owner of the `cases` table: the case locks, loading cases, and writing their states.

Every change of a case happens under its lock (`lock` / `try_lock`), in the transaction
that writes it; nothing else writes `cases`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import Table, any_, bindparam, select, text
from sqlalchemy.orm import Session

from shared.db.bulk import bulk_insert
from shared.db.models import CaseNoteRow, CaseRow
from shared.domain import Case

_CASES = cast(Table, CaseRow.__table__)
_NOTES = cast(Table, CaseNoteRow.__table__)

# `records_since` is not written by the upsert: its default sets it when the row is
# created, and an update must not move it (`CaseRow.records_since`).
_CASE_COLUMNS = [c.name for c in _CASES.c if c.name != "records_since"]
UPSERT_CASES = bulk_insert(
    _CASES, _CASE_COLUMNS,
    "ON CONFLICT (case_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _CASE_COLUMNS if c != "case_id"),
)
# `= ANY(:ids)` with one array parameter, not `IN (...)`: the SQL text is the same for
# every batch size, so psycopg parses it once (a new text per size was 16 % of intake's CPU).
LOAD_CASES = select(_CASES.c.snapshot).where(_CASES.c.case_id == any_(bindparam("ids")))
# Advisory locks in case-id order: every transaction takes them in the same order, so two
# workers can never wait on each other in a cycle. The subquery fixes the order.
LOCK_CASES = text(
    "SELECT pg_advisory_xact_lock(hashtextextended(c, 0)) "
    "FROM (SELECT DISTINCT unnest(CAST(:ids AS text[])) AS c ORDER BY c) AS ordered"
)

# Non-blocking: the cases whose lock this transaction got now (never waits, so the order
# does not matter). Intake uses it to leave a case another worker holds for its next batch.
TRY_LOCK_CASES = text(
    "SELECT c FROM unnest(CAST(:ids AS text[])) AS c "
    "WHERE pg_try_advisory_xact_lock(hashtextextended(c, 0))"
)
# Cases whose step may have begun before a version that applies to running steps took
# effect and still ran then (opened before it, due after it).
RUNNING_CANDIDATES = text(
    """SELECT case_id FROM cases
       WHERE status = 'open' AND opened_at < :last AND step_due_at > :first
       ORDER BY case_id"""
)

# Only for a case whose `records_since` is known: NULL means "from before migration 0023,
# every month", and lowering it would make it a bound it is not.
LOWER_RECORDS_SINCE = text(
    """UPDATE cases SET records_since = least(records_since, early.at)
       FROM unnest(CAST(:ids AS text[]), CAST(:times AS timestamptz[])) AS early(case_id, at)
       WHERE cases.case_id = early.case_id AND cases.records_since IS NOT NULL"""
)
# `now()`, the transaction's start: the default of the `received_at` of the rows it writes
# (a later reading of the clock would not be a bound of them).
LOWER_RECORDS_SINCE_TO_NOW = text(
    """UPDATE cases SET records_since = least(records_since, now())
       WHERE case_id = :case_id AND records_since IS NOT NULL"""
)

# A case's timeline notes (e.g. a deadline recounted on official calendar data).
INSERT_NOTES = bulk_insert(_NOTES, ["case_id", "at", "type", "body"])


@dataclass(frozen=True)
class CaseNote:
    case_id: str
    at: datetime
    type: str
    body: dict[str, Any]


class CaseRepository(Protocol):
    def lock(self, case_ids: Iterable[str]) -> None:
        """Serialise every change of these cases across all workers and services,
        including their creation (a row lock cannot lock a row that does not exist yet).
        Held until the transaction ends."""

    def try_lock(self, case_ids: Iterable[str]) -> set[str]:
        """Take the locks of these cases that are free now; returns the cases locked."""

    def load(self, case_ids: Iterable[str]) -> dict[str, Case]: ...

    def save(self, cases: Iterable[Case], now: datetime) -> None:
        """Insert or update these cases' rows (their final states)."""

    def lower_records_since(self, earliest: Mapping[str, datetime]) -> None:
        """Lower these cases' `records_since` to the time of a row about them written
        before they existed (a case not created yet is left alone)."""

    def lower_records_since_to_now(self, case_id: str) -> None:
        """Lower this case's `records_since` to this transaction's time (the
        `received_at` of the event rows it writes), if the case exists."""

    def running_candidates(self, first: datetime, last: datetime) -> list[str]: ...

    def add_notes(self, notes: Sequence[CaseNote]) -> None: ...


def case_row(case: Case, now: datetime) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "platform": case.platform,
        "shop_id": case.shop_id,
        "order_id": case.order_id,
        "kind": str(case.kind),
        "status": case.status,
        "step": case.step,
        "version": case.version,
        "rule_set": case.rule_set,
        "rule_version": case.rule_version,
        "step_due_at": case.step_due_at,
        "opened_at": case.opened_at,
        "closed_at": case.closed_at,
        "updated_at": now,
        "snapshot": case.to_dict(copy=False),  # read once, by the JSON encoder
    }


class SqlCases:
    def __init__(self, session: Session) -> None:
        self.session = session

    def lock(self, case_ids: Iterable[str]) -> None:
        ids = sorted(set(case_ids))
        if ids:
            self.session.execute(LOCK_CASES, {"ids": ids})

    def try_lock(self, case_ids: Iterable[str]) -> set[str]:
        ids = sorted(set(case_ids))
        return set(self.session.execute(TRY_LOCK_CASES, {"ids": ids}).scalars()) \
            if ids else set()

    def load(self, case_ids: Iterable[str]) -> dict[str, Case]:
        ids = sorted(set(case_ids))
        if not ids:
            return {}
        rows = self.session.execute(LOAD_CASES, {"ids": ids}).scalars()
        return {snapshot["case_id"]: Case.from_dict(snapshot, copy=False)
                for snapshot in rows}

    def save(self, cases: Iterable[Case], now: datetime) -> None:
        rows = [case_row(c, now) for c in cases]
        if rows:
            UPSERT_CASES.execute(self.session.connection(), rows)

    def lower_records_since(self, earliest: Mapping[str, datetime]) -> None:
        if earliest:
            ids = sorted(earliest)
            self.session.execute(LOWER_RECORDS_SINCE,
                                 {"ids": ids, "times": [earliest[c] for c in ids]})

    def lower_records_since_to_now(self, case_id: str) -> None:
        self.session.execute(LOWER_RECORDS_SINCE_TO_NOW, {"case_id": case_id})

    def running_candidates(self, first: datetime, last: datetime) -> list[str]:
        return list(self.session.execute(RUNNING_CANDIDATES,
                                         {"first": first, "last": last}).scalars())

    def add_notes(self, notes: Sequence[CaseNote]) -> None:
        if notes:
            INSERT_NOTES.execute(self.session.connection(), [
                {"case_id": n.case_id, "at": n.at, "type": n.type, "body": n.body}
                for n in notes])


def lock_cases(session: Session, case_ids: Iterable[str]) -> None:
    """`SqlCases.lock` for code that holds a bare session (retention, tests)."""
    SqlCases(session).lock(case_ids)


def try_lock_cases(session: Session, case_ids: Iterable[str]) -> set[str]:
    """`SqlCases.try_lock` for code that holds a bare session (retention)."""
    return SqlCases(session).try_lock(case_ids)
