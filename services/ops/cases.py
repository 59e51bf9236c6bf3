"""Reading cases for ops: search, and why each deadline and automatic decision is what it is.

The command line (`aftersales case search|explain`) and the web console both read through
these functions and `services.ops.caseview.case_document`; nothing else queries cases for ops.
Times are decided by the database clock (`now()`), never the host's.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import chinese_calendar

from shared.db.models import CaseEventRow, CaseRow, DecisionRow
from shared.db.queries.case_view import database_now, load_case_record
from shared.db.queries.ops import CaseFilter, find_cases
from shared.db.session import Database
from shared.domain import Engine
from shared.domain.durations import Duration
from shared.domain.model import RuleRef
from shared.domain.rules import STEP_START, Rule
from shared.domain.timeutil import CHINA_TZ, as_utc

PAUSING_EVENTS = {"intervention.requested"}
RESUMING_EVENTS = {"intervention.resolved"}
ESCALATION = "decision.escalated"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def db_now(db: Database) -> datetime:
    return as_utc(database_now(db))


# ---- search ---------------------------------------------------------------------------


def search_cases(db: Database, flt: CaseFilter) -> list[dict[str, Any]]:
    rows = find_cases(db, flt)
    return [{
        "case_id": c.case_id, "platform": c.platform, "shop_id": c.shop_id,
        "order_id": c.order_id, "kind": c.kind, "status": c.status, "step": c.step,
        "step_due_at": _iso(c.step_due_at), "overdue": bool(late) and c.status == "open",
        "opened_at": _iso(c.opened_at), "closed_at": _iso(c.closed_at),
        "resolution": c.snapshot.get("resolution"),
    } for c, late in rows]


# ---- explain --------------------------------------------------------------------------


def calendar_days(engine: Engine, start: datetime, end: datetime) -> dict[str, Any]:
    """How working days were counted between two moments (Asia/Shanghai dates): the
    days skipped and the make-up workdays, and where each answer came from."""
    calendar = engine.calendar
    first = as_utc(start).astimezone(CHINA_TZ).date() + timedelta(days=1)
    last = as_utc(end).astimezone(CHINA_TZ).date()
    days_off: list[dict[str, Any]] = []
    makeup: list[dict[str, Any]] = []
    sources: set[str] = set()
    day = first
    while day <= last:
        source = _day_source(engine, day)
        sources.add(source)
        try:
            workday = calendar.is_workday(day)
        except Exception:  # a year no data covers: say so instead of failing the page
            days_off.append({"date": day.isoformat(), "why": "no calendar data"})
            day += timedelta(days=1)
            continue
        weekend = day.weekday() >= 5
        if not workday:
            days_off.append({"date": day.isoformat(),
                             "why": "weekend" if weekend else _holiday_name(day),
                             "source": source})
        elif weekend:
            makeup.append({"date": day.isoformat(), "why": "make-up workday (调休)",
                           "source": source})
        day += timedelta(days=1)
    covered = calendar.covered_until()
    return {"days_off": days_off, "makeup_workdays": makeup, "sources": sorted(sources),
            "holiday_file": str(calendar.holiday_file) if calendar.holiday_file else None,
            "covered_until": covered.isoformat(), "beyond_known_data": last > covered}


def _day_source(engine: Engine, day: date) -> str:
    """library (chinesecalendar) | file (AFTERSALES_HOLIDAYS) | estimated"""
    return str(engine.calendar.year_source(day.year))


def _holiday_name(day: date) -> str:
    try:
        _on_holiday, name = chinese_calendar.get_holiday_detail(day)
    except NotImplementedError:
        return "holiday (holiday file)"
    return f"holiday: {name}" if name else "holiday"


def _duration(rule: Rule | None) -> dict[str, Any] | None:
    if rule is None:
        return None
    return {"text": rule.duration.text, "counted": rule.duration.describe(),
            "working_days": rule.duration.unit == "wd", "anchor": rule.anchor,
            "reminders": [r.text for r in rule.reminders], "note": rule.note or None,
            "on_timeout": rule.on_timeout}


def _pauses(events: list[CaseEventRow], decisions: list[DecisionRow]) -> list[dict[str, Any]]:
    """Every time the case's clock stopped (an intervention, asked for or after an
    escalation) and when it went on, with who and why when ops did it."""
    marks: list[tuple[datetime, str, dict[str, Any]]] = []
    for e in events:
        if e.outcome != "applied":
            continue
        if e.type in PAUSING_EVENTS or e.type in RESUMING_EVENTS:
            marks.append((as_utc(e.occurred_at), e.type, e.body or {}))
    for d in decisions:
        if d.type == ESCALATION:
            due = d.body.get("due_at")
            marks.append((as_utc(datetime.fromisoformat(due)) if due else as_utc(d.decided_at),
                          ESCALATION, {}))
    marks.sort(key=lambda m: m[0])
    pauses: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for at, kind, body in marks:
        data = body.get("data") or {}
        if kind in PAUSING_EVENTS or kind == ESCALATION:
            if current is None:
                current = {"from": at, "cause": "escalation" if kind == ESCALATION
                           else "intervention", "by": data.get("by"),
                           "source": data.get("source"), "reason": data.get("reason"),
                           "restart_clock": kind == ESCALATION}
        elif current is not None:
            current.update({"to": at, "outcome": data.get("outcome"),
                            "resumed_by": data.get("by"), "resume_reason": data.get("reason")})
            pauses.append(current)
            current = None
    if current is not None:
        pauses.append({**current, "to": None})
    out = []
    for p in pauses:
        end = p["to"]
        out.append({**p, "from": _iso(p["from"]), "to": _iso(end),
                    "seconds": None if end is None else int((end - p["from"]).total_seconds())})
    return out


def _deadline_source(case: CaseRow | None, events: list[CaseEventRow]) -> str:
    if case is None or (case.snapshot.get("data") or {}).get("deadline_source") != "platform":
        return "rule"
    changed = [e for e in events if e.type == "deadline.changed" and e.outcome == "applied"]
    if changed and ((changed[-1].body or {}).get("data") or {}).get("source") == "ops":
        return "ops"  # a goodwill extension (aftersales case extend)
    return "platform"


def _estimated(row: Any = None, *docs: Any) -> bool | None:
    """Whether a deadline was computed on an estimated calendar, where the deployment
    records it: the deadline's `calendar_source`, a `calendar` record
    ({"source": "estimated", "estimated": true}), or any field whose name says
    "estimated". None: not recorded (the calendar's sources are shown)."""
    found: bool | None = None
    source = getattr(row, "calendar_source", None)
    if source is not None:
        found = source == "estimated"
    for doc in docs:
        record = doc.get("calendar") if isinstance(doc, dict) else None
        if isinstance(record, dict) and record.get("source") is not None:
            found = bool(found) or record.get("source") == "estimated"
    table = getattr(row, "__table__", None)
    for column in getattr(table, "columns", ()):
        if "estimated" in column.name:
            value = getattr(row, column.key, None)
            if value is not None:
                found = bool(found) or bool(value)
    for doc in docs:
        if isinstance(doc, dict):
            for key, value in doc.items():
                if "estimated" in str(key) and isinstance(value, bool | int):
                    found = bool(found) or bool(value)
    return found


def explain_case(db: Database, engine: Engine, case_id: str) -> dict[str, Any] | None:
    """Why each pending deadline and each past automatic decision of the case is what it
    is. None if the case does not exist."""
    record = load_case_record(db, case_id)
    if record is None:
        return None
    now, case, events = as_utc(record.now), record.case, record.events
    decisions, pending = record.decisions, record.pending
    snapshot = case.snapshot
    data = snapshot.get("data") or {}
    step_started = datetime.fromisoformat(snapshot["step_started_at"]) \
        if snapshot.get("step_started_at") else None
    pauses = _pauses(events, decisions)
    source = _deadline_source(case, events)
    deadlines = []
    for d in pending:
        rule = engine.rules.get(RuleRef(d.rule_set, d.rule_version, d.rule_id))
        item: dict[str, Any] = {
            "purpose": d.purpose, "step": d.step, "due_at": _iso(d.due_at),
            "deadline_at": _iso(d.deadline_at), "action": d.action, "party": d.party,
            "status": d.status, "overdue": as_utc(d.due_at) < now,
            "rule": {"set": d.rule_set, "version": d.rule_version, "id": d.rule_id,
                     "known": rule is not None},
            "duration": _duration(rule),
            "step_started_at": _iso(step_started),
            "deadline_source": source,
            "calendar_source": getattr(d, "calendar_source", None),
            "calendar_estimated": _estimated(d, data),
        }
        if rule is not None and step_started is not None and d.purpose == "deadline":
            anchor = step_started
            if rule.anchor != STEP_START and data.get(rule.anchor):
                anchor = datetime.fromisoformat(str(data[rule.anchor]))
            item["anchor_at"] = _iso(anchor)
            try:
                by_rule = rule.duration.add_to(anchor, engine.calendar)
            except Exception as exc:  # a year without calendar data
                item["rule_due_at"] = None
                item["rule_due_problem"] = str(exc)
            else:
                item["rule_due_at"] = _iso(by_rule)
                shift = int((as_utc(d.deadline_at) - by_rule).total_seconds())
                item["shifted_seconds"] = shift  # by pauses, or an override
                if rule.duration.unit == "wd":
                    item["calendar"] = calendar_days(engine, anchor, by_rule)
            if source != "rule":
                item["override"] = {"by": source, "due_at": _iso(d.deadline_at),
                                    "rule_would_give": item.get("rule_due_at")}
        item["pauses_in_step"] = [p for p in pauses if step_started is None or
                                  (p["to"] or "9999") >= step_started.isoformat()]
        deadlines.append(item)
    past = []
    for dec in decisions:
        ref = dec.body.get("rule") or {}
        rule = engine.rules.get(RuleRef(ref.get("set", ""), ref.get("version", ""),
                                        ref.get("id", ""))) if ref else None
        due = dec.body.get("due_at")
        decided = as_utc(dec.decided_at)
        item = {
            "decision_id": dec.decision_id, "type": dec.type, "step": dec.step,
            "due_at": due, "decided_at": _iso(decided),
            "late_seconds": round((decided - datetime.fromisoformat(due)).total_seconds(), 3)
            if due else None,
            "rule": {**ref, "known": rule is not None}, "duration": _duration(rule),
            "data": dec.body.get("data"),
            "calendar_estimated": _estimated(None, dec.body, dec.body.get("rule"),
                                             dec.body.get("data")),
        }
        setter = _deadline_setter(events, due)
        if setter is not None:
            item["override"] = setter
        if rule is not None and due and rule.duration.unit == "wd" and not rule.duration.is_zero:
            # counted back: the working days before the deadline that the rule spanned
            start = _workdays_back(engine, datetime.fromisoformat(due), rule.duration)
            if start is not None:
                item["calendar"] = calendar_days(engine, start, datetime.fromisoformat(due))
        past.append(item)
    return {
        "case_id": case.case_id, "now": _iso(now), "status": case.status, "step": case.step,
        "step_started_at": _iso(step_started), "step_due_at": _iso(case.step_due_at),
        "paused_remaining_seconds": snapshot.get("paused_remaining_s"),
        "deadline_source": source, "pauses": pauses,
        "pending_deadlines": deadlines, "automatic_decisions": past,
        "reminders_sent": [p for p in past if p["type"] == "reminder.due_soon"],
    }


def _deadline_setter(events: list[CaseEventRow], due: str | None) -> dict[str, Any] | None:
    """The event that set a past deadline itself (the platform's own `due_at`, or an ops
    extension), if one did: its `due_at` is that very moment."""
    if not due:
        return None
    moment = datetime.fromisoformat(due)
    for e in reversed(events):
        body = e.body or {}
        stated = body.get("due_at")
        if e.outcome != "applied" or not isinstance(stated, str):
            continue
        try:
            same = as_utc(datetime.fromisoformat(stated)) == moment
        except ValueError:
            continue
        if same:
            data = body.get("data") or {}
            return {"by": "ops" if data.get("source") == "ops" else "platform",
                    "due_at": due, "event_id": e.event_id, "event_type": e.type}
    return None


def _workdays_back(engine: Engine, due: datetime, duration: Duration) -> datetime | None:
    local = as_utc(due).astimezone(CHINA_TZ)
    day = local.date()
    counted = 0
    try:
        while counted < duration.amount:
            if engine.calendar.is_workday(day):
                counted += 1
            day -= timedelta(days=1)
    except Exception:
        return None
    return as_utc(local.replace(year=day.year, month=day.month, day=day.day))
