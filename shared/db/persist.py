"""Reading cases, and writing what applied domain outcomes change, in bulk.

`OutcomeWriter` is the single place where case changes turn into rows. A service applies
a batch of events (intake) or fired deadlines (resolver) to the cases in memory, adds each
applied `Outcome` to the writer, and `flush` writes them all with a handful of statements
inside the transaction that holds the case locks:
- the cases' final states (one upsert),
- for every case whose deadlines changed: its open deadlines cancelled and the new set
  inserted (the domain always gives the full set),
- the decisions, each with an outbox row for `aftersales.decisions` (a decision already
  stored, e.g. decided again after a crash, gets no second row),
- the notifications, written `new` (a dedup key already stored is not written again);
  the notifications table is the notifier's own outbox: the timer hands new rows over.
Statements are built once, with bound parameters (building them per call was most of the
resolver's CPU), and rows go as one array per column (`shared/db/bulk.py`), so a batch is
one execution per table (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import Table, any_, bindparam, select, text, update
from sqlalchemy.orm import Session

from shared.amqp import DECISIONS_EXCHANGE
from shared.db.bulk import bulk_insert
from shared.db.models import CaseRow, DeadlineRow, DecisionRow, NotificationRow, OutboxRow
from shared.domain import Case, DeadlineSpec, Decision, Notice, Outcome, decision_id

# decision ids are uuid5(DECISION_NAMESPACE, decision.key), made by the domain
from shared.domain.model import DECISION_NAMESPACE as DECISION_NAMESPACE

_CASES = cast(Table, CaseRow.__table__)
_DEADLINES = cast(Table, DeadlineRow.__table__)
_DECISIONS = cast(Table, DecisionRow.__table__)
_NOTIFICATIONS = cast(Table, NotificationRow.__table__)
_OUTBOX = cast(Table, OutboxRow.__table__)

_CASE_COLUMNS = [c.name for c in _CASES.c]
UPSERT_CASES = bulk_insert(
    _CASES, _CASE_COLUMNS,
    "ON CONFLICT (case_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _CASE_COLUMNS if c != "case_id"),
)
# `= ANY(:ids)` with one array parameter, not `IN (...)`: the SQL text is the same for
# every batch size, so psycopg parses it once (a new text per size was 16 % of intake's CPU).
LOAD_CASES = select(_CASES.c.snapshot).where(_CASES.c.case_id == any_(bindparam("ids")))
CANCEL_OPEN_DEADLINES = (
    update(_DEADLINES)
    .where(_DEADLINES.c.case_id == any_(bindparam("ids")))
    .where(_DEADLINES.c.status.in_(("pending", "dispatched")))
    .values(status="cancelled")
)
INSERT_DEADLINES = bulk_insert(_DEADLINES, [
    "case_id", "step", "purpose", "action", "party", "due_at", "deadline_at", "fence",
    "rule_set", "rule_version", "rule_id", "status", "calendar_source"])
INSERT_DECISIONS = bulk_insert(
    _DECISIONS, ["decision_id", "case_id", "type", "step", "decided_at", "body"],
    "ON CONFLICT DO NOTHING RETURNING decision_id")
# No RETURNING: the timer finds new notifications by status.
INSERT_NOTIFICATIONS = bulk_insert(_NOTIFICATIONS, [
    "dedup_key", "case_id", "reason", "party", "channel", "recipient", "template", "params",
    "urgent", "status"], "ON CONFLICT DO NOTHING")
INSERT_OUTBOX = bulk_insert(
    _OUTBOX, ["exchange", "routing_key", "message_id", "headers", "body"])
# Advisory locks in case-id order: every transaction takes them in the same order, so two
# workers can never wait on each other in a cycle. The subquery fixes the order.
LOCK_CASES = text(
    "SELECT pg_advisory_xact_lock(hashtextextended(c, 0)) "
    "FROM (SELECT DISTINCT unnest(CAST(:ids AS text[])) AS c ORDER BY c) AS ordered"
)

# Non-blocking: the cases whose lock this transaction got now (never waits, so the order
# does not matter). Intake uses it to leave a case another worker holds for its next batch.
TRY_LOCK_CASES = text(
    "SELECT c FROM unnest(CAST(:ids AS text[])) AS c "
    "WHERE pg_try_advisory_xact_lock(hashtextextended(c, 0))"
)


class NotificationExpander(Protocol):
    def expand(self, notice: Notice, contacts: Mapping[str, Any], ops_contacts: Any) -> list[Any]:
        ...


def decision_id_for(decision: Decision) -> str:
    return decision_id(decision.key)


def decision_message(decision: Decision, case: Case) -> dict[str, Any]:
    """The outbound decision, in the contract's format."""
    return {
        "decision_id": decision_id_for(decision),
        "type": decision.type,
        "case_id": case.case_id,
        "order_id": case.order_id,
        "shop_id": case.shop_id,
        "platform": case.platform,
        "kind": str(case.kind),
        "step": decision.step,
        "rule": {
            "set": decision.rule.set,
            "version": decision.rule.version,
            "id": decision.rule.id,
        },
        "due_at": decision.due_at.isoformat(),
        "decided_at": decision.decided_at.isoformat(),
        "data": dict(decision.data),
    }


def lock_cases(session: Session, case_ids: Iterable[str]) -> None:
    """Serialise every change of these cases across all workers and services, including
    their creation (a row lock cannot lock a row that does not exist yet). Held until
    the transaction ends."""
    ids = sorted(set(case_ids))
    if ids:
        session.execute(LOCK_CASES, {"ids": ids})


def try_lock_cases(session: Session, case_ids: Iterable[str]) -> set[str]:
    """Take the locks of these cases that are free now; returns the cases locked."""
    ids = sorted(set(case_ids))
    return set(session.execute(TRY_LOCK_CASES, {"ids": ids}).scalars()) if ids else set()


def load_cases(session: Session, case_ids: Iterable[str]) -> dict[str, Case]:
    ids = sorted(set(case_ids))
    if not ids:
        return {}
    rows = session.execute(LOAD_CASES, {"ids": ids}).scalars()
    return {snapshot["case_id"]: Case.from_dict(snapshot) for snapshot in rows}


def _case_row(case: Case, now: datetime) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "platform": case.platform,
        "shop_id": case.shop_id,
        "order_id": case.order_id,
        "kind": str(case.kind),
        "status": case.status,
        "step": case.step,
        "version": case.version,
        "rule_set": case.rule_set,
        "rule_version": case.rule_version,
        "step_due_at": case.step_due_at,
        "opened_at": case.opened_at,
        "closed_at": case.closed_at,
        "updated_at": now,
        "snapshot": case.to_dict(),
    }


def _deadline_row(d: DeadlineSpec) -> dict[str, Any]:
    return {
        "case_id": d.case_id,
        "step": d.step,
        "purpose": d.purpose,
        "action": d.action,
        "party": d.party,
        "due_at": d.due_at,
        "deadline_at": d.deadline_at,
        "fence": d.fence,
        "rule_set": d.rule.set,
        "rule_version": d.rule.version,
        "rule_id": d.rule.id,
        "status": "pending",
        "calendar_source": d.calendar.get("source") if d.calendar else None,
    }


@dataclass(frozen=True)
class StoredDecision:
    type: str
    case_id: str
    platform: str
    kind: str
    superseded_type: str | None = None  # for decision.superseded: the withdrawn one's type


@dataclass
class Stored:
    """What a flush wrote, for metrics after the commit."""

    decisions: list[StoredDecision] = field(default_factory=list)
    notifications: int = 0  # notification rows offered (a dedup key already stored is skipped)
    deadlines_set: int = 0


@dataclass
class OutcomeWriter:
    """Collects applied outcomes (in the order they were applied) and writes them in bulk."""

    policy: NotificationExpander
    ops_contacts: Any
    now: datetime
    _cases: dict[str, Case] = field(default_factory=dict)
    _deadlines: dict[str, Sequence[DeadlineSpec]] = field(default_factory=dict)
    _decisions: list[tuple[Decision, Case]] = field(default_factory=list)
    _notifications: dict[str, Any] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        case = outcome.case
        if case is None or not outcome.applied:
            raise ValueError("only an applied outcome with a case can be stored")
        self._cases[case.case_id] = case
        if outcome.deadlines is not None:
            self._deadlines[case.case_id] = outcome.deadlines  # the latest full set wins
        self._decisions.extend((d, case) for d in outcome.decisions)
        for notice in outcome.notices:
            for request in self.policy.expand(notice, case.contacts, self.ops_contacts):
                self._notifications.setdefault(request.dedup_key, request)

    def add_case(self, case: Case) -> None:
        """Store a case whose bookkeeping changed without an applied change (its deadlines,
        decisions and notifications stay as they are)."""
        self._cases[case.case_id] = case

    def __bool__(self) -> bool:
        return bool(self._cases)

    def flush(self, session: Session) -> Stored:
        stored = Stored()
        if not self._cases:
            return stored
        conn = session.connection()
        UPSERT_CASES.execute(conn, [_case_row(c, self.now) for c in self._cases.values()])
        if self._deadlines:
            conn.execute(CANCEL_OPEN_DEADLINES, {"ids": sorted(self._deadlines)})
            rows = [_deadline_row(d) for ds in self._deadlines.values() for d in ds]
            if rows:
                INSERT_DEADLINES.execute(conn, rows)
            stored.deadlines_set = len(rows)
        stored.decisions = self._flush_decisions(conn)
        stored.notifications = self._flush_notifications(conn)
        return stored

    def _flush_decisions(self, conn: Any) -> list[StoredDecision]:
        if not self._decisions:
            return []
        messages = {}
        for decision, case in self._decisions:
            message = decision_message(decision, case)
            messages[message["decision_id"]] = (decision, case, message)
        inserted = set(INSERT_DECISIONS.execute(conn, [
            {"decision_id": did, "case_id": case.case_id, "type": decision.type,
             "step": decision.step, "decided_at": decision.decided_at, "body": message}
            for did, (decision, case, message) in messages.items()
        ]).scalars())
        # Already decided (a redelivery): no second decision row, no second publish.
        fresh = [(did, *messages[did]) for did in messages if did in inserted]
        if fresh:
            INSERT_OUTBOX.execute(conn, [
                {"exchange": DECISIONS_EXCHANGE, "routing_key": decision.type,
                 "message_id": did, "headers": {},
                 "body": json.dumps(message, ensure_ascii=False).encode()}
                for did, decision, _case, message in fresh
            ])
        return [StoredDecision(d.type, c.case_id, c.platform, str(c.kind),
                               d.data.get("superseded_type"))
                for _did, d, c, _m in fresh]

    def _flush_notifications(self, conn: Any) -> int:
        if not self._notifications:
            return 0
        INSERT_NOTIFICATIONS.execute(conn, [
            {"dedup_key": r.dedup_key, "case_id": r.case_id, "reason": r.reason,
             "party": r.party, "channel": r.channel, "recipient": r.recipient,
             "template": r.template, "params": dict(r.params), "urgent": r.urgent,
             "status": "new"}
            for r in self._notifications.values()
        ])
        return len(self._notifications)
