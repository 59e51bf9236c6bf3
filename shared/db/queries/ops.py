"""The ops tools' reads: the case search and the console overview's figures. Times are
the database clock's (`now()`), never the host's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text

from shared.db.models import CaseRow
from shared.db.session import Database


@dataclass(frozen=True)
class CaseFilter:
    shop: str | None = None
    order: str | None = None
    platform: str | None = None
    kind: str | None = None
    step: str | None = None
    status: str | None = None  # open | closed
    overdue: bool | None = None  # open with its step's deadline passed (database clock)
    case_id: str | None = None  # a prefix
    limit: int = 100
    offset: int = 0

    def query(self) -> Any:
        q = select(CaseRow, (CaseRow.step_due_at < func.now()).label("overdue"))
        for column, value in ((CaseRow.shop_id, self.shop), (CaseRow.order_id, self.order),
                              (CaseRow.platform, self.platform), (CaseRow.kind, self.kind),
                              (CaseRow.step, self.step), (CaseRow.status, self.status)):
            if value:
                q = q.where(column == value)
        if self.case_id:
            q = q.where(CaseRow.case_id.startswith(self.case_id, autoescape=True))
        overdue = (CaseRow.status == "open") & (CaseRow.step_due_at < func.now())
        if self.overdue is True:
            q = q.where(overdue)
        elif self.overdue is False:
            q = q.where(~overdue | CaseRow.step_due_at.is_(None))
        return q.order_by(CaseRow.step_due_at.asc().nulls_last(), CaseRow.case_id) \
            .limit(self.limit).offset(self.offset)


def find_cases(db: Database, flt: CaseFilter) -> list[tuple[CaseRow, bool | None]]:
    """The cases matching, each with whether its step's deadline has passed."""
    with db.transaction() as s:
        return [(c, late) for c, late in s.execute(flt.query()).all()]


BACKLOG = text("""
    SELECT platform, kind, step, count(*) AS open,
           count(*) FILTER (WHERE step_due_at < now()) AS overdue
    FROM cases WHERE status = 'open'
    GROUP BY platform, kind, step ORDER BY open DESC, platform, kind, step
""")
# Firing lateness: how long after its due time each deadline fired, over the last hour;
# and what is due but not fired yet (a stalled timer shows here first).
LATENESS = text("""
    SELECT count(*) AS fired,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM fired_at - due_at))
             AS p50,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM fired_at - due_at))
             AS p99,
           max(extract(epoch FROM fired_at - due_at)) AS max
    FROM deadlines WHERE status = 'fired' AND fired_at > now() - interval '1 hour'
""")
WAITING = text("""
    SELECT count(*) AS due, extract(epoch FROM now() - min(due_at)) AS oldest
    FROM deadlines WHERE status = 'pending' AND due_at <= now()
""")
RECENT = text("""
    SELECT decision_id, case_id, type, step, decided_at, body -> 'rule' ->> 'id' AS rule_id,
           body ->> 'due_at' AS due_at
    FROM decisions ORDER BY decided_at DESC LIMIT :limit
""")
NOW = text("SELECT now()")


@dataclass(frozen=True)
class OverviewFigures:
    now: datetime
    backlog: list[dict[str, Any]]  # per platform/kind/step: open, overdue
    lateness: dict[str, Any]  # fired (last hour), p50, p99, max
    waiting: dict[str, Any]  # due (not fired yet), oldest
    decisions: list[dict[str, Any]]  # the most recent, newest first


def overview_figures(db: Database, recent: int) -> OverviewFigures:
    with db.transaction() as s:
        now = s.execute(NOW).scalar_one()
        backlog = [dict(r._mapping) for r in s.execute(BACKLOG)]
        late = dict(s.execute(LATENESS).one()._mapping)
        waiting = dict(s.execute(WAITING).one()._mapping)
        decisions = [dict(r._mapping) for r in s.execute(RECENT, {"limit": recent})]
    return OverviewFigures(now, backlog, late, waiting, decisions)
