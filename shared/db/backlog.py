"""The backlog as ops see it, read from PostgreSQL on each scrape (one consistent read)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text

from shared.db.session import Database
from shared.metrics import BacklogSnapshot

OPEN_CASES = text(
    "SELECT platform, kind, step, count(*) FROM cases WHERE status = 'open' GROUP BY 1, 2, 3"
)
PENDING_DEADLINES = text(
    "SELECT step, purpose, count(*) FROM deadlines WHERE status = 'pending' GROUP BY 1, 2"
)
OVERDUE = text(
    """SELECT count(*), min(due_at) FROM deadlines
       WHERE status IN ('pending', 'dispatched') AND due_at <= now()"""
)
# the partial index ix_deadlines_pending_estimated makes this cheap
ESTIMATED_DEADLINES = text(
    """SELECT count(*) FROM deadlines
       WHERE status = 'pending' AND calendar_source = 'estimated' AND purpose = 'deadline'"""
)
OLDEST_OPEN = text("SELECT min(opened_at) FROM cases WHERE status = 'open'")
OUTBOX = text("SELECT count(*), min(created_at) FROM outbox")
NOTIFICATIONS_PENDING = text(
    """SELECT channel, count(*) FROM notifications
       WHERE status IN ('new', 'queued', 'pending', 'deferred') GROUP BY 1"""
)


def read_backlog(db: Database, calendar_covered_until: datetime | None = None) -> BacklogSnapshot:
    with db.transaction() as s:
        s.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        overdue_count, oldest_overdue = s.execute(OVERDUE).one()
        outbox_count, oldest_outbox = s.execute(OUTBOX).one()
        return BacklogSnapshot.from_rows(
            open_cases=[tuple(r) for r in s.execute(OPEN_CASES)],
            pending_deadlines=[tuple(r) for r in s.execute(PENDING_DEADLINES)],
            notifications_pending=[tuple(r) for r in s.execute(NOTIFICATIONS_PENDING)],
            oldest_open_case_at=s.execute(OLDEST_OPEN).scalar(),
            oldest_overdue_deadline_at=oldest_overdue,
            overdue_deadlines=int(overdue_count),
            outbox_unpublished=int(outbox_count),
            oldest_unpublished_outbox_at=oldest_outbox,
            calendar_covered_until=calendar_covered_until,
            estimated_deadlines=int(s.execute(ESTIMATED_DEADLINES).scalar_one()),
        )
