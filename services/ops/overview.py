"""The figures of the console's overview, read live from PostgreSQL and RabbitMQ."""

from __future__ import annotations

import logging
from typing import Any

import pika.exceptions

from services.ops.held import depths
from shared.db.queries.ops import overview_figures
from shared.db.session import Database

log = logging.getLogger(__name__)

def overview(db: Database, amqp_url: str, recent: int = 20, queue_type: str = "classic"
             ) -> dict[str, Any]:
    figures = overview_figures(db, recent)
    now, backlog, late = figures.now, figures.backlog, figures.lateness
    waiting, decisions = figures.waiting, figures.decisions
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
