"""The outbox relay: publishes decisions (to `aftersales.decisions`) and notifier messages
that were written in the same transaction as the case change that caused them.

Each batch: claim rows in id order with `FOR UPDATE SKIP LOCKED` (several relays share
the work), publish each with publisher confirms, delete them, commit. A crash after a
confirm and before the commit publishes those rows again: upstream dedups on
`decision_id`, the notifier on the notification's dedup key. Keeping that window small
(one confirmed publish at a time, small batches) keeps such repeats rare.
"""

from __future__ import annotations

import logging

from sqlalchemy import text

from shared.db.session import Database
from shared.publisher import Publisher

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
    def __init__(self, db: Database, publisher: Publisher, batch: int) -> None:
        self.db = db
        self.publisher = publisher
        self.batch = batch

    def relay_once(self) -> list[str]:
        """Publish one batch; returns the routing keys published (for metrics)."""
        with self.db.transaction() as s:
            rows = s.execute(CLAIM, {"limit": self.batch}).all()
            for row in rows:
                self.publisher.publish(
                    row.exchange, row.routing_key, bytes(row.body), row.message_id,
                    row.headers or None,
                )
            if rows:
                s.execute(DELETE, {"ids": [row.id for row in rows]})
        return [row.routing_key for row in rows]
