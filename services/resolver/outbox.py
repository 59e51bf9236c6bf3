"""The outbox relay: publishes the decisions written in the same transaction as the case
change that caused them, to `aftersales.decisions`, each exactly once.

Each batch: claim rows in id order, publish them in one AMQP transaction together with a
*receipt* (the batch's outbox ids and message ids) to `aftersales.outbox.ledger`, delete
the rows, commit.
RabbitMQ has the receipt if and only if it has the batch. A crash between the broker's
commit and ours leaves rows in the table that RabbitMQ already has; before publishing
anything after a start or a failure, the relay reads the ledger and deletes the rows it
names, so they are not published again. In steady state the receipts name rows already
deleted and are simply taken off the ledger.

Only one relay publishes at a time: the holder of a PostgreSQL session advisory lock,
taken on the connection the relay does all its work on. Other copies wait as standbys.
A relay that dies loses its connection and so its lock; the next holder reconciles with
the ledger first. The lock is what makes "read the ledger, then publish" safe: no other
relay can have a batch in flight meanwhile. (A relay cut off from PostgreSQL but not from
RabbitMQ, at the moment of its broker commit, could still race a new holder: that window
is the time of one `tx.commit`. `decision_id` stays stable, so upstream can dedup.)
"""

from __future__ import annotations

import json
import logging

from sqlalchemy import Connection, text

from shared.amqp import OUTBOX_LEDGER_QUEUE
from shared.db.session import Database
from shared.publisher import BatchPublisher

log = logging.getLogger(__name__)

# Two-int form: its own key space, apart from the per-case locks (one bigint).
TAKE_LEADERSHIP = text("SELECT pg_try_advisory_lock(1936, 1)")
# `id > :after`: during a backlog each claim starts where the last one ended, instead of
# walking the primary key from its start over the entries of rows already deleted (they
# stay in the index until vacuum, and a backlog deletes them faster than it runs). A row
# committed late with a lower id is found when `after` goes back to 0: whenever a claim
# comes back short (caught up) and at every reconcile.
CLAIM = text(
    """
    SELECT id, exchange, routing_key, message_id, body, headers
    FROM outbox
    WHERE id > :after
    ORDER BY id
    LIMIT :limit
    FOR UPDATE
    """
)
DELETE = text("DELETE FROM outbox WHERE id = ANY(:ids)")
# The batch's deletion need not wait for its WAL flush: if PostgreSQL loses it in a crash,
# the rows come back, the relay's connection fails, and it reconciles with the ledger
# before publishing again; and receipts leave the ledger only in a synchronous commit,
# which flushes every earlier deletion with it.
ASYNC_COMMIT = text("SET LOCAL synchronous_commit = off")
# A transaction that writes nothing commits without flushing the WAL; taking a
# transaction id makes the reconcile's commit a real, synchronous one.
FLUSHING_COMMIT = text("SELECT pg_current_xact_id()")
# A receipt names rows by id *and* message id: a receipt left over from another database
# (restored, or recreated with ids starting again) can never delete the wrong row.
FORGET = text(
    """
    DELETE FROM outbox o USING unnest(CAST(:ids AS bigint[]), CAST(:mids AS text[])) AS r(id, mid)
    WHERE o.id = r.id AND o.message_id = r.mid
    """
)
# Receipts in steady state name rows already gone; take them off every this many batches.
RECEIPTS_KEPT = 50


class OutboxRelay:
    def __init__(self, db: Database, publisher: BatchPublisher, batch: int) -> None:
        self.db = db
        self.publisher = publisher
        self.batch = batch
        self._conn: Connection | None = None  # holds the leadership lock while open
        self._reconciled = False
        self._batches_since_reconcile = 0
        self._after = 0  # highest id claimed in the current run of full batches

    def relay_once(self) -> list[str]:
        """Publish one batch if this relay leads; returns the routing keys published (for
        metrics). Any failure drops the connection, and so leadership: the next call
        starts over from the ledger."""
        try:
            conn = self._lead()
            if conn is None:
                return []
            if not self._reconciled or self._batches_since_reconcile >= RECEIPTS_KEPT:
                self.reconcile(conn)
            published = self._publish_batch(conn)
            if not published and self._batches_since_reconcile:
                self.reconcile(conn)  # idle with receipts out: keep the ledger short
            return published
        except Exception:
            self._step_down()
            raise

    def _lead(self) -> Connection | None:
        if self._conn is None:
            conn = self.db.engine.connect()
            try:
                leader = conn.execute(TAKE_LEADERSHIP).scalar_one()
                conn.commit()
            except Exception:
                conn.close()
                raise
            if not leader:
                conn.close()
                return None
            log.info("outbox relay: leading (another copy, if any, stands by)")
            self._conn = conn
            self._reconciled = False
        return self._conn

    def _step_down(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()  # closing the session releases the lock
            except Exception as exc:  # already broken: dropping it is all that is left
                log.debug("outbox relay: dropping the connection: %s", exc)
            self._conn = None

    def close(self) -> None:
        self._step_down()

    def reconcile(self, conn: Connection) -> int:
        """Delete the rows the ledger's receipts name (RabbitMQ has them), then take the
        receipts off the ledger. Returns how many rows were still there: each one is a
        batch that would otherwise have been published twice."""
        found = 0

        def forget(bodies: list[bytes]) -> None:
            nonlocal found
            rows = [row for body in bodies for row in json.loads(body)["rows"]]
            with conn.begin():
                conn.execute(FLUSHING_COMMIT)
                found += conn.execute(FORGET, {"ids": [r[0] for r in rows],
                                               "mids": [r[1] for r in rows]}).rowcount

        while self.publisher.take(OUTBOX_LEDGER_QUEUE, forget) > 0:
            pass
        if found:
            log.warning("outbox relay: %d rows were already published before a crash; "
                        "not published again", found)
        self._reconciled = True
        self._batches_since_reconcile = 0
        self._after = 0
        return found

    def _publish_batch(self, conn: Connection) -> list[str]:
        with conn.begin():
            conn.execute(ASYNC_COMMIT)
            rows = conn.execute(CLAIM, {"after": self._after, "limit": self.batch}).all()
            if rows:
                receipt = {"rows": [[row.id, row.message_id] for row in rows]}
                self.publisher.publish_batch(
                    [(row.exchange, row.routing_key, bytes(row.body), row.message_id,
                      row.headers or None) for row in rows],
                    receipt=(OUTBOX_LEDGER_QUEUE, json.dumps(receipt).encode()),
                )
                conn.execute(DELETE, {"ids": [row.id for row in rows]})
        if rows:
            self._batches_since_reconcile += 1
        self._after = rows[-1].id if len(rows) == self.batch else 0
        return [row.routing_key for row in rows]
