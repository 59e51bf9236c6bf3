"""Reading and writing cases, and storing a domain `Outcome` in one transaction.

`store_outcome` is the single place where a case change turns into rows: the case, its
new deadlines (the old ones cancelled), its decisions with their outbox rows, and its
notifications with the outbox rows that hand them to the notifier. Intake and resolver
both call it inside the transaction that holds the case lock.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import dramatiq
from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared.amqp import (
    DECISIONS_EXCHANGE,
    NOTIFIER_QUEUE,
    SEND_NOTIFICATION_ACTOR,
)
from shared.db.models import CaseRow, DeadlineRow, DecisionRow, NotificationRow, OutboxRow
from shared.domain import Case, Decision, Notice, Outcome

# decision_id = uuid5(namespace, decision.key): the same missed deadline always gives the
# same id, however often it is decided again after a crash.
DECISION_NAMESPACE = uuid.UUID("6f0c7a52-3c2e-4b8e-9a51-5f1b0d3c9e21")


class NotificationExpander(Protocol):
    def expand(self, notice: Notice, contacts: Mapping[str, Any], ops_contacts: Any) -> list[Any]:
        ...


@dataclass
class Stored:
    """What a stored outcome produced, for metrics after the commit."""

    decision_types: list[str] = field(default_factory=list)
    notification_ids: list[int] = field(default_factory=list)
    deadlines_set: int = 0


def decision_id_for(decision: Decision) -> str:
    return str(uuid.uuid5(DECISION_NAMESPACE, decision.key))


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


def load_case(session: Session, case_id: str) -> Case | None:
    snapshot = session.execute(
        select(CaseRow.snapshot).where(CaseRow.case_id == case_id)
    ).scalar_one_or_none()
    return None if snapshot is None else Case.from_dict(snapshot)


def _case_values(case: Case) -> dict[str, Any]:
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
        "snapshot": case.to_dict(),
    }


def save_case(session: Session, case: Case, now: datetime) -> None:
    values = _case_values(case)
    stmt = pg_insert(CaseRow).values(**values, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[CaseRow.case_id],
        set_={k: stmt.excluded[k] for k in [*values, "updated_at"] if k != "case_id"},
    )
    session.execute(stmt)


def replace_deadlines(session: Session, case: Case, deadlines: Sequence[Any]) -> int:
    session.execute(
        update(DeadlineRow)
        .where(DeadlineRow.case_id == case.case_id)
        .where(DeadlineRow.status.in_(("pending", "dispatched")))
        .values(status="cancelled")
    )
    if not deadlines:
        return 0
    session.execute(
        insert(DeadlineRow),
        [
            {
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
            }
            for d in deadlines
        ],
    )
    return len(deadlines)


def notifier_message(notification_id: int) -> bytes:
    """A Dramatiq message for the notifier's actor, published later from the outbox."""
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=NOTIFIER_QUEUE,
        actor_name=SEND_NOTIFICATION_ACTOR,
        args=(notification_id,),
        kwargs={},
        options={},
    )
    return message.encode()


def enqueue_notification(session: Session, notification_id: int) -> None:
    session.execute(
        insert(OutboxRow).values(
            exchange="",
            routing_key=NOTIFIER_QUEUE,
            message_id=f"notification-{notification_id}",
            body=notifier_message(notification_id),
            headers={},
        )
    )


def store_decisions(session: Session, case: Case, decisions: Iterable[Decision]) -> list[str]:
    stored = []
    for decision in decisions:
        message = decision_message(decision, case)
        inserted = session.execute(
            pg_insert(DecisionRow)
            .values(
                decision_id=message["decision_id"],
                case_id=case.case_id,
                type=decision.type,
                step=decision.step,
                decided_at=decision.decided_at,
                body=message,
            )
            .on_conflict_do_nothing(index_elements=[DecisionRow.decision_id])
            .returning(DecisionRow.decision_id)
        ).scalar_one_or_none()
        if inserted is None:
            continue  # already decided (a redelivery): no second decision, no second publish
        session.execute(
            insert(OutboxRow).values(
                exchange=DECISIONS_EXCHANGE,
                routing_key=decision.type,
                message_id=message["decision_id"],
                body=json.dumps(message, ensure_ascii=False).encode(),
                headers={},
            )
        )
        stored.append(decision.type)
    return stored


def store_notices(
    session: Session,
    case: Case,
    notices: Iterable[Notice],
    policy: NotificationExpander,
    ops_contacts: Any,
) -> list[int]:
    ids = []
    for notice in notices:
        for req in policy.expand(notice, case.contacts, ops_contacts):
            new_id = session.execute(
                pg_insert(NotificationRow)
                .values(
                    dedup_key=req.dedup_key,
                    case_id=req.case_id,
                    reason=req.reason,
                    party=req.party,
                    channel=req.channel,
                    recipient=req.recipient,
                    template=req.template,
                    params=dict(req.params),
                    urgent=req.urgent,
                    status="pending",
                )
                .on_conflict_do_nothing(index_elements=[NotificationRow.dedup_key])
                .returning(NotificationRow.id)
            ).scalar_one_or_none()
            if new_id is not None:
                enqueue_notification(session, new_id)
                ids.append(new_id)
    return ids


def store_outcome(
    session: Session,
    outcome: Outcome,
    *,
    now: datetime,
    policy: NotificationExpander,
    ops_contacts: Any,
) -> Stored:
    """Write everything an applied outcome changes. The caller holds the case lock."""
    case = outcome.case
    if case is None or not outcome.applied:
        raise ValueError("only an applied outcome with a case can be stored")
    stored = Stored()
    save_case(session, case, now)
    if outcome.deadlines is not None:
        stored.deadlines_set = replace_deadlines(session, case, outcome.deadlines)
    stored.decision_types = store_decisions(session, case, outcome.decisions)
    stored.notification_ids = store_notices(session, case, outcome.notices, policy, ops_contacts)
    return stored
