"""`aftersales case show`: a case, its timeline and its pending deadlines."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from shared.config import Settings
from shared.db.queries.case_view import load_case_history
from shared.db.session import Database, make_engine
from shared.domain.calendar import deadline_calendar
from shared.notifications.masking import mask_address, mask_text

LOCAL = ZoneInfo("Asia/Shanghai")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _local(value: datetime | None) -> str:
    return value.astimezone(LOCAL).strftime("%Y-%m-%d %H:%M:%S %z") if value else "-"


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


def render_text(doc: dict[str, Any]) -> str:
    lines = []
    case = doc["case"]
    if case is None:
        lines.append("case: not opened yet (events are parked until case.opened arrives)")
    else:
        lines += [
            f"case {case['case_id']}  [{case['status']}]  {case['platform']} / {case['kind']}",
            f"  shop {case['shop_id']}  order {case['order_id']}",
            f"  step {case['step']}  (version {case['version']}, rules "
            f"{case['rule']['set']} {case['rule']['version']})",
            f"  step due {_local(_dt(case['step_due_at']))}" + _calendar_text(case["calendar"]),
            f"  opened {_local(_dt(case['opened_at']))}   closed {_local(_dt(case['closed_at']))}"
            + (f"   resolution {case['resolution']}" if case["resolution"] else ""),
        ]
        if case.get("outside_window"):
            flag = case["outside_window"]
            lines.append(f"  FLAG: requested outside the {flag['window']} after-sales window "
                         f"(purchased {_local(_dt(flag['purchased_at']))})")
    lines.append("")
    lines.append("timeline (Asia/Shanghai):")
    for item in doc["timeline"]:
        when = _local(_dt(item["at"]))
        if item["what"] == "event":
            extra = f"  [{item['outcome']}]" + (f" {item['problem']}" if item["problem"] else "")
            if item.get("source") == "ops":
                extra += f"  ops, by {item['by']}: {item['reason']}"
            lines.append(f"  {when}  event        {item['type']}{extra}")
        elif item["what"] == "decision":
            rule = item["rule"] or {}
            lines.append(
                f"  {when}  decision     {item['type']}  step {item['step']}  rule "
                f"{rule.get('set')}/{rule.get('version')}/{rule.get('id')}"
            )
        elif item["what"] == "note":
            lines.append(f"  {when}  note         {item['type']}  {_note_text(item['data'])}")
        else:
            lines.append(
                f"  {when}  notification {item['type']} -> {item['party']} by {item['channel']}"
                f" {item['recipient']}  [{item['status']}]"
                + (f" {item['error']}" if item["error"] else "")
            )
    lines.append("")
    lines.append("pending deadlines:")
    if not doc["pending_deadlines"]:
        lines.append("  (none)")
    for d in doc["pending_deadlines"]:
        lines.append(
            f"  {d['due_at']}  ({_local(_dt(d['due_at']))})  {d['purpose']:<8} step {d['step']}"
            f"  -> {d['action']}  ({d['party']})"
            + ("  [estimated calendar]" if d["calendar_source"] == "estimated" else "")
        )
    return "\n".join(lines)


def _calendar_text(calendar: dict[str, Any] | None) -> str:
    if not calendar:
        return ""
    if calendar.get("estimated"):
        years = ", ".join(str(y) for y in calendar.get("estimated_years", []))
        return (f"  (working days ESTIMATED: no official holiday schedule for {years} yet; "
                "recomputed when it arrives)")
    return f"  (working days from the {calendar.get('source')} calendar)"


def _note_text(data: dict[str, Any]) -> str:
    if "old_due_at" in data:
        return (f"step {data.get('step')}: deadline {_local(_dt(data['old_due_at']))} -> "
                f"{_local(_dt(data.get('new_due_at')))} ({data.get('reason', '')})")
    return json.dumps(data, ensure_ascii=False)


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def show_case(settings: Settings, case_id: str, as_json: bool) -> int:
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        doc = case_document(Database(engine), case_id)
    finally:
        engine.dispose()
    if doc is None:
        print(f"no case {case_id}")
        return 1
    print(json.dumps(doc, ensure_ascii=False, indent=2) if as_json else render_text(doc))
    return 0
