"""The backlog as ops see it, read from PostgreSQL (one consistent read) on an interval by
`PeriodicBacklog`, never per scrape: however many scrapers and replicas, the aggregate
queries run once per interval per timer process. `read_backlog` returns plain figures;
the caller turns them into metrics (shared.metrics.BacklogSnapshot.from_rows)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import text

from shared.db.session import Database

OPEN_CASES = text(
    "SELECT platform, kind, step, count(*) FROM cases WHERE status = 'open' GROUP BY 1, 2, 3"
)
PENDING_DEADLINES = text(
    "SELECT step, purpose, count(*) FROM deadlines WHERE status = 'pending' GROUP BY 1, 2"
)
# Overdue: pending or dispatched, due by now. One branch per status, for the reason given
# at NOTIFICATIONS_PENDING below: the pending branch reads only the overdue part of
# ix_deadlines_pending_due, the dispatched one the few rows in flight. As one
# `status IN (...)` the only index it matched was ix_deadlines_open_case (by case), so it
# read every open deadline, millions with a million open cases, every interval.
OVERDUE = text(
    """SELECT count(*), min(due_at) FROM (
           SELECT due_at FROM deadlines WHERE status = 'pending' AND due_at <= now()
           UNION ALL SELECT due_at FROM deadlines
                      WHERE status = 'dispatched' AND due_at <= now()) overdue"""
)
# the partial index ix_deadlines_pending_estimated makes this cheap
ESTIMATED_DEADLINES = text(
    """SELECT count(*) FROM deadlines
       WHERE status = 'pending' AND calendar_source = 'estimated' AND purpose = 'deadline'"""
)
OLDEST_OPEN = text("SELECT min(opened_at) FROM cases WHERE status = 'open'")
OUTBOX = text("SELECT count(*), min(created_at) FROM outbox")
# One branch per status, each read through its partial index (only the rows not sent):
# `status IN (...)` is not matched to partial indexes, so it read every notification
# ever kept, a year of them with history, every interval.
NOTIFICATIONS_PENDING = text(
    """SELECT channel, count(*) FROM (
           SELECT channel FROM notifications WHERE status = 'new'
           UNION ALL SELECT channel FROM notifications WHERE status = 'queued'
           UNION ALL SELECT channel FROM notifications WHERE status = 'deferred'
           UNION ALL SELECT channel FROM notifications WHERE status = 'pending') waiting
       GROUP BY 1"""
)


@dataclass(frozen=True)
class BacklogFigures:
    """One consistent read of the backlog, as rows and numbers (the keywords of
    `BacklogSnapshot.from_rows`)."""

    open_cases: list[tuple[Any, ...]] = field(default_factory=list)  # platform, kind, step, n
    pending_deadlines: list[tuple[Any, ...]] = field(default_factory=list)  # step, purpose, n
    notifications_pending: list[tuple[Any, ...]] = field(default_factory=list)  # channel, n
    oldest_open_case_at: datetime | None = None
    oldest_overdue_deadline_at: datetime | None = None
    overdue_deadlines: int = 0
    outbox_unpublished: int = 0
    oldest_unpublished_outbox_at: datetime | None = None
    calendar_covered_until: datetime | None = None
    estimated_deadlines: int = 0


def read_backlog(db: Database, calendar_covered_until: datetime | None = None
                 ) -> BacklogFigures:
    with db.transaction() as s:
        s.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        overdue_count, oldest_overdue = s.execute(OVERDUE).one()
        outbox_count, oldest_outbox = s.execute(OUTBOX).one()
        return BacklogFigures(
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


log = logging.getLogger(__name__)


Snapshot = TypeVar("Snapshot")

# The counts grow with the open work (a million open cases: millions of pending deadlines
# counted on every read). A read that takes long waits this many times its own duration
# before the next, so the gauges never take more than about a twentieth of one of the
# database's cores, however large the backlog; they are refreshed less often meanwhile.
WAIT_PER_READ = 20


class PeriodicBacklog(Generic[Snapshot]):
    """Calls `read()` every `interval_s` seconds (or less often: WAIT_PER_READ) in a
    daemon thread; calling the object returns the last snapshot (what the metrics
    collector asks for on a scrape). Raises
    while no read has succeeded or the last one failed, so the collector exposes
    `aftersales_backlog_query_ok 0` rather than stale figures."""

    def __init__(self, read: Callable[[], Snapshot], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read = read
        self.interval_s = interval_s
        self.clock = clock
        self._snapshot: Snapshot | None = None
        self._error: Exception | None = RuntimeError("backlog not read yet")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backlog", daemon=True)

    def start(self) -> PeriodicBacklog[Snapshot]:
        self._thread.start()
        return self

    def refresh(self) -> None:
        try:
            snapshot = self.read()
        except Exception as exc:
            log.warning("backlog query failed: %s", exc)
            with self._lock:
                self._error = exc
            return
        with self._lock:
            self._snapshot, self._error = snapshot, None

    def read_and_rest(self) -> float:
        """Read once; how long to wait before the next read: the interval, or, for a read
        that took long, WAIT_PER_READ times as long as it took."""
        started = self.clock()
        self.refresh()
        return max(self.interval_s, (self.clock() - started) * WAIT_PER_READ)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.read_and_rest())

    def __call__(self) -> Snapshot:
        with self._lock:
            if self._error is not None or self._snapshot is None:
                raise RuntimeError(f"backlog unavailable: {self._error}")
            return self._snapshot
