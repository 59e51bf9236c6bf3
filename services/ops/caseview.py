"""A case, its timeline and its pending deadlines, as data: what `aftersales case show` prints
and the console's case page shows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shared.db.queries.case_view import load_case_history
from shared.db.session import Database
from shared.domain.calendar import deadline_calendar
from shared.notifications.masking import mask_address, mask_text


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def case_document(db: Database, case_id: str) -> dict[str, Any] | None:
    """Everything `case show` prints, as JSON-safe data (times in RFC 3339, UTC)."""
    history = load_case_history(db, case_id)
    if history is None:
        return None
    case, events, decisions = history.case, history.events, history.decisions
    notifications, deadlines, notes = history.notifications, history.deadlines, history.notes
    timeline: list[dict[str, Any]] = []
    for e in events:
        timeline.append({
            "at": _iso(e.received_at), "what": "event", "type": e.type, "event_id": e.event_id,
            "occurred_at": _iso(e.occurred_at), "outcome": e.outcome, "problem": e.problem,
            **_ops_fields(e.body),
        })
    for d in decisions:
        timeline.append({
            "at": _iso(d.decided_at), "what": "decision", "type": d.type,
            "decision_id": d.decision_id, "step": d.step, "rule": d.body.get("rule"),
            "data": d.body.get("data"),
        })
    for n in notifications:
        timeline.append({
            "at": _iso(n.sent_at or n.created_at), "what": "notification", "type": n.reason,
            "party": n.party, "channel": n.channel,
            "recipient": mask_address(n.recipient, n.channel), "status": n.status,
            "attempts": n.attempts, "error": mask_text(n.last_error) if n.last_error else None,
        })
    for note in notes:
        timeline.append({"at": _iso(note.at), "what": "note", "type": note.type,
                         "data": note.body})
    timeline.sort(key=lambda item: item["at"] or "")
    return {
        "case": None if case is None else {
            "case_id": case.case_id, "platform": case.platform, "shop_id": case.shop_id,
            "order_id": case.order_id, "kind": case.kind, "status": case.status,
            "step": case.step, "version": case.version,
            "rule": {"set": case.rule_set, "version": case.rule_version},
            "step_due_at": _iso(case.step_due_at), "opened_at": _iso(case.opened_at),
            "closed_at": _iso(case.closed_at),
            "resolution": case.snapshot.get("resolution"),
            "amount_fen": case.snapshot.get("amount_fen"),
            "refund_fen": case.snapshot.get("refund_fen"),
            "calendar": deadline_calendar(case.snapshot.get("data") or {}),
            "outside_window": (case.snapshot.get("data") or {}).get("outside_window"),
        },
        "timeline": timeline,
        "pending_deadlines": [
            {"step": d.step, "purpose": d.purpose, "due_at": _iso(d.due_at),
             "deadline_at": _iso(d.deadline_at), "action": d.action, "party": d.party,
             "rule": {"set": d.rule_set, "version": d.rule_version, "id": d.rule_id},
             "calendar_source": d.calendar_source}
            for d in deadlines
        ],
    }


def _ops_fields(body: dict[str, Any] | None) -> dict[str, Any]:
    """Who did an ops action and why (services/ops/actions.py), for the timeline."""
    data = (body or {}).get("data")
    if not isinstance(data, dict) or data.get("source") != "ops":
        return {}
    return {"source": "ops", "by": data.get("by"), "reason": data.get("reason")}
