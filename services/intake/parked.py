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

from shared.db.case_log import ParkedStats
from shared.db.session import Database
from shared.db.uow import UnitOfWorkFactory, as_unit_of_work_factory
from shared.schemas.events import Rejection, RejectReason

log = logging.getLogger(__name__)

PublishRejected = Callable[[bytes, Rejection], None]

__all__ = ["ParkedStats", "expire_parked", "parked_stats"]


def expire_parked(db: Database | UnitOfWorkFactory, publish: PublishRejected,
                  max_age_seconds: float, limit: int = 500) -> int:
    """Move parked events older than `max_age_seconds` to the rejected queue; returns how
    many. Cases another worker holds now are left for the next sweep."""
    with as_unit_of_work_factory(db)() as uow:
        candidates = uow.case_log.parked_longer_than(max_age_seconds, limit)
        if not candidates:
            return 0
        locked = uow.cases.try_lock({case_id for _e, case_id in candidates})
        rows = uow.case_log.still_parked(
            [event_id for event_id, case_id in candidates if case_id in locked])
        problem = (f"case_never_opened: no case.opened within {max_age_seconds:g} s "
                   f"of the event")
        for row in rows:
            detail = (f"case {row.case_id} was not opened within {max_age_seconds:g} s; "
                      f"parked since {row.received_at.isoformat()}")
            publish(json.dumps(row.body, ensure_ascii=False).encode(),
                    Rejection(RejectReason.case_never_opened, detail))
            log.warning("parked event %s expired: %s", row.event_id, detail)
        uow.case_log.expire([row.event_id for row in rows], problem)
        uow.commit()
        return len(rows)


def parked_stats(db: Database | UnitOfWorkFactory) -> ParkedStats:
    with as_unit_of_work_factory(db)() as uow:
        return uow.case_log.parked_stats()
