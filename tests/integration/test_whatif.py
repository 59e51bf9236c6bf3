"""`aftersales rules what-if` on a database filled with simulated traffic: its output must
equal a direct recomputation, and it must change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from aftersales_cli.simulate.generator import SimConfig, generate
from services.intake.processor import IntakeProcessor
from shared.db.models import CaseRow, DeadlineRow
from shared.db.session import Database
from shared.domain import Case, DeadlineSpec, Engine, RuleBook, RuleRef, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from shared.schemas.events import Limits
from tests.estimated_year import APPROVED_AT, ESTIMATED_DUE, FILE_DUE, HOLIDAY_FILE, MAX_FUTURE_S

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DEFAULT = ROOT / "shared" / "rules" / "default.toml"

# A proposed second version of the default set: buyers get 3 days to ship a return
# (was 10) and merchants 24 h to respond (was 48 h). Running steps keep their version.
PROPOSAL = """[ruleset]
name = "default"
version = "2"
effective = 2000-01-02

[[rule]]
id = "any.merchant_response"
kind = "any"
step = "merchant_response"
party = "merchant"
duration = "24h"
on_timeout = "auto_approve"

[[rule]]
id = "any.buyer_return_shipping"
kind = "any"
step = "buyer_return_shipping"
party = "buyer"
duration = "3d"
on_timeout = "auto_close"
"""


def _fill(db: Database) -> None:
    """Simulated cases, opened over 8 hours from 40 hours ago (rule deadlines, no
    platform due_at), plus one case whose 7 working days reach into a year with no
    official holiday data."""
    # EST-1 happens on 31 December: a plausible-time window wide enough to take it
    intake = IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)),
                             NotificationPolicy.load(None), {"emails": [], "phones": []},
                             64 * 1024, limits=Limits(max_future=timedelta(seconds=MAX_FUTURE_S)))
    start = datetime.now(UTC) - timedelta(hours=40)
    config = SimConfig(run_id="whatif", malformed_share=0.0, think_seconds=30.0)
    bodies = [m.body for m in generate(config, 1500, seed=11, start=start, rate=0.05)]
    for i in range(0, len(bodies), 200):
        intake.process(bodies[i:i + 200])
    base = {"platform": "kuaishou", "shop_id": "S1", "order_id": "O-EST", "case_id": "EST-1"}
    intake.process([json.dumps(e).encode() for e in (
        {**base, "event_id": "est-open", "type": "case.opened",
         "occurred_at": (APPROVED_AT - timedelta(days=1)).isoformat(),
         "data": {"kind": "refund_only", "amount_fen": 100}},
        {**base, "event_id": "est-ok", "type": "merchant.approved",
         "occurred_at": APPROVED_AT.isoformat(), "data": {}},
    )])


def _fingerprint(db: Database) -> tuple[Any, ...]:
    with db.transaction() as s:
        return tuple(s.execute(text(q)).one() for q in (
            "SELECT count(*), max(updated_at), sum(version) FROM cases",
            "SELECT count(*), max(id), count(*) FILTER (WHERE status = 'pending') FROM deadlines",
            "SELECT count(*) FROM decisions", "SELECT count(*) FROM notifications",
            "SELECT count(*) FROM outbox", "SELECT count(*) FROM case_notes"))


def _what_if(database_url: str, proposal: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "aftersales_cli.cli", "rules", "what-if", str(proposal), "--json"],
        cwd=ROOT, env={**os.environ, "AFTERSALES_DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _direct(db: Database, current: Engine, proposed: Engine, now: datetime
            ) -> tuple[Counter[tuple[str, ...]], Counter[str]]:
    """Recompute without the what-if code: for every open case, fire its pending deadline
    and the ones that follow with each engine, and count the decisions by horizon."""
    counts: Counter[tuple[str, ...]] = Counter()
    moved: Counter[str] = Counter()
    with db.transaction() as s:
        rows = s.execute(select(CaseRow, DeadlineRow)
                         .join(DeadlineRow, DeadlineRow.case_id == CaseRow.case_id)
                         .where(CaseRow.status == "open", DeadlineRow.status == "pending",
                                DeadlineRow.purpose == "deadline")).all()
    for case_row, d in rows:
        case = Case.from_dict(case_row.snapshot)
        spec = DeadlineSpec(case.case_id, d.step, d.purpose, d.due_at, d.action, d.party,
                            d.fence, RuleRef(d.rule_set, d.rule_version, d.rule_id),
                            d.deadline_at)
        for when, engine in (("before", current), ("after", proposed)):
            c, pending = case, spec
            if when == "after" and d.calendar_source == "estimated":
                due = engine.calendar.add_workdays(c.step_started_at, 7)  # refund_pending
                moved["earlier" if due < pending.due_at else "later"] += due != pending.due_at
                pending = DeadlineSpec(c.case_id, c.step, "deadline", due, d.action, d.party,
                                       c.version, spec.rule, due)
            while pending is not None and pending.due_at <= now + timedelta(days=7):
                out = engine.fire(c, pending, pending.due_at)
                if not out.applied or out.case is None:
                    break
                for dec in out.decisions:
                    if dec.type == "reminder.due_soon":
                        continue
                    for name, span in (("24h", timedelta(hours=24)), ("7d", timedelta(days=7))):
                        if dec.due_at <= now + span:
                            counts[(name, when, case.platform, case.kind.value, dec.step,
                                    dec.type)] += 1
                c = out.case
                pending = next((x for x in out.deadlines or () if x.purpose == "deadline"),
                               None)
    return counts, moved


def _as_counter(breakdown: list[dict[str, Any]]) -> Counter[tuple[str, ...]]:
    out: Counter[tuple[str, ...]] = Counter()
    for row in breakdown:
        for name in ("24h", "7d"):
            for when in ("before", "after"):
                if row[f"{name}_{when}"]:
                    out[(name, when, row["platform"], row["kind"], row["step"],
                         row["decision"])] = row[f"{name}_{when}"]
    return out


def test_what_if_matches_a_direct_recomputation_and_changes_nothing(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    _fill(db)
    before = _fingerprint(db)
    rules = tmp_path / "default-2.toml"
    rules.write_text(PROPOSAL, encoding="utf-8")
    holidays = tmp_path / "holidays.toml"
    holidays.write_text(HOLIDAY_FILE)
    current = Engine(RuleBook.load(None), WorkCalendar(None))

    report = _what_if(database_url, rules)
    assert report["proposal"]["kind"] == "rules"
    now = datetime.fromisoformat(report["now"])
    counts, _ = _direct(db, current, Engine(RuleBook.load(None, rules), WorkCalendar(None)), now)
    assert _as_counter(report["breakdown"]) == counts
    totals = report["automatic_decisions"]
    assert totals["7d"]["before"] == sum(n for k, n in counts.items() if k[:2] == ("7d", "before"))
    # the proposal bites: shorter return shipping closes more cases within the week, and
    # no running step's pending deadline moves (each keeps the version it began under)
    assert totals["7d"]["after"] != totals["7d"]["before"]
    assert totals["24h"]["before"] > 0
    assert report["deadlines_moved"]["earlier"] == report["deadlines_moved"]["later"] == 0
    assert report["examples"]

    report = _what_if(database_url, holidays)
    assert report["proposal"]["kind"] == "holidays"
    now = datetime.fromisoformat(report["now"])
    counts, moved = _direct(db, current, Engine(RuleBook.load(None), WorkCalendar(holidays)),
                            now)
    assert _as_counter(report["breakdown"]) == counts
    assert report["deadlines_moved"]["earlier"] == moved["earlier"] == 1  # EST-1
    assert report["deadlines_moved"]["by_days"] == {str((FILE_DUE - ESTIMATED_DUE).days): 1}
    assert [e["case_id"] for e in report["examples"]] == ["EST-1"]

    assert _fingerprint(db) == before  # nothing was changed
