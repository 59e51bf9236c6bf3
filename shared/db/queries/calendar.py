"""Deadlines counted on an estimated holiday calendar, per year (`aftersales calendar
status`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from shared.db.session import Database

PENDING_ESTIMATED_BY_YEAR = text(
    """SELECT EXTRACT(YEAR FROM deadline_at AT TIME ZONE 'Asia/Shanghai')::int AS year,
              count(*) AS deadlines, count(DISTINCT case_id) AS cases,
              min(deadline_at) AS first_due
       FROM deadlines
       WHERE status = 'pending' AND calendar_source = 'estimated' AND purpose = 'deadline'
       GROUP BY 1 ORDER BY 1"""
)


def pending_on_estimates(db: Database) -> list[Any]:
    """Rows (year, deadlines, cases, first_due), by year."""
    with db.transaction() as s:
        return list(s.execute(PENDING_ESTIMATED_BY_YEAR))
