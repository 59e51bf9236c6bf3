"""The outbox relay: publishes the decisions written in the same transaction as the case
change that caused them, to `aftersales.decisions`: none lost, and a repeat only after a
crash at the one moment described below.

Each batch: claim rows in id order (`FOR UPDATE`), publish them with publisher confirms,
and only once RabbitMQ has confirmed every message of the batch delete the rows and
commit. A broker crash before the confirms (even halfway through a batch) leaves every
row in the table, to be published again; nothing is deleted that RabbitMQ has not
confirmed. A relay (or PostgreSQL) that dies after the confirms and before the commit
leaves rows RabbitMQ already has: they are published again, with the same message id and
`decision_id`, and upstream deduplicates on it (the contract says so). The fault tests
count these repeats on the wire.

An earlier design published each batch with a receipt in one AMQP transaction and
trusted "RabbitMQ has the receipt if and only if it has the batch". RabbitMQ does not
promise that a transaction is atomic across queues, so after a broker crash during
`tx.commit` a receipt could exist without its decisions, and those would have been
deleted unpublished. Confirms promise something per message, which is all this needs.

Only one relay publishes at a time: the holder of a PostgreSQL session advisory lock,
taken on the connection the relay does all its work on. Other copies wait as standbys.
A relay that dies loses its connection and so its lock. Publishing in id order from one
relay keeps decisions in the order they were written.
"""

from __future__ import annotations

import logging
from typing import Protocol

from shared.confirms import PartlyConfirmed
from shared.db.outbox import RelayStore, SqlRelayStore
from shared.db.session import Database

log = logging.getLogger(__name__)


class BatchPublisher(Protocol):
    def publish_batch(self, messages: list[tuple[str, str, bytes, str, dict | None]]
                      ) -> None: ...

    def close(self) -> None: ...


class OutboxRelay:
    def __init__(self, db: Database | RelayStore, publisher: BatchPublisher, batch: int
                 ) -> None:
        self.store = SqlRelayStore(db) if isinstance(db, Database) else db
        self.publisher = publisher
        self.batch = batch
        self._leading = False
        self._after = 0  # highest id claimed in the current run of full batches

    def relay_once(self) -> list[str]:
        """Publish one batch if this relay leads; returns the routing keys published (for
        metrics). Any failure drops the connection, and so leadership: the next call
        starts over from the lowest id."""
        try:
            if not self.store.lead():
                return []
            if not self._leading:
                log.info("outbox relay: leading (another copy, if any, stands by)")
                self._leading = True
            return self._publish_batch()
        except Exception:
            self._step_down()
            self._after = 0
            raise

    def _step_down(self) -> None:
        self._leading = False
        try:
            self.store.step_down()  # closing the session releases the lock
        except Exception as exc:  # already broken: dropping it is all that is left
            log.debug("outbox relay: dropping the connection: %s", exc)

    def close(self) -> None:
        self._step_down()
        self.publisher.close()

    def _publish_batch(self) -> list[str]:
        partly: PartlyConfirmed | None = None
        rows = self.store.claim(self._after, self.batch)
        try:
            if rows:
                try:
                    self.publisher.publish_batch(
                        [(row.exchange, row.routing_key, row.body, row.message_id,
                          row.headers) for row in rows])
                except PartlyConfirmed as exc:
                    # The broker went away mid-batch: what it confirmed is there; only the
                    # rest is published again (fewer repeats on the wire).
                    partly = exc
                    self.store.delete([rows[i].id for i in exc.confirmed])
                else:
                    # Every message confirmed: only now may the rows go.
                    self.store.delete([row.id for row in rows])
        except BaseException:
            try:
                self.store.end(commit=False)
            except Exception as exc:  # the connection is gone: so is the transaction
                log.debug("outbox relay: rolling back: %s", exc)
            raise
        self.store.end(commit=True)
        if partly is not None:
            raise partly.cause
        self._after = rows[-1].id if len(rows) == self.batch else 0
        return [row.routing_key for row in rows]
