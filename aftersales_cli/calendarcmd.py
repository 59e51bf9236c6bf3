"""`aftersales calendar status|recompute`: which years have official holiday data, what is
pending on an estimate, and recounting it once the data has arrived."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from aftersales_cli.settings import command_settings as _settings
from shared.db.queries.calendar import pending_on_estimates
from shared.db.session import Database, make_engine
from shared.domain.calendar import WorkCalendar
from shared.domain.timeutil import CHINA_TZ


def calendar_status(calendar: WorkCalendar, db: Database | None,
                    today: datetime | None = None) -> dict[str, Any]:
    """Each year from last year to next year: its source, days off and make-up days; the
    pending deadlines counted on an estimate (None when the database was not asked)."""
    now = (today or datetime.now(UTC)).astimezone(CHINA_TZ)
    years = []
    for year in range(now.year - 1, now.year + 2):
        info = calendar.year_info(year)
        years.append({"year": year, "source": info.source, "estimated": info.source ==
                      "estimated", "weekday_holidays": info.holidays_off,
                      "makeup_workdays": info.makeup_workdays})
    pending = None
    if db is not None:
        pending = [{"year": r.year, "deadlines": r.deadlines, "cases": r.cases,
                    "first_due": r.first_due.isoformat()}
                   for r in pending_on_estimates(db)]
    return {"holiday_file": str(calendar.holiday_file) if calendar.holiday_file else None,
            "official_until": calendar.covered_until(now.date()).isoformat(),
            "years": years, "pending_on_estimates": pending}


def render_status(doc: dict[str, Any]) -> str:
    lines = [f"holiday file: {doc['holiday_file'] or '(none: AFTERSALES_HOLIDAYS not set)'}",
             f"official holiday data until: {doc['official_until']}", "",
             "year  source     weekday days off  make-up workdays"]
    for y in doc["years"]:
        note = "  <- estimated: statutory holidays at expected dates, no make-up days" \
            if y["estimated"] else ""
        lines.append(f"{y['year']}  {y['source']:<9}  {y['weekday_holidays']:>16}  "
                     f"{y['makeup_workdays']:>16}{note}")
    lines.append("")
    pending = doc["pending_on_estimates"]
    if pending is None:
        lines.append("pending deadlines on estimates: (database not reachable)")
    elif not pending:
        lines.append("pending deadlines on estimates: none")
    else:
        lines.append("pending deadlines on estimates (by year of the deadline):")
        for p in pending:
            lines.append(f"  {p['year']}: {p['deadlines']} deadline(s) in {p['cases']} "
                         f"case(s), first due {p['first_due']}")
        lines.append("  (recounted when official data arrives: `aftersales calendar "
                     "recompute` or a timer restart)")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from shared.bootstrap import build_domain

    settings = _settings()
    calendar = build_domain(settings).calendar
    sql_engine = make_engine(settings.database_url, pool_size=1)
    db: Database | None = Database(sql_engine)
    try:
        try:
            doc = calendar_status(calendar, db)
        except Exception as exc:  # the calendar part is useful without the database
            print(f"aftersales: database not reachable: {exc.__class__.__name__}",
                  file=sys.stderr)
            doc = calendar_status(calendar, None)
    finally:
        sql_engine.dispose()
    print(json.dumps(doc, ensure_ascii=False, indent=2) if args.json else render_status(doc))
    return 0


def cmd_recompute(args: argparse.Namespace) -> int:
    from shared.bootstrap import build_domain, build_policy, ops_contacts
    from shared.recount import recount_estimated

    settings = _settings()
    sql_engine = make_engine(settings.database_url, pool_size=1)
    try:
        summary = recount_estimated(Database(sql_engine), build_domain(settings),
                                    build_policy(settings), ops_contacts(settings))
    finally:
        sql_engine.dispose()
    if args.json:
        print(json.dumps({"checked": summary.checked, "earlier": summary.earlier,
                          "later": summary.later, "same_day": summary.same_day,
                          "still_estimated": summary.still_estimated,
                          "shift_days": {str(k): v for k, v in sorted(summary.shifts.items())},
                          "examples": summary.examples}, ensure_ascii=False, indent=2))
    else:
        print("\n".join(summary.lines()))
    return 0


def add_parser(sub: Any) -> None:
    cal = sub.add_parser("calendar", help="holiday data: status, recount estimated deadlines")
    cal_sub = cal.add_subparsers(dest="calendar_command", required=True, metavar="ACTION")
    status = cal_sub.add_parser(
        "status", help="each year's holiday data source and what is pending on estimates")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    recompute = cal_sub.add_parser(
        "recompute", help="recount pending deadlines counted on an estimated calendar")
    recompute.add_argument("--json", action="store_true", help="machine-readable output")
    recompute.set_defaults(func=cmd_recompute)
