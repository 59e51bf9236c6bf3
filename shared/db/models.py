"""The tables. Alembic migrations in `shared/db/migrations` must agree with these
(`tests/integration/test_migrations.py` compares them).

Deadline, decision, notification and outbox rows are written in the same transaction as
the case change that causes them: that is what makes a crash anywhere safe.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSONB,
        datetime: DateTime(timezone=True),
    }


class CaseRow(Base):
    """One after-sales case. `snapshot` is the domain's `Case.to_dict()`; the other
    columns repeat what queries and dashboards filter on."""

    __tablename__ = "cases"

    case_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    shop_id: Mapped[str] = mapped_column(String(128))
    order_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    rule_set: Mapped[str] = mapped_column(String(64))
    rule_version: Mapped[str] = mapped_column(String(32))
    step_due_at: Mapped[datetime | None]
    opened_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    snapshot: Mapped[dict[str, Any]]
    # No row about this case in the partitioned tables (its events, decisions,
    # notifications) has a partition key earlier than this, so its reads prune the months
    # before (migration 0023). Set once, when the case row is created: the default is that
    # transaction's `now()`, lowered by intake to the earliest row written before the case
    # existed (parked, expired, error). Never written by an update. NULL for cases from
    # before 0023: their reads probe every month.
    records_since: Mapped[datetime | None] = mapped_column(server_default=func.now())

    __table_args__ = (
        Index("ix_cases_order_id", "order_id"),
        Index("ix_cases_open_kind_step", "kind", "step", postgresql_where=text("status = 'open'")),
        Index("ix_cases_open_opened_at", "opened_at", postgresql_where=text("status = 'open'")),
        # Retention walks closed cases past their time in closing order (keyset).
        Index("ix_cases_closed_at", "closed_at", "case_id",
              postgresql_where=text("status <> 'open'")),
    )


# The outcomes of the rows about a case written before it existed (parked, then perhaps
# expired; an event that hit a bug), which `ix_case_events_unapplied` holds.
UNAPPLIED_OUTCOMES = ("parked", "expired", "error")


class CaseEventRow(Base):
    """Every accepted inbound event: the case's event log. Partitioned by month of
    `received_at` (shared/db/partitions.py). `event_id` is the dedup: it is claimed in
    `event_ids` by the statement that inserts the row, and a second insert of the same id
    changes nothing."""

    __tablename__ = "case_events"

    event_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    case_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime]
    # Partition key, in the primary key as PostgreSQL requires; the ORM's identity stays
    # `event_id` alone (unique through `event_ids`).
    received_at: Mapped[datetime] = mapped_column(server_default=func.now(),
                                                  primary_key=True)
    # applied | out_of_state | parked (waiting for its case.opened)
    outcome: Mapped[str] = mapped_column(String(16))
    problem: Mapped[str | None] = mapped_column(Text)
    case_version: Mapped[int | None] = mapped_column(Integer)
    body: Mapped[dict[str, Any]]
    # SHA-256 of the normalised body (shared.schemas.events.content_hash): the same
    # event_id with other content is a conflict, not a duplicate. Null for rows from
    # before it was kept.
    body_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Set by retention on an event kept only for dedup (outcome `retired`, body emptied)
    # when the dedup window outlasts the retention: the id is forgotten after this.
    forget_after: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_case_events_case_id", "case_id", "occurred_at"),
        Index(
            "ix_case_events_parked", "case_id", postgresql_where=text("outcome = 'parked'")
        ),
        # The rows about a case written before it existed: intake reads them when it
        # creates the case (`cases.records_since`).
        Index("ix_case_events_unapplied", "case_id", postgresql_where=text(
            f"outcome IN ({', '.join(repr(o) for o in UNAPPLIED_OUTCOMES)})")),
        Index("ix_case_events_forget_after", "forget_after",
              postgresql_where=text("forget_after IS NOT NULL")),
        {"postgresql_partition_by": "RANGE (received_at)"},
    )
    __mapper_args__ = {"primary_key": [event_id]}  # noqa: RUF012 (SQLAlchemy reads it)


class EventIdRow(Base):
    """Every `event_id` in `case_events`, whatever its month: what keeps it unique across
    partitions. Claimed by intake's insert statement (`bulk_insert_claiming`), released
    by a trigger when the event row is deleted: a row here exactly while its event row is
    in `case_events`."""

    __tablename__ = "event_ids"

    event_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    # The row's `body_sha256`, so intake's duplicate check is one index probe here rather
    # than one per month in `case_events`.
    body_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class DecisionIdRow(Base):
    """Every `decision_id` in `decisions` (as `event_ids` for events)."""

    __tablename__ = "decision_ids"

    decision_id: Mapped[str] = mapped_column(String(64), primary_key=True)


class NotificationKeyRow(Base):
    """Every `dedup_key` in `notifications` (as `event_ids` for events)."""

    __tablename__ = "notification_keys"

    dedup_key: Mapped[str] = mapped_column(String(128), primary_key=True)


class EventConflictRow(Base):
    """An event whose event_id was already in the case log with other content: kept for
    ops to sort out, never applied over the first (`aftersales_event_conflicts`)."""

    __tablename__ = "case_event_conflicts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(256), index=True)
    case_id: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    body: Mapped[dict[str, Any]]
    body_sha256: Mapped[str] = mapped_column(String(64))
    first_sha256: Mapped[str] = mapped_column(String(64))


class DeadlineRow(Base):
    """A deadline or a reminder. Status: pending -> dispatched -> fired | stale; deleted
    when the case moves on and no longer wants it (`cancelled`: rows from before then).
    `fence` is the case version it was computed for, checked again when it fires. Not
    partitioned (shared/db/partitions.py says why): retention removes a finished case's
    rows with it."""

    __tablename__ = "deadlines"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(String(128))
    step: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))
    party: Mapped[str] = mapped_column(String(16))
    due_at: Mapped[datetime]
    deadline_at: Mapped[datetime]
    fence: Mapped[int] = mapped_column(Integer)
    rule_set: Mapped[str] = mapped_column(String(64))
    rule_version: Mapped[str] = mapped_column(String(32))
    rule_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    dispatched_at: Mapped[datetime | None]
    dispatch_count: Mapped[int] = mapped_column(Integer, server_default="0")
    fired_at: Mapped[datetime | None]
    result: Mapped[str | None] = mapped_column(Text)
    # working-day deadlines: library | file | estimated (recomputed when official data
    # arrives, shared/domain/recompute.py); NULL for fixed durations
    calendar_source: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        # The timer's hot query: pending rows by due time. Partial, so it stays small.
        Index("ix_deadlines_pending_due", "due_at", postgresql_where=text("status = 'pending'")),
        Index(
            "ix_deadlines_dispatched",
            "dispatched_at",
            postgresql_where=text("status = 'dispatched'"),
        ),
        Index(
            "ix_deadlines_open_case",
            "case_id",
            postgresql_where=text("status IN ('pending', 'dispatched')"),
        ),
        Index(
            "ix_deadlines_pending_estimated",
            "case_id",
            postgresql_where=text("status = 'pending' AND calendar_source = 'estimated'"),
        ),
        # Retention removes a closed case's finished deadlines by case.
        Index("ix_deadlines_case_id", "case_id"),
    )


class CaseNoteRow(Base):
    """Something that happened to a case that is not an inbound event nor a decision, for
    its timeline (`aftersales case show`): e.g. a deadline recomputed when official holiday
    data replaced an estimate (`type` = "calendar.recomputed")."""

    __tablename__ = "case_notes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    type: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]]

    __table_args__ = (Index("ix_case_notes_case_id", "case_id", "at"),)


class DecisionRow(Base):
    """An automatic decision (or reminder) taken for a case: exactly one per missed
    deadline, because `decision_id` is derived from the deadline's stable key (claimed in
    `decision_ids` by the statement that inserts it). Partitioned by month of `decided_at`."""

    __tablename__ = "decisions"

    decision_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    case_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(64))
    step: Mapped[str] = mapped_column(String(64))
    decided_at: Mapped[datetime] = mapped_column(primary_key=True)
    body: Mapped[dict[str, Any]]

    __table_args__ = (Index("ix_decisions_case_id", "case_id", "decided_at"),
                      {"postgresql_partition_by": "RANGE (decided_at)"})
    __mapper_args__ = {"primary_key": [decision_id]}  # noqa: RUF012 (SQLAlchemy reads it)


class NotificationRow(Base):
    """One message to one recipient over one channel. `dedup_key` is recorded before
    sending and passed to the provider, so nothing is sent twice for the same reason.
    The table is also the notifier's outbox: rows are written `new` with the case change
    that caused them; the timer hands them to the notifier (`queued`, `queued_at`).
    Status: new -> queued -> sending -> sent | failed; deferred (quiet hours, rate limit,
    retry later) -> queued again at `send_after` (shared.db.notifications). Partitioned by
    month of `created_at`; `dedup_key` is claimed in `notification_keys` by the statement
    that inserts it (unique across months)."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    dedup_key: Mapped[str] = mapped_column(String(128))
    case_id: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(64))
    party: Mapped[str] = mapped_column(String(16))
    channel: Mapped[str] = mapped_column(String(16))
    recipient: Mapped[str] = mapped_column(String(256))
    template: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]]
    urgent: Mapped[bool] = mapped_column(Boolean, server_default="false")
    status: Mapped[str] = mapped_column(String(16), server_default="new")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    send_after: Mapped[datetime | None]
    queued_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    provider_id: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), primary_key=True)
    sent_at: Mapped[datetime | None]
    # The notifier's claim on a `sending` row, and when that claim handed it to a provider
    # (a dead worker's row without it was never sent and is claimed again).
    claim_token: Mapped[str | None] = mapped_column(String(64))
    handed_over_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_notifications_case_id", "case_id"),
        Index(
            "ix_notifications_deferred",
            "send_after",
            postgresql_where=text("status = 'deferred'"),
        ),
        Index("ix_notifications_new", "id", postgresql_where=text("status = 'new'")),
        Index("ix_notifications_queued", "queued_at", postgresql_where=text("status = 'queued'")),
        # What `queued` was called before migration 0002: only rows from then (0022).
        Index("ix_notifications_pending", "id", postgresql_where=text("status = 'pending'")),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )
    __mapper_args__ = {"primary_key": [id]}  # noqa: RUF012 (SQLAlchemy reads it)


class OutboxRow(Base):
    """A message to publish to RabbitMQ, written in the transaction that decided it and
    published afterwards with publisher confirms (transactional outbox). A row is deleted
    in the transaction that saw it confirmed, so the table holds only what is unpublished
    (the decisions themselves are kept in `decisions`)."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    exchange: Mapped[str] = mapped_column(String(128))
    routing_key: Mapped[str] = mapped_column(String(128))
    message_id: Mapped[str] = mapped_column(String(128))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
