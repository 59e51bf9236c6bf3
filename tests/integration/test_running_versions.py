"""A rule version that applies to running steps, through the database: the timer's job
moves the running step's deadline, records it in the timeline and tells the party."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from services.intake.processor import IntakeProcessor
from services.ops.caseview import case_document
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.domain.timeutil import CHINA_TZ
from shared.notifications.policy import NotificationPolicy
from shared.recount import switch_running_steps

pytestmark = pytest.mark.integration
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
    today = datetime.now(CHINA_TZ).date()
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
    effective_at = datetime.combine(today, datetime.min.time(), tzinfo=CHINA_TZ)
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


def test_a_buyer_rating_through_intake_is_kept_and_counted(db: Database) -> None:
    from prometheus_client import REGISTRY

    from services.intake.main import observe_batch

    intake = IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)),
                             NotificationPolicy.load(None), {"emails": [], "phones": []},
                             64 * 1024)
    at = datetime.now(UTC) - timedelta(hours=2)
    base = {"platform": "douyin", "shop_id": "S1", "order_id": "O1", "case_id": "RATE-1"}

    def ev(n: int, type_: str, **data: object) -> bytes:
        return json.dumps({**base, "event_id": f"rate-{n}", "type": type_,
                           "occurred_at": (at + timedelta(minutes=n)).isoformat(),
                           "data": data}).encode()

    labels = {"platform": "douyin", "kind": "refund_only", "rating": "2"}
    before = REGISTRY.get_sample_value("aftersales_buyer_ratings_total", labels) or 0.0
    intake.process([ev(0, "case.opened", kind="refund_only", amount_fen=100),
                    ev(1, "buyer.rated", rating=5)])  # still open: does not fit
    intake.process([ev(2, "merchant.approved"), ev(3, "refund.completed", amount_fen=100)])
    result = intake.process([ev(4, "buyer.rated", rating=2, comment="慢")])
    observe_batch(result, 0.01)
    assert [(h.outcome, h.rating) for h in result.handled] == [("accepted", 2)]
    assert REGISTRY.get_sample_value("aftersales_buyer_ratings_total", labels) == before + 1
    doc = case_document(db, "RATE-1")
    assert doc is not None
    rated_events = sorted((t["event_id"], t["outcome"]) for t in doc["timeline"]
                          if t["what"] == "event" and t["type"] == "buyer.rated")
    assert rated_events == [("rate-1", "out_of_state"), ("rate-4", "applied")]
    with db.transaction() as s:
        rated = s.execute(text("SELECT snapshot->'data'->'buyer_rating' FROM cases "
                               "WHERE case_id = 'RATE-1'")).scalar_one()
    assert rated["rating"] == 2
