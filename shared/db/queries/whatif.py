"""The open cases with their pending deadline, read from one consistent snapshot
(REPEATABLE READ, READ ONLY: nothing is changed), for `aftersales rules what-if`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import text

from shared.db.session import Database

_T = TypeVar("_T")

OPEN_CASES = text("SELECT count(*) FROM cases WHERE status = 'open'")
# One pending deadline per open case (the reminders follow it). Streamed: memory stays
# flat however many cases are open.
OPEN_WITH_DEADLINE = text(
    """SELECT c.snapshot, d.step, d.purpose, d.due_at, d.action, d.party, d.fence,
              d.rule_set, d.rule_version, d.rule_id, d.deadline_at
       FROM cases c JOIN deadlines d ON d.case_id = c.case_id
       WHERE c.status = 'open' AND d.status = 'pending' AND d.purpose = 'deadline'
       ORDER BY c.case_id"""
)


class OpenCasesSnapshot:
    """Within `read_open_cases`: the snapshot's clock, the open cases counted, and their
    pending deadlines as rows (snapshot, step, purpose, due_at, ...) streamed."""

    def __init__(self, session: Any) -> None:
        self._s = session

    def now(self) -> datetime:
        value = self._s.execute(text("SELECT now()")).scalar_one()
        assert isinstance(value, datetime)
        return value

    def open_cases(self) -> int:
        return int(self._s.execute(OPEN_CASES).scalar_one())

    def with_pending_deadline(self) -> Any:
        return self._s.execute(OPEN_WITH_DEADLINE.execution_options(yield_per=2000))


def read_open_cases(db: Database, work: Callable[[OpenCasesSnapshot], _T]) -> _T:
    """Run `work` on one read-only snapshot of the open cases."""
    with db.transaction() as s:
        s.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        return work(OpenCasesSnapshot(s))
