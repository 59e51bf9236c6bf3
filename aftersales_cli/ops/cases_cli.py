"""`aftersales case search|explain`: the terminal side of services/ops/cases.py."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from services.ops.cases import CaseFilter, explain_case, search_cases
from services.ops.display import span
from shared.bootstrap import build_domain
from shared.config import Settings
from shared.db.session import Database, make_engine
from shared.domain.timeutil import CHINA_TZ


def local(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M")


def _database(settings: Settings) -> Database:
    return Database(make_engine(settings.database_url, pool_size=1))


def filter_from(args: argparse.Namespace) -> CaseFilter:
    overdue = {"yes": True, "no": False}.get(args.overdue) if args.overdue else None
    return CaseFilter(shop=args.shop, order=args.order, platform=args.platform,
                      kind=args.kind, step=args.step, status=args.status, overdue=overdue,
                      case_id=args.case, limit=args.limit)


def cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    db = _database(settings)
    try:
        found = search_cases(db, filter_from(args))
    finally:
        db.sql_engine.dispose()
    if args.json:
        print(json.dumps(found, ensure_ascii=False))
        return 0
    print(f"{'case':<24} {'platform':<10} {'shop':<10} {'order':<16} {'kind':<15} "
          f"{'status':<6} {'step':<22} step due (Asia/Shanghai)")
    for c in found:
        print(f"{c['case_id']:<24} {c['platform']:<10} {c['shop_id']:<10} {c['order_id']:<16} "
              f"{c['kind']:<15} {c['status']:<6} {c['step']:<22} {local(c['step_due_at'])}"
              + ("  OVERDUE" if c["overdue"] else ""))
    print(f"{len(found)} cases" + (" (limit reached)" if len(found) == args.limit else ""))
    return 0


def render_explanation(doc: dict[str, Any]) -> str:
    lines = [f"case {doc['case_id']}  [{doc['status']}]  step {doc['step']}, started "
             f"{local(doc['step_started_at'])}, due {local(doc['step_due_at'])} "
             f"(Asia/Shanghai; database clock {local(doc['now'])})", ""]
    lines.append("pending deadlines:")
    if not doc["pending_deadlines"]:
        lines.append("  (none)")
    for d in doc["pending_deadlines"]:
        lines.append(f"  {d['purpose']} of step {d['step']}: {local(d['due_at'])} -> "
                     f"{d['action']} ({d['party']})" + ("  OVERDUE" if d["overdue"] else ""))
        lines += _why(d)
    lines.append("")
    lines.append("pauses of the clock:")
    if not doc["pauses"]:
        lines.append("  (none)")
    for p in doc["pauses"]:
        who = f" by {p['by']}" if p.get("by") else ""
        why = f": {p['reason']}" if p.get("reason") else ""
        lines.append(f"  {local(p['from'])} -> {local(p['to'])}  {span(p['seconds'])}  "
                     f"{p['cause']}{who}{why}"
                     + ("  (clock restarts on resume)" if p.get("restart_clock") else ""))
    lines.append("")
    lines.append("automatic decisions:")
    if not doc["automatic_decisions"]:
        lines.append("  (none)")
    for dec in doc["automatic_decisions"]:
        lines.append(f"  {local(dec['decided_at'])}  {dec['type']}  step {dec['step']}, "
                     f"deadline {local(dec['due_at'])}, taken {span(dec['late_seconds'])} after")
        lines += _why(dec)
    return "\n".join(lines)


def _why(item: dict[str, Any]) -> list[str]:
    rule = item["rule"]
    out = [f"      rule {rule.get('set')} / {rule.get('version')} / {rule.get('id')}"
           + ("" if rule.get("known") else "  (not in the loaded rule sets)")]
    duration = item.get("duration")
    if duration:
        anchor = "the step's start" if duration["anchor"] == "step_start" \
            else duration["anchor"]
        out.append(f"      {duration['text']} = {duration['counted']} from {anchor}"
                   + (f" ({local(item.get('anchor_at'))})" if item.get("anchor_at") else "")
                   + (f"; reminders {', '.join(duration['reminders'])} before"
                      if duration["reminders"] else ""))
        if duration.get("note"):
            out.append(f"      note: {duration['note']}")
    if item.get("rule_due_at"):
        out.append(f"      the rule gives {local(item['rule_due_at'])}")
    if item.get("override"):
        o = item["override"]
        who = "the platform's own deadline" if o["by"] == "platform" \
            else "an ops extension (aftersales case extend)"
        out.append(f"      overridden by {who}: {local(o['due_at'])}")
    elif item.get("shifted_seconds"):
        out.append(f"      moved {span(item['shifted_seconds'])} by the pauses of the clock")
    calendar = item.get("calendar")
    if calendar:
        off = ", ".join(f"{d['date']} {d['why']}" for d in calendar["days_off"]) or "none"
        out.append(f"      days not counted: {off}")
        if calendar["makeup_workdays"]:
            out.append("      make-up workdays counted: "
                       + ", ".join(d["date"] for d in calendar["makeup_workdays"]))
        estimated = item.get("calendar_estimated")
        out.append(f"      calendar: {', '.join(calendar['sources'])}"
                   + (f", holiday file {calendar['holiday_file']}"
                      if calendar["holiday_file"] else "")
                   + f"; known until {calendar['covered_until']}"
                   + ("; ESTIMATED" if estimated else "")
                   + ("; BEYOND the known data" if calendar["beyond_known_data"] else ""))
    return out


def cmd_explain(settings: Settings, args: argparse.Namespace) -> int:
    db = _database(settings)
    try:
        doc = explain_case(db, build_domain(settings), args.case_id)
    finally:
        db.sql_engine.dispose()
    if doc is None:
        print(f"no case {args.case_id}")
        return 1
    print(json.dumps(doc, ensure_ascii=False, indent=2) if args.json
          else render_explanation(doc))
    return 0


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shop")
    parser.add_argument("--order")
    parser.add_argument("--platform")
    parser.add_argument("--kind")
    parser.add_argument("--step")
    parser.add_argument("--status", choices=["open", "closed"])
    parser.add_argument("--overdue", choices=["yes", "no"],
                        help="open with the step's deadline passed (database clock), or not")
    parser.add_argument("--case", help="case ids starting with this")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--json", action="store_true")


def cmd_action(settings: Settings, args: argparse.Namespace) -> int:
    import getpass
    import sys

    from services.ops.actions import ActionError, act
    from shared.domain.timeutil import parse_moment

    db = _database(settings)
    try:
        result = act(db, settings.amqp_url, args.action, args.case_id, args.reason,
                     args.by or getpass.getuser(),
                     until=parse_moment(args.until) if getattr(args, "until", None) else None,
                     hours=getattr(args, "hours", None), wait_seconds=args.wait)
    except ActionError as exc:
        print(f"aftersales: {exc}", file=sys.stderr)
        return 2
    finally:
        db.sql_engine.dispose()
    doc = result.document()
    if args.json:
        print(json.dumps(doc, ensure_ascii=False))
    else:
        print(f"published {doc['type']} {doc['event_id']} for {doc['case_id']} "
              f"(by {doc['data']['by']}: {doc['data']['reason']})")
        if result.outcome is None:
            print(f"intake has not recorded it within {args.wait:g}s: see aftersales case show")
        else:
            print(f"intake: {result.outcome}" + (f" ({result.problem})" if result.problem else ""))
    return 0 if result.outcome in ("applied", None) else 1
