"""`aftersales case show`: a case, its timeline and its pending deadlines, in the terminal."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from services.ops.caseview import case_document
from shared.config import Settings
from shared.db.session import Database, make_engine
from shared.domain.timeutil import CHINA_TZ


def _local(value: datetime | None) -> str:
    return value.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S %z") if value else "-"


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
    sql_engine = make_engine(settings.database_url, pool_size=1)
    try:
        doc = case_document(Database(sql_engine), case_id)
    finally:
        sql_engine.dispose()
    if doc is None:
        print(f"no case {case_id}")
        return 1
    print(json.dumps(doc, ensure_ascii=False, indent=2) if as_json else render_text(doc))
    return 0
