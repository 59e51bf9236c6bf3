"""The timer: fires due deadlines from PostgreSQL, oldest first, shared by any number of
copies.

Each tick claims a bounded batch of due rows with `FOR UPDATE SKIP LOCKED` (so copies
never take the same row), hands each to the resolver as a Dramatiq message (publisher
confirms), marks them dispatched and commits. The database clock decides what is due.
A crash between publish and commit leaves the rows pending: they are sent again, and the
resolver's fence makes the second one a no-op. Memory stays flat: nothing about pending
deadlines is held between ticks. The same loop hands notifications to the notifier (new,
deferred until now, or queued long ago and never finished), in batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text

from shared.amqp import FIRE_DEADLINE_ACTOR, NOTIFIER_QUEUE, RESOLVER_QUEUE, SEND_NOTIFICATION_ACTOR
from shared.db.session import Database
from shared.publisher import Publisher

log = logging.getLogger(__name__)

CLAIM_DUE = text(
    """
    SELECT id, purpose, EXTRACT(EPOCH FROM (now() - due_at)) AS lateness
    FROM deadlines
    WHERE status = 'pending' AND due_at <= now()
    ORDER BY due_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
# Dispatched long ago and never finished (the message or the resolver died): send again.
CLAIM_STUCK = text(
    """
    SELECT id FROM deadlines
    WHERE status = 'dispatched' AND dispatched_at < now() - make_interval(secs => :after)
    ORDER BY dispatched_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
MARK_DISPATCHED = text(
    """
    UPDATE deadlines
    SET status = 'dispatched', dispatched_at = now(), dispatch_count = dispatch_count + 1
    WHERE id = ANY(:ids)
    """
)
# Notifications to hand to the notifier: new ones, deferred ones whose time has come, and
# queued ones whose message was lost (the notifier gave up on it or died): oldest first.
CLAIM_NOTIFICATIONS = (
    text("""SELECT id FROM notifications WHERE status = 'new'
            ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"""),
    text("""SELECT id FROM notifications WHERE status = 'deferred' AND send_after <= now()
            ORDER BY send_after LIMIT :limit FOR UPDATE SKIP LOCKED"""),
    text("""SELECT id FROM notifications
            WHERE status = 'queued' AND queued_at < now() - make_interval(secs => :after)
            ORDER BY queued_at LIMIT :limit FOR UPDATE SKIP LOCKED"""),
)
MARK_NOTIFICATIONS_QUEUED = text(
    "UPDATE notifications SET status = 'queued', queued_at = now() WHERE id = ANY(:ids)"
)


@dataclass(frozen=True)
class TickResult:
    fired: int
    redispatched: int
    notifications: int
    latenesses: list[tuple[str, float]]  # (purpose, seconds late)


class DispatchTokenBucket:
    """Token bucket: at most `rate` dispatches per second, so catching up after an outage
    does not flood the resolver and the notifier."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.updated = clock()

    def available(self) -> int:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return int(self.tokens)

    def take(self, count: int) -> None:
        self.tokens -= count


class Timer:
    def __init__(
        self,
        db: Database,
        publisher: Publisher,
        *,
        batch: int,
        redispatch_after: float,
        max_rate: float,
        message_size: int = 50,
    ) -> None:
        self.db = db
        self.publisher = publisher
        self.batch = batch
        self.message_size = message_size
        self.redispatch_after = redispatch_after
        self.dispatch_bucket = DispatchTokenBucket(max_rate)

    def tick(self) -> TickResult:
        limit = min(self.batch, self.dispatch_bucket.available())
        if limit <= 0:
            return TickResult(0, 0, 0, [])
        with self.db.transaction() as s:
            due = s.execute(CLAIM_DUE, {"limit": limit}).all()
            stuck = s.execute(
                CLAIM_STUCK, {"after": self.redispatch_after, "limit": max(1, limit - len(due))}
            ).all()
            ids = [row.id for row in due] + [row.id for row in stuck]
            # Oldest first, several per message: the resolver handles a message's deadlines
            # in one transaction, and one publisher confirm covers them all.
            for start in range(0, len(ids), self.message_size):
                chunk = ids[start:start + self.message_size]
                self.publisher.send_actor(RESOLVER_QUEUE, FIRE_DEADLINE_ACTOR, chunk)
            if ids:
                s.execute(MARK_DISPATCHED, {"ids": ids})
        self.dispatch_bucket.take(len(ids))
        notifications = self._hand_over_notifications(limit)
        return TickResult(
            fired=len(due),
            redispatched=len(stuck),
            notifications=notifications,
            latenesses=[(row.purpose, float(row.lateness)) for row in due],
        )

    def _hand_over_notifications(self, limit: int) -> int:
        with self.db.transaction() as s:
            params = {"limit": limit, "after": self.redispatch_after}
            ids = [r.id for claim in CLAIM_NOTIFICATIONS for r in s.execute(claim, params)]
            for start in range(0, len(ids), self.message_size):
                chunk = ids[start:start + self.message_size]
                self.publisher.send_actor(NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR, chunk)
            if ids:
                s.execute(MARK_NOTIFICATIONS_QUEUED, {"ids": ids})
        return len(ids)
