"""Outbound decision schema, version 1 (what `aftersales.decisions` carries).

`decision_message` builds the message (the resolver and intake store it in the outbox
with the decision); `DecisionV1` is its documented, published shape (and a test checks
the two agree)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from shared.domain import Case, Decision, decision_id

DECISION_TYPES = (
    "decision.auto_approved",
    "decision.auto_closed",
    "decision.auto_refunded",
    "decision.auto_confirmed",
    "decision.escalated",
    "decision.visit_required",
    "decision.deemed_received",
    "decision.superseded",
    "reminder.due_soon",
)


class RuleRefV1(BaseModel):
    set: str
    version: str
    id: str


class DecisionV1(BaseModel):
    """An automatic decision, a reminder, or (`decision.superseded`) the withdrawal of a
    published decision that late facts contradict: then `data.supersedes` is the
    withdrawn `decision_id`, `data.superseded_type` its type, `data.reason` why and
    `data.late_facts` the late events (docs/asyncapi.yaml)."""

    model_config = ConfigDict(extra="forbid")

    decision_id: str
    type: Literal[DECISION_TYPES]  # type: ignore[valid-type]
    case_id: str
    order_id: str
    shop_id: str
    platform: str
    kind: str
    step: str
    rule: RuleRefV1
    due_at: AwareDatetime
    decided_at: AwareDatetime
    data: dict[str, Any]


def decision_message(decision: Decision, case: Case) -> dict[str, Any]:
    """The outbound decision, in the contract's format."""
    return {
        "decision_id": decision_id(decision.key),
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
