"""A rule version that applies to running steps, through the database: the timer's job
moves the running step's deadline, records it in the timeline and tells the party."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text

from services.caseview import case_document
from services.intake.processor import IntakeProcessor
from shared.db.recount import switch_running_steps
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy

pytestmark = pytest.mark.integration
SH = ZoneInfo("Asia/Shanghai")
VERSION = """[ruleset]
name = "acme"
version = "{version}"
effective = {effective}
{extra}
[[rule]]
id = "exchange.merchant_response"
kind = "exchange"
step = "merchant_response"
party = "merchant"
duration = "{duration}"
on_timeout = "auto_approve"
"""


def test_the_timer_job_gives_a_running_step_the_new_version(db: Database,
                                                            tmp_path: Path) -> None:
    today = datetime.now(SH).date()
    (tmp_path / "v1.toml").write_text(VERSION.format(
        version="v1", effective="2020-01-01", extra="", duration="72h"))
    policy = NotificationPolicy.load(None)
    old = Engine(RuleBook.load(tmp_path), WorkCalendar(None))
    opened_at = datetime.now(UTC) - timedelta(days=1)
    IntakeProcessor(db, old, policy, {"emails": [], "phones": []}, 64 * 1024).process([
        json.dumps({"event_id": "rv-1", "type": "case.opened",
                    "occurred_at": opened_at.isoformat(), "platform": "acme",
                    "shop_id": "S1", "order_id": "O1", "case_id": "RV-1",
                    "data": {"kind": "exchange", "amount_fen": 100,
                             "merchant": {"email": "m@example.com"}}}).encode()])
    # v2 (48 h) takes effect today at 00:00 China time and applies to running steps
    (tmp_path / "v2.toml").write_text(VERSION.format(
        version="v2", effective=today.isoformat(), extra="applies_to_running = true\n",
        duration="48h"))
    new = Engine(RuleBook.load(tmp_path), WorkCalendar(None))
    summary = switch_running_steps(db, new, policy, {"emails": [], "phones": []})
    assert (summary.checked, summary.earlier) == (1, 1)
    with db.transaction() as s:
        due, version = s.execute(text(
            "SELECT deadline_at, rule_version FROM deadlines WHERE case_id = 'RV-1' "
            "AND status = 'pending' AND purpose = 'deadline'")).one()
    assert version == "v2"
    effective_at = datetime.combine(today, datetime.min.time(), tzinfo=SH)
    assert due == max(opened_at + timedelta(hours=48), effective_at)
    doc = case_document(db, "RV-1")
    assert doc is not None
    notes = [t for t in doc["timeline"] if t["what"] == "note"]
    assert [n["type"] for n in notes] == ["rules.applied_to_running_step"]
    told = [t for t in doc["timeline"] if t["what"] == "notification"
            and t["type"] == "deadline.changed"]
    assert told and told[0]["party"] == "merchant"
    # run again: nothing left to switch
    assert switch_running_steps(db, new, policy, {"emails": [], "phones": []}).changed == 0
