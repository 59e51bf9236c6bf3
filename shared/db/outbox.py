"""Owner of `decisions` and `outbox`: each decision is stored once, with a row in the
outbox that the relay (services/resolver/outbox.py) publishes and then deletes.

The message bodies come from the caller (the contract is built in `shared/schemas/`);
this module only stores and hands them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

import orjson
from sqlalchemy import Connection, Table, text
from sqlalchemy.orm import Session

from shared.db.bulk import bulk_insert, bulk_insert_claiming
from shared.db.models import DecisionIdRow, DecisionRow, OutboxRow
from shared.db.session import Database

_DECISIONS = cast(Table, DecisionRow.__table__)
_OUTBOX = cast(Table, OutboxRow.__table__)

INSERT_DECISIONS = bulk_insert_claiming(
    _DECISIONS, ["decision_id", "case_id", "type", "step", "decided_at", "body"],
    cast(Table, DecisionIdRow.__table__), ["decision_id"], "RETURNING decision_id")
INSERT_OUTBOX = bulk_insert(
    _OUTBOX, ["exchange", "routing_key", "message_id", "headers", "body"])

# Two-int form: its own key space, apart from the per-case locks (one bigint).
TAKE_LEADERSHIP = text("SELECT pg_try_advisory_lock(1936, 1)")
# `id > :after`: during a backlog each claim starts where the last one ended, instead of
# walking the primary key from its start over the entries of rows already deleted (they
# stay in the index until vacuum, and a backlog deletes them faster than it runs). A row
# committed late with a lower id is found when `after` goes back to 0: whenever a claim
# comes back short (caught up) and after any failure.
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


@dataclass(frozen=True)
class DecisionRecord:
    """A decision to store, with the message that announces it."""

    decision_id: str
    case_id: str
    type: str
    step: str
    decided_at: datetime
    message: dict[str, Any]  # the contract's body (shared.schemas.decisions)
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    exchange: str
    routing_key: str
    message_id: str
    body: bytes
    headers: dict[str, Any] | None = field(default=None)


class OutboxRepository(Protocol):
    def add_decisions(self, decisions: Sequence[DecisionRecord]) -> set[str]:
        """Store these decisions, each new one with its outbox row; returns the ids that
        were new (a decision already stored, e.g. decided again after a crash, gets no
        second row and no second publish)."""


class SqlOutbox:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add_decisions(self, decisions: Sequence[DecisionRecord]) -> set[str]:
        if not decisions:
            return set()
        conn = self.session.connection()
        inserted = set(INSERT_DECISIONS.execute(conn, [
            {"decision_id": d.decision_id, "case_id": d.case_id, "type": d.type,
             "step": d.step, "decided_at": d.decided_at, "body": d.message}
            for d in decisions
        ]).scalars())
        fresh = [d for d in decisions if d.decision_id in inserted]
        if fresh:
            INSERT_OUTBOX.execute(conn, [
                {"exchange": d.exchange, "routing_key": d.routing_key,
                 "message_id": d.decision_id, "headers": {},
                 "body": orjson.dumps(d.message)}  # UTF-8, nothing escaped
                for d in fresh
            ])
        return inserted


class RelayStore(Protocol):
    """The relay's side of the outbox: leadership, and claim/delete in one transaction."""

    def lead(self) -> bool:
        """True if this relay leads (takes the lock if free); keeps it until step_down."""

    def step_down(self) -> None: ...

    def claim(self, after: int, limit: int) -> list[OutboxMessage]:
        """Begin a transaction and lock rows after `after` in id order."""

    def delete(self, ids: Sequence[int]) -> None: ...

    def end(self, commit: bool) -> None:
        """Commit (or roll back) the transaction `claim` began."""


class SqlRelayStore:
    """Only one relay publishes at a time: the holder of a PostgreSQL session advisory
    lock, taken on the connection the relay does all its work on. A relay that dies
    loses its connection and so its lock."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Connection | None = None  # holds the leadership lock while open

    def lead(self) -> bool:
        if self._conn is None:
            conn = self.db.sql_engine.connect()
            try:
                leader = conn.execute(TAKE_LEADERSHIP).scalar_one()
                conn.commit()
            except Exception:
                conn.close()
                raise
            if not leader:
                conn.close()
                return False
            self._conn = conn
        return True

    def step_down(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.invalidate()  # closing the session releases the lock

    def _connection(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("the relay does not lead")
        return self._conn

    def claim(self, after: int, limit: int) -> list[OutboxMessage]:
        conn = self._connection()
        conn.begin()
        return [OutboxMessage(r.id, r.exchange, r.routing_key, r.message_id, bytes(r.body),
                              r.headers or None)
                for r in conn.execute(CLAIM, {"after": after, "limit": limit})]

    def delete(self, ids: Sequence[int]) -> None:
        self._connection().execute(DELETE, {"ids": list(ids)})

    def end(self, commit: bool) -> None:
        conn = self._connection()
        if commit:
            conn.commit()
        else:
            conn.rollback()
