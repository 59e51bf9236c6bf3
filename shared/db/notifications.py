"""The owner of the `notifications` table (the notifier's own outbox): the row statuses;
the write path's side (rows written `new` with the case change that caused them, handed to
the notifier by the timer: `SqlNotificationHandover`, the unit of work's `notifications`);
and the notifier's side, the statements that claim, send-mark and record rows (moved from
the sender as they were).

`NotificationStore(session)` wraps them for one transaction; the sender receives such
stores through a port (`services.notifier.sender.NotificationRepository`) and its unit
tests use an in-memory fake of the same shape."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Table, any_, bindparam, func, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from shared.db.bulk import bulk_insert_claiming
from shared.db.models import NotificationKeyRow, NotificationRow
from shared.db.session import KEEP_INDEX_PLANS, USUAL_PLANS, Database, db_now

# The earliest and the latest creation time of some notification rows (their partition key).
MadeBetween = tuple[datetime, datetime]


class NotificationStatus(StrEnum):
    """A notification row's status: new -> queued -> sending -> sent | failed; deferred
    (quiet hours, rate limit, retry later) -> queued again at `send_after`.

    A `sending` row belongs to the claim named by `claim_token`; `handed_over_at` is
    stamped (committed) just before the provider call. A `sending` row without the stamp
    was never handed to a provider: a worker that died holding it leaves it to be claimed
    again. Only a stamped row may have reached the provider ("unknown" if its claim died)."""

    NEW = "new"  # written with the case change; the timer hands it to the notifier
    QUEUED = "queued"  # handed to the notifier (`queued_at`)
    PENDING = "pending"  # what `queued` was called before migration 0002; still claimed
    SENDING = "sending"  # claimed by a worker; with a provider once `handed_over_at` is set
    SENT = "sent"
    FAILED = "failed"
    DEFERRED = "deferred"  # the timer queues it again at `send_after`


# A row in one of these is finished: a message for it again is a redelivery.
DONE = (NotificationStatus.SENT, NotificationStatus.FAILED)
# Not finished, not waiting for `send_after`: with the notifier or on its way to it.
IN_FLIGHT = (NotificationStatus.NEW, NotificationStatus.QUEUED, NotificationStatus.SENDING)

UNKNOWN_ERROR = "unknown: worker died during the send; not repeated"

_N = cast(Table, NotificationRow.__table__)


def _made_between(since: str, until: str) -> Any:
    """`created_at` (the partition key) within the bound parameters `since` and `until`,
    each None for no bound: a statement naming rows by id alone probes every monthly
    partition; with the rows' creation times it touches only theirs (pruned when it
    runs, so one statement text serves every month)."""
    return _N.c.created_at.between(
        func.coalesce(bindparam(since, type_=_N.c.created_at.type),
                      text("'-infinity'::timestamptz")),
        func.coalesce(bindparam(until, type_=_N.c.created_at.type),
                      text("'infinity'::timestamptz")))

# One SQL text each whatever the batch size (`= ANY(array)`, executemany with bound
# parameters): psycopg parses every new text again.
CLAIM = (
    select(_N.c.id, _N.c.status, _N.c.attempts, _N.c.dedup_key, _N.c.case_id, _N.c.reason,
           _N.c.party, _N.c.channel, _N.c.recipient, _N.c.template, _N.c.params, _N.c.urgent,
           _N.c.created_at, _N.c.claim_token, _N.c.handed_over_at)
    .where(_N.c.id == any_(bindparam("ids")), _made_between("since", "until"))
    .order_by(_N.c.id).with_for_update()
)
MARK_SENDING = (
    update(_N).where(_N.c.id == any_(bindparam("ids")), _made_between("since", "until"))
    .values(status=NotificationStatus.SENDING, claim_token=bindparam("token"),
            handed_over_at=None)
)
# Committed just before the provider call: the rows this claim still holds (another claim
# may have taken over a row its worker was thought dead for) and hands over now.
HAND_OVER = (
    update(_N).where(_N.c.id == any_(bindparam("ids")), _N.c.claim_token == bindparam("token"),
                     _N.c.status == NotificationStatus.SENDING, _N.c.handed_over_at.is_(None),
                     _made_between("since", "until"))
    .values(handed_over_at=func.now()).returning(_N.c.id)
)
# A chunk's hand-overs go through one connection whose statements each commit on their
# own (one round trip per statement: a transaction per row, with its BEGIN, pool ping
# and COMMIT, cut the notifier's throughput several times over on a busy host), and
# without waiting for the disk. A stamp is visible to other sessions at once and
# survives a worker's death and a clean PostgreSQL restart; only a crash of PostgreSQL
# itself can lose the last few hundred milliseconds of them. The worker then still
# records its result once the database is back (its claim, committed durably, still
# holds the row), so a notification goes out twice only if its worker also dies within
# that outage. A result recorded here and lost leaves its row stamped: "unknown".
NO_DISK_WAIT = "SET synchronous_commit = off"
# Its statements run once per notification and find rows by id alone: their plans are
# kept (KEEP_INDEX_PLANS says why).
HAND_OVER_SETTINGS = text(f"{NO_DISK_WAIT}; {KEEP_INDEX_PLANS}")  # one round trip
# Back to the connection's own settings (those it was opened with).
USUAL_SETTINGS = text(f"RESET synchronous_commit; {USUAL_PLANS}")
MARK_UNKNOWN = (
    update(_N).where(_N.c.id == any_(bindparam("ids")), _made_between("since", "until"))
    .values(status=NotificationStatus.FAILED, last_error=UNKNOWN_ERROR)
)
# COALESCE keeps what an outcome does not set (a failure keeps its send_after, a deferral
# its provider_id), as the per-outcome updates did.
# Only while the claim holds the row: a claim taken over records nothing.
RECORD = (
    update(_N).where(_N.c.id == bindparam("b_id"), _N.c.claim_token == bindparam("b_token"),
                     _made_between("b_created", "b_created"))
    .values(
        status=bindparam("b_status"),
        attempts=bindparam("b_attempts"),
        last_error=bindparam("b_last_error"),
        sent_at=func.coalesce(bindparam("b_sent_at", type_=_N.c.sent_at.type), _N.c.sent_at),
        provider_id=func.coalesce(bindparam("b_provider_id", type_=_N.c.provider_id.type),
                                  _N.c.provider_id),
        send_after=func.coalesce(bindparam("b_send_after", type_=_N.c.send_after.type),
                                 _N.c.send_after),
    )
)
# The usual hand-over: the row sent just before is recorded and the next one stamped in
# one statement (one round trip; the two rows differ).
RECORD_AND_HAND_OVER = HAND_OVER.add_cte(RECORD.cte("recorded"))
# Claimed rows that were provably never handed to a channel go back to what they were.
RELEASE = (
    update(_N).where(_N.c.id == bindparam("b_id"), _N.c.status == NotificationStatus.SENDING,
                     _N.c.claim_token == bindparam("b_token"), _N.c.handed_over_at.is_(None),
                     _made_between("b_created", "b_created"))
    .values(status=bindparam("b_status"))
)


class NotificationStore:
    """The notifier's statements on `notifications`, in the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._created: dict[int, datetime] = {}  # of the rows `lock` read

    @classmethod
    def transactions(cls, db: Database) -> NotificationTables:
        """What the sender receives: transactions, each yielding a store, and hand-over
        lines."""
        return NotificationTables(db)

    def now(self) -> datetime:
        """The database's clock (the timer releases deferred rows by `now()`)."""
        return db_now(self.session)

    def lock(self, ids: Sequence[int], made_between: MadeBetween | None = None
             ) -> list[Any]:
        """The rows with these ids, locked, in id order (ids not found are absent);
        `made_between`, when the message said when they were written, finds their
        partitions."""
        since, until = made_between or (None, None)
        rows = list(self.session.connection().execute(
            CLAIM, {"ids": list(ids), "since": since, "until": until}))
        self._created.update((row.id, row.created_at) for row in rows)
        return rows

    def _bounds(self, ids: Sequence[int]) -> dict[str, Any]:
        """`ids` and the span of their rows' creation times (no bound if one is unknown)."""
        made = [self._created.get(i) for i in ids]
        known = [m for m in made if m is not None]
        if len(known) < len(made) or not known:
            return {"ids": list(ids), "since": None, "until": None}
        return {"ids": list(ids), "since": min(known), "until": max(known)}

    def claim(self, ids: Sequence[int], token: str) -> None:
        """Mark the rows `sending` for the claim `token`, not handed over yet."""
        if ids:
            self.session.connection().execute(MARK_SENDING, {**self._bounds(ids), "token": token})


    def mark_unknown(self, ids: Sequence[int]) -> None:
        if ids:
            self.session.connection().execute(MARK_UNKNOWN, self._bounds(ids))

    def record(self, results: Sequence[dict[str, Any]]) -> None:
        """RECORD's parameters, one dict per row (see `record_values`)."""
        if results:
            self.session.connection().execute(RECORD, list(results))

    def release(self, rows: Sequence[tuple[int, str]], token: str) -> None:
        """(id, status to return to) for rows of the claim never handed to a channel."""
        if rows:
            self.session.connection().execute(
                RELEASE, [{"b_id": i, "b_status": status, "b_token": token,
                           "b_created": self._created.get(i)} for i, status in rows])


class HandOverLine:
    """A chunk's hand-overs: each statement commits on its own, without waiting for the
    disk, with plans kept (HAND_OVER_SETTINGS, and the comments above it, say why)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def record_and_hand_over(self, results: Sequence[dict[str, Any]], ids: Sequence[int],
                             token: str, created: datetime | None = None) -> set[int]:
        """Record `results` (RECORD's parameters), then stamp the rows the claim still
        holds as handed to a provider; those ids. `created`: the rows' creation time when
        they share one (the hand-over of a single row), for the partition."""
        stamp = {"ids": list(ids), "token": token, "since": created, "until": created}
        if len(results) == 1:
            return set(self.conn.execute(RECORD_AND_HAND_OVER, {**results[0], **stamp})
                       .scalars())
        if results:
            self.conn.execute(RECORD, list(results))
        return set(self.conn.execute(HAND_OVER, stamp).scalars())


class NotificationTables:
    """The notifier's storage: `tables()` is a transaction yielding a NotificationStore;
    `tables.hand_overs()` a HandOverLine on a connection of its own."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @contextmanager
    def __call__(self) -> Iterator[NotificationStore]:
        with self.db.transaction() as session:
            yield NotificationStore(session)

    @contextmanager
    def hand_overs(self) -> Iterator[HandOverLine]:
        with self.db.sql_engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(HAND_OVER_SETTINGS)
            try:
                yield HandOverLine(conn)
            finally:
                # Never hand the pool a connection that skips the disk wait.
                try:
                    conn.execute(USUAL_SETTINGS)
                except SQLAlchemyError:  # the connection is gone (or broken): drop it
                    conn.invalidate()


def record_values(notification_id: int, token: str, status: str, attempts: int,
                  last_error: str | None, *, sent_at: datetime | None = None,
                  provider_id: str | None = None, send_after: datetime | None = None,
                  created_at: datetime | None = None) -> dict[str, Any]:
    """RECORD's parameters; `created_at`, the row's, finds its partition (None: any)."""
    return {"b_id": notification_id, "b_token": token, "b_status": status, "b_attempts": attempts,
            "b_last_error": last_error, "b_sent_at": sent_at, "b_provider_id": provider_id,
            "b_send_after": send_after, "b_created": created_at}


# ---- the write path's side: rows written new, handed to the notifier by the timer ----

_NOTIFICATIONS = cast(Table, NotificationRow.__table__)

# No RETURNING: the timer finds new notifications by status.
INSERT_NOTIFICATIONS = bulk_insert_claiming(_NOTIFICATIONS, [
    "dedup_key", "case_id", "reason", "party", "channel", "recipient", "template", "params",
    "urgent", "status"], cast(Table, NotificationKeyRow.__table__), ["dedup_key"])
# Notifications to hand to the notifier, oldest first within each kind and each kind
# taking what the ones before left of the limit: deferred ones whose time has come (the
# oldest obligations), new ones, and queued ones whose message was lost (the notifier
# gave up on it or died; rare). With their creation times: the update after, and the
# notifier (in its message), find the rows' partitions by them.
CLAIM_NOTIFICATIONS = (
    text("""SELECT id, created_at FROM notifications
            WHERE status = 'deferred' AND send_after <= now()
            ORDER BY send_after LIMIT :limit FOR UPDATE SKIP LOCKED"""),
    text("""SELECT id, created_at FROM notifications WHERE status = 'new'
            ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"""),
    text("""SELECT id, created_at FROM notifications
            WHERE status = 'queued' AND queued_at < now() - make_interval(secs => :after)
            ORDER BY queued_at LIMIT :limit FOR UPDATE SKIP LOCKED"""),
)
MARK_NOTIFICATIONS_QUEUED = (
    update(_N).where(_N.c.id == any_(bindparam("ids")), _made_between("since", "until"))
    .values(status=NotificationStatus.QUEUED, queued_at=func.now())
)

NEW = NotificationStatus.NEW  # the status a notification is written with


class NewNotification(Protocol):
    """A notification to write (shared.notifications.policy.NotificationRequest)."""

    @property
    def dedup_key(self) -> str: ...
    @property
    def case_id(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def party(self) -> str: ...
    @property
    def channel(self) -> str: ...
    @property
    def recipient(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def params(self) -> Mapping[str, Any]: ...
    @property
    def urgent(self) -> bool: ...


class NotificationHandover(Protocol):
    def add_new(self, notifications: Sequence[NewNotification]) -> int:
        """Write these `new` (a dedup key already stored is skipped); returns how many
        were offered."""

    def claim_for_notifier(self, limit: int, requeue_after_seconds: float
                           ) -> list[tuple[int, datetime]]:
        """Lock the rows to hand over now, at most `limit` in all (deferred until now,
        new, queued and lost): (id, created_at) each."""

    def mark_queued(self, rows: Sequence[tuple[int, datetime]]) -> None:
        """The rows `claim_for_notifier` returned, handed over."""


class SqlNotificationHandover:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add_new(self, notifications: Sequence[NewNotification]) -> int:
        if not notifications:
            return 0
        INSERT_NOTIFICATIONS.execute(self.session.connection(), [
            {"dedup_key": n.dedup_key, "case_id": n.case_id, "reason": n.reason,
             "party": n.party, "channel": n.channel, "recipient": n.recipient,
             "template": n.template, "params": dict(n.params), "urgent": n.urgent,
             "status": NEW}
            for n in notifications
        ])
        return len(notifications)

    def claim_for_notifier(self, limit: int, requeue_after_seconds: float
                           ) -> list[tuple[int, datetime]]:
        rows: list[tuple[int, datetime]] = []
        for claim in CLAIM_NOTIFICATIONS:
            left = limit - len(rows)
            if left <= 0:
                break
            rows += [(r.id, r.created_at) for r in self.session.execute(
                claim, {"limit": left, "after": requeue_after_seconds})]
        return rows

    def mark_queued(self, rows: Sequence[tuple[int, datetime]]) -> None:
        if rows:
            made = [created for _id, created in rows]
            self.session.execute(MARK_NOTIFICATIONS_QUEUED, {
                "ids": [i for i, _created in rows], "since": min(made), "until": max(made)})
