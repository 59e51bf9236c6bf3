"""The outbox relay: publishes decisions (to `aftersales.decisions`) and notifier messages
that were written in the same transaction as the case change that caused them.

Each batch: claim rows in id order with `FOR UPDATE SKIP LOCKED` (several relays share
the work), publish them in one AMQP transaction (RabbitMQ has them all when the commit
returns), delete them, commit. A crash after the broker's commit and before ours
publishes that batch again: upstream dedups on `decision_id`. `AFTERSALES_OUTBOX_BATCH`
bounds how many can repeat after one crash.
"""

from __future__ import annotations

import logging

from sqlalchemy import text

from shared.db.session import Database
from shared.publisher import BatchPublisher

log = logging.getLogger(__name__)

CLAIM = text(
    """
    SELECT id, exchange, routing_key, message_id, body, headers
    FROM outbox
    ORDER BY id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
DELETE = text("DELETE FROM outbox WHERE id = ANY(:ids)")


class OutboxRelay:
    def __init__(self, db: Database, publisher: BatchPublisher, batch: int) -> None:
        self.db = db
        self.publisher = publisher
        self.batch = batch

    def relay_once(self) -> list[str]:
        """Publish one batch; returns the routing keys published (for metrics)."""
        with self.db.transaction() as s:
            rows = s.execute(CLAIM, {"limit": self.batch}).all()
            if rows:
                self.publisher.publish_batch([
                    (row.exchange, row.routing_key, bytes(row.body), row.message_id,
                     row.headers or None)
                    for row in rows
                ])
                s.execute(DELETE, {"ids": [row.id for row in rows]})
        return [row.routing_key for row in rows]
