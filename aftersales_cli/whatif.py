"""`aftersales rules what-if PATH`: read the open cases from one consistent snapshot
(REPEATABLE READ, READ ONLY: nothing is changed) and compare the configuration in force
with the proposed one (`shared.domain.whatif`)."""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.db.queries.whatif import OpenCasesSnapshot, read_open_cases
from shared.db.session import Database
from shared.domain import Case, DeadlineSpec, Engine, RuleBook, RuleRef, WorkCalendar
from shared.domain.whatif import WhatIfReport, compare_case


def is_holiday_file(path: Path) -> bool:
    """A holiday file has one table per year ([2027]); a rule file [ruleset] or
    [shop_policy]; a folder holds rule files."""
    if path.is_dir():
        return False
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False  # the rule loader reports it with file and line
    return bool(doc) and all(key.isdigit() for key in doc)


def proposed_engine(current_rules: Path | None, current_holidays: Path | None,
                    proposal: Path) -> tuple[Engine, str]:
    """The engine with the proposal in force: a rule file or folder is laid over the rule
    sets in force; a holiday file replaces AFTERSALES_HOLIDAYS."""
    if is_holiday_file(proposal):
        return Engine(RuleBook.load(current_rules), WorkCalendar(proposal)), "holidays"
    return Engine(RuleBook.load(current_rules, proposal), WorkCalendar(current_holidays)), \
        "rules"


def _spec(case_id: str, row: Any) -> DeadlineSpec:
    return DeadlineSpec(case_id=case_id, step=row.step, purpose=row.purpose, due_at=row.due_at,
                        action=row.action, party=row.party, fence=row.fence,
                        rule=RuleRef(row.rule_set, row.rule_version, row.rule_id),
                        deadline_at=row.deadline_at)


def what_if(db: Database, current: Engine, proposed: Engine, now: datetime | None = None,
            examples: int = 5) -> WhatIfReport:
    def compare(snapshot: OpenCasesSnapshot) -> WhatIfReport:
        # the snapshot's own clock: the same moment for every case, and the database's
        moment = now or snapshot.now()
        report = WhatIfReport(now=moment, example_limit=examples)
        report.open_cases = snapshot.open_cases()
        for row in snapshot.with_pending_deadline():
            case = Case.from_dict(row.snapshot)
            report.add(compare_case(current, proposed, case, _spec(case.case_id, row), moment))
        return report

    return read_open_cases(db, compare)


def render(report: WhatIfReport, proposal: str, kind: str) -> str:
    doc = report.to_dict()
    moved = doc["deadlines_moved"]
    lines = [
        f"what-if: {kind} file {proposal} against {doc['open_cases']} open case(s) "
        f"({doc['with_pending_deadline']} with a pending deadline), at {doc['now']}",
        "nothing was changed (read-only snapshot)", "",
        f"pending deadlines that would move: {moved['earlier'] + moved['later']} "
        f"(earlier {moved['earlier']}, later {moved['later']}, unchanged {moved['unchanged']})",
    ]
    for days, n in moved["by_days"].items():
        lines.append(f"  {days} day(s): {n}")
    if moved["earlier"]:
        lines.append(f"  at most {moved['max_earlier_s'] / 3600:.1f} h earlier")
    if moved["later"]:
        lines.append(f"  at most {moved['max_later_s'] / 3600:.1f} h later")
    lines.append("")
    lines.append("automatic decisions if nobody acts (before -> after):")
    for name, t in doc["automatic_decisions"].items():
        lines.append(f"  next {name}: {t['before']} -> {t['after']}")
    changed = [r for r in doc["breakdown"]
               if r["24h_before"] != r["24h_after"] or r["7d_before"] != r["7d_after"]]
    lines.append("")
    lines.append("by platform / kind / step / decision, where it changes "
                 "(24h before -> after, 7d before -> after):")
    if not changed:
        lines.append("  (no change)")
    for r in changed:
        lines.append(f"  {r['platform']:<10} {r['kind']:<15} {r['step']:<24} "
                     f"{r['decision']:<26} {r['24h_before']:>5} -> {r['24h_after']:<5} "
                     f"{r['7d_before']:>5} -> {r['7d_after']}")
    if doc["examples"]:
        lines.append("")
        lines.append("examples:")
        for ex in doc["examples"]:
            lines.append(f"  {ex['case_id']} ({ex['platform']} {ex['kind']}, {ex['step']}): "
                         f"due {ex['due_before']} -> {ex['due_after']}")
            before = ", ".join(f"{t} at {a}" for a, t, _s in ex["decisions_before"]) or "none"
            after = ", ".join(f"{t} at {a}" for a, t, _s in ex["decisions_after"]) or "none"
            lines.append(f"    before: {before}")
            lines.append(f"    after:  {after}")
    return "\n".join(lines)
