"""The timer: fires due deadlines from PostgreSQL, oldest first, shared by any number of
copies.

Each tick claims a bounded batch of due rows with `FOR UPDATE SKIP LOCKED` (so copies
never take the same row), hands each to the resolver as a Dramatiq message (publisher
confirms), marks them dispatched and commits. The database clock decides what is due.
A crash between publish and commit leaves the rows pending: they are sent again, and the
resolver's fence makes the second one a no-op. Memory stays flat: nothing about pending
deadlines is held between ticks. The same loop hands notifications to the notifier (new,
deferred until now, or queued long ago and never finished), in batches, while the
notifier's queue has room for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.amqp import FIRE_DEADLINE_ACTOR, NOTIFIER_QUEUE, RESOLVER_QUEUE, SEND_NOTIFICATION_ACTOR
from shared.db.session import Database
from shared.db.uow import UnitOfWorkFactory, as_unit_of_work_factory
from shared.publisher import Publisher

log = logging.getLogger(__name__)


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
        db: Database | UnitOfWorkFactory,
        publisher: Publisher,
        *,
        batch: int,
        redispatch_after: float,
        max_rate: float,
        message_size: int = 50,
        notifier_queue_max: int | None = None,
    ) -> None:
        self.uow = as_unit_of_work_factory(db)
        self.publisher = publisher
        self.batch = batch
        self.message_size = message_size
        self.redispatch_after = redispatch_after
        self.dispatch_bucket = DispatchTokenBucket(max_rate)
        # Messages the notifier's queue may hold before notifications wait in the table
        # (None: no bound).
        self.notifier_queue_max = notifier_queue_max

    def tick(self) -> TickResult:
        limit = min(self.batch, self.dispatch_bucket.available())
        if limit <= 0:
            return TickResult(0, 0, 0, [])
        with self.uow() as uow:
            due = uow.deadlines.claim_due(limit)
            stuck = uow.deadlines.claim_stuck(self.redispatch_after, max(1, limit - len(due)))
            ids = [d.id for d in due] + stuck
            # Oldest first, several per message: the resolver handles a message's deadlines
            # in one transaction, and one publisher confirm covers them all.
            for start in range(0, len(ids), self.message_size):
                chunk = ids[start:start + self.message_size]
                self.publisher.send_actor(RESOLVER_QUEUE, FIRE_DEADLINE_ACTOR, chunk)
            uow.deadlines.mark_dispatched(ids)
            uow.commit()
        self.dispatch_bucket.take(len(ids))
        notifications = self._hand_over_notifications(limit)
        return TickResult(
            fired=len(due),
            redispatched=len(stuck),
            notifications=notifications,
            latenesses=[(d.purpose, d.lateness) for d in due],
        )

    def _hand_over_notifications(self, limit: int) -> int:
        """Hand notifications to the notifier, as many as its queue has room for: a
        backlog waits in the table, where the notifier takes it as fast as it can send,
        not in the queue, where rows queued longer than `redispatch_after` would be
        handed over again (and again) while the first message still waits."""
        if self.notifier_queue_max is not None:
            room = self.notifier_queue_max - self.publisher.waiting(NOTIFIER_QUEUE)
            if room <= 0:
                return 0
            limit = min(limit, room * self.message_size)
        with self.uow() as uow:
            rows = uow.notifications.claim_for_notifier(limit, self.redispatch_after)
            for start in range(0, len(rows), self.message_size):
                chunk = rows[start:start + self.message_size]
                # When the rows were written, so the notifier finds their partitions.
                made = [created for _id, created in chunk]
                self.publisher.send_actor(NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR,
                                          [i for i, _created in chunk],
                                          [min(made).isoformat(), max(made).isoformat()])
            uow.notifications.mark_queued(rows)
            uow.commit()
        return len(rows)
