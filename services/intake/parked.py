"""Parked events that wait too long: an event for a case not opened yet is parked in the
case log (outcome `parked`) and applied when its `case.opened` arrives. If that never
comes, it must not wait forever: after `intake_parked_max_seconds` (by the database
clock) it is copied to `aftersales.events.rejected` with reason `case_never_opened` and
its row becomes `expired` (kept for ops).

The case's lock is held while an event expires, so it cannot expire while the event
that opens its case is being applied. The copy is published before the commit: after a
crash in between it may be in the rejected queue twice, never lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text

from shared.db.persist import try_lock_cases
from shared.db.session import Database
from shared.schemas.events import Rejection, RejectReason

log = logging.getLogger(__name__)

PublishRejected = Callable[[bytes, Rejection], None]

CANDIDATES = text(
    "SELECT event_id, case_id FROM case_events WHERE outcome = 'parked' "
    "AND received_at < now() - make_interval(secs => :max_age) "
    "ORDER BY received_at LIMIT :limit")
STILL_PARKED = text(
    "SELECT event_id, case_id, body, received_at FROM case_events "
    "WHERE event_id = ANY(:ids) AND outcome = 'parked' ORDER BY received_at FOR UPDATE")
EXPIRE = text(
    "UPDATE case_events SET outcome = 'expired', problem = :problem "
    "WHERE event_id = ANY(:ids)")
PARKED_STATS = text(
    "SELECT count(*), extract(epoch FROM now() - min(received_at)) FROM case_events "
    "WHERE outcome = 'parked'")


@dataclass(frozen=True)
class ParkedStats:
    count: int
    oldest_age_seconds: float | None


def expire_parked(db: Database, publish: PublishRejected, max_age_seconds: float,
                  limit: int = 500) -> int:
    """Move parked events older than `max_age_seconds` to the rejected queue; returns how
    many. Cases another worker holds now are left for the next sweep."""
    with db.transaction() as session:
        candidates = session.execute(CANDIDATES, {"max_age": max_age_seconds,
                                                  "limit": limit}).all()
        if not candidates:
            return 0
        locked = try_lock_cases(session, {case_id for _e, case_id in candidates})
        ids = [event_id for event_id, case_id in candidates if case_id in locked]
        rows = session.execute(STILL_PARKED, {"ids": ids}).all() if ids else []
        problem = (f"case_never_opened: no case.opened within {max_age_seconds:g} s "
                   f"of the event")
        for event_id, case_id, body, received_at in rows:
            detail = (f"case {case_id} was not opened within {max_age_seconds:g} s; "
                      f"parked since {received_at.isoformat()}")
            publish(json.dumps(body, ensure_ascii=False).encode(),
                    Rejection(RejectReason.case_never_opened, detail))
            log.warning("parked event %s expired: %s", event_id, detail)
        if rows:
            session.execute(EXPIRE, {"ids": [r[0] for r in rows], "problem": problem})
        return len(rows)


def parked_stats(db: Database) -> ParkedStats:
    with db.transaction() as session:
        count, oldest = session.execute(PARKED_STATS).one()
    return ParkedStats(int(count), float(oldest) if oldest is not None else None)
