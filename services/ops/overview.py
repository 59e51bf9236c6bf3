"""The figures of the console's overview, read live from PostgreSQL and RabbitMQ."""

from __future__ import annotations

import logging
from typing import Any

import pika.exceptions
from sqlalchemy import text

from services.ops.held import depths
from shared.db.session import Database

log = logging.getLogger(__name__)

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


def overview(db: Database, amqp_url: str, recent: int = 20, queue_type: str = "classic"
             ) -> dict[str, Any]:
    with db.transaction() as s:
        now = s.execute(NOW).scalar_one()
        backlog = [dict(r._mapping) for r in s.execute(BACKLOG)]
        late = s.execute(LATENESS).one()._mapping
        waiting = s.execute(WAITING).one()._mapping
        decisions = [dict(r._mapping) for r in s.execute(RECENT, {"limit": recent})]
    held: dict[str, int] | None
    try:
        held = depths(amqp_url, queue_type)
    except (pika.exceptions.AMQPError, OSError) as exc:
        log.warning("console: RabbitMQ unreachable for the held counts: %s", exc)
        held = None
    return {
        "now": now.isoformat(),
        "open_cases": sum(r["open"] for r in backlog),
        "overdue": sum(r["overdue"] for r in backlog),
        "backlog": backlog,
        "lateness": {"fired_last_hour": late["fired"], "p50_seconds": late["p50"],
                     "p99_seconds": late["p99"], "max_seconds": late["max"],
                     "due_not_fired": waiting["due"], "oldest_due_seconds": waiting["oldest"]},
        "held": held,
        "recent_decisions": [{**d, "decided_at": d["decided_at"].isoformat()}
                             for d in decisions],
    }
