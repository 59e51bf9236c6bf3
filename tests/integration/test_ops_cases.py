"""`aftersales case search|explain|pause|resume|extend` on the real database (and, for the
actions, the real broker and intake)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import chinese_calendar
import pytest

from services.intake.consumer import IntakeConsumer
from services.intake.processor import IntakeProcessor
from services.ops.cases import CaseFilter, explain_case, search_cases
from shared.db.models import CaseRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from tests.conftest import FIXED_DATE_LIMITS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CN = "+08:00"


def aftersales(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aftersales_cli.cli", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def engine() -> Engine:
    return Engine(RuleBook.load(None), WorkCalendar(None))


@pytest.fixture
def processor(db: Database, engine: Engine) -> IntakeProcessor:
    return IntakeProcessor(db, engine, NotificationPolicy.load(None),
                           {"emails": [], "phones": []}, 64 * 1024, limits=FIXED_DATE_LIMITS)


def ev(n: str, type_: str, case: str, at: str | datetime, **extra: Any) -> bytes:
    when = at.isoformat() if isinstance(at, datetime) else at
    body = {"event_id": f"{case}-{n}", "type": type_, "occurred_at": when,
            "platform": extra.pop("platform", "douyin"), "shop_id": extra.pop("shop", "S1"),
            "order_id": f"O-{case}", "case_id": case, "data": extra.pop("data", {}), **extra}
    return json.dumps(body).encode()


def opened(case: str, at: str | datetime, kind: str = "exchange", **extra: Any) -> bytes:
    data = {"kind": kind, "amount_fen": 5000, "merchant": {"email": "m@example.com"}}
    return ev("open", "case.opened", case, at, data=data, **extra)


def apply(processor: IntakeProcessor, *bodies: bytes) -> None:
    result = processor.process(list(bodies))
    assert not result.rejected, result.rejected
    assert all(h.outcome == "accepted" for h in result.handled), result.handled


def test_a_working_day_deadline_across_a_holiday_is_explained(
    db: Database, processor: IntakeProcessor, engine: Engine
) -> None:
    # Approved the day before China's National Day week: "7wd" skips the holidays.
    apply(processor, opened("AS-WD", f"2026-09-28T10:00:00{CN}", kind="refund_only"),
          ev("ok", "merchant.approved", "AS-WD", f"2026-09-30T10:00:00{CN}"))
    doc = explain_case(db, engine, "AS-WD")
    assert doc is not None and doc["step"] == "refund_pending"
    deadline = next(d for d in doc["pending_deadlines"] if d["purpose"] == "deadline")
    assert deadline["duration"]["working_days"] and deadline["duration"]["text"] == "7wd"
    assert deadline["deadline_source"] == "rule"
    assert deadline["rule_due_at"] == deadline["due_at"]
    off = {d["date"]: d["why"] for d in deadline["calendar"]["days_off"]}
    assert "National Day" in off["2026-10-01"]
    # The deadline is the 7th working day after 30 Sep by the official calendar.
    due_day = datetime.fromisoformat(deadline["due_at"]).astimezone(
        datetime.fromisoformat(f"2026-09-30T10:00:00{CN}").tzinfo).date()
    counted = [date(2026, 9, 30) + timedelta(days=i) for i in range(1, (due_day - date(
        2026, 9, 30)).days + 1)]
    assert sum(chinese_calendar.is_workday(d) for d in counted) == 7
    assert chinese_calendar.is_workday(due_day)
    assert set(off) == {d.isoformat() for d in counted if not chinese_calendar.is_workday(d)}
    assert deadline["calendar"]["sources"] == ["library"]  # chinesecalendar's official data

    text = aftersales({"AFTERSALES_DATABASE_URL": str(db.sql_engine.url.render_as_string(
        hide_password=False))}, "case", "explain", "AS-WD")
    assert text.returncode == 0, text.stderr
    assert "7wd = 7 working days" in text.stdout and "National Day" in text.stdout


def test_a_paused_step_and_its_pause_are_explained(
    db: Database, processor: IntakeProcessor, engine: Engine
) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=10)
    # kuaishou: 48 calendar hours for the merchant (douyin counts working days)
    apply(processor, opened("AS-PAUSE", t0, platform="kuaishou"),
          ev("p", "intervention.requested", "AS-PAUSE", t0 + timedelta(hours=2),
             data={"source": "ops", "by": "alice", "reason": "buyer sent proof by phone"}),
          ev("r", "intervention.resolved", "AS-PAUSE", t0 + timedelta(hours=5),
             data={"outcome": "resume"}))
    doc = explain_case(db, engine, "AS-PAUSE")
    assert doc is not None and doc["step"] == "merchant_response"
    [pause] = doc["pauses"]
    assert pause["seconds"] == 3 * 3600 and pause["by"] == "alice"
    assert pause["reason"] == "buyer sent proof by phone"
    deadline = next(d for d in doc["pending_deadlines"] if d["purpose"] == "deadline")
    # 48 h from the step's start, moved by the 3 h the clock stood still.
    assert datetime.fromisoformat(deadline["rule_due_at"]) == t0 + timedelta(hours=48)
    assert datetime.fromisoformat(deadline["due_at"]) == t0 + timedelta(hours=51)
    assert deadline["shifted_seconds"] == 3 * 3600
    assert deadline["pauses_in_step"] == [pause]


def test_a_platform_override_is_explained(
    db: Database, processor: IntakeProcessor, engine: Engine
) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    platform_due = t0 + timedelta(hours=20)
    apply(processor, opened("AS-OVR", t0, platform="kuaishou", due_at=platform_due.isoformat()))
    doc = explain_case(db, engine, "AS-OVR")
    assert doc is not None
    deadline = next(d for d in doc["pending_deadlines"] if d["purpose"] == "deadline")
    assert deadline["deadline_source"] == "platform"
    assert deadline["override"]["by"] == "platform"
    assert datetime.fromisoformat(deadline["override"]["due_at"]) == platform_due
    assert datetime.fromisoformat(deadline["override"]["rule_would_give"]) == \
        t0 + timedelta(hours=48)
    assert deadline["rule"]["id"] and deadline["rule"]["known"]


def test_search_filters_by_each_field(db: Database, processor: IntakeProcessor) -> None:
    now = datetime.now(UTC)
    apply(processor,
          opened("AS-S1", now - timedelta(days=3), shop="SHOP-A", platform="kuaishou"),
          opened("AS-S2", now - timedelta(hours=1), shop="SHOP-A", kind="refund_only"),
          opened("AS-S3", now - timedelta(hours=1), shop="SHOP-B"),
          ev("c", "buyer.cancelled", "AS-S3", now))

    def ids(**kw: Any) -> list[str]:
        return sorted(c["case_id"] for c in search_cases(db, CaseFilter(**kw)))

    assert ids(shop="SHOP-A") == ["AS-S1", "AS-S2"]
    assert ids(platform="kuaishou") == ["AS-S1"]
    assert ids(kind="refund_only") == ["AS-S2"]
    assert ids(status="closed") == ["AS-S3"]
    assert ids(step="merchant_response") == ["AS-S1", "AS-S2"]
    assert ids(overdue=True) == ["AS-S1"]  # 3 days > 48 h, by the database clock
    assert ids(overdue=False) == ["AS-S2", "AS-S3"]
    assert ids(order="O-AS-S2") == ["AS-S2"]
    url = db.sql_engine.url.render_as_string(hide_password=False)
    out = aftersales({"AFTERSALES_DATABASE_URL": url}, "case", "search", "--shop", "SHOP-A",
                     "--overdue", "yes", "--json")
    assert out.returncode == 0, out.stderr
    [found] = json.loads(out.stdout)
    assert found["case_id"] == "AS-S1" and found["overdue"] is True
    table = aftersales({"AFTERSALES_DATABASE_URL": url}, "case", "search", "--shop", "SHOP-A")
    assert "AS-S1" in table.stdout and "OVERDUE" in table.stdout and "2 cases" in table.stdout


def test_ops_actions_go_through_intake_into_the_timeline(
    db: Database, processor: IntakeProcessor, running_intake: IntakeConsumer, amqp_url: str
) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    apply(processor, opened("AS-OPS", t0))
    env = {"AFTERSALES_DATABASE_URL": db.sql_engine.url.render_as_string(hide_password=False),
           "AFTERSALES_AMQP_URL": amqp_url}

    def case() -> CaseRow:
        with db.transaction() as s:
            row = s.get(CaseRow, "AS-OPS")
            assert row is not None
            s.expunge(row)
            return row

    due_before = case().step_due_at
    paused = aftersales(env, "case", "pause", "AS-OPS", "--reason", "merchant on holiday",
                        "--by", "alice")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert "intake: applied" in paused.stdout
    assert case().step == "intervention"
    again = aftersales(env, "case", "pause", "AS-OPS", "--reason", "twice", "--by", "bob")
    assert again.returncode == 1 and "out_of_state" in again.stdout

    resumed = aftersales(env, "case", "resume", "AS-OPS", "--reason", "back", "--by", "alice",
                         "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["outcome"] == "applied"
    assert case().step == "merchant_response"
    resumed_due = case().step_due_at
    assert resumed_due is not None and due_before is not None and resumed_due >= due_before

    extended = aftersales(env, "case", "extend", "AS-OPS", "--hours", "24", "--reason",
                          "goodwill: courier strike", "--by", "carol")
    assert extended.returncode == 0, extended.stdout + extended.stderr
    assert case().step_due_at == resumed_due + timedelta(hours=24)

    shown = json.loads(aftersales(env, "case", "show", "AS-OPS", "--json").stdout)
    ops = [(e["type"], e["by"], e["reason"], e["outcome"]) for e in shown["timeline"]
           if e.get("source") == "ops"]
    assert ops == [
        ("intervention.requested", "alice", "merchant on holiday", "applied"),
        ("intervention.requested", "bob", "twice", "out_of_state"),
        ("intervention.resolved", "alice", "back", "applied"),
        ("deadline.changed", "carol", "goodwill: courier strike", "applied"),
    ]
    explained = json.loads(aftersales(env, "case", "explain", "AS-OPS", "--json").stdout)
    deadline = next(d for d in explained["pending_deadlines"] if d["purpose"] == "deadline")
    assert deadline["override"]["by"] == "ops"
    assert explained["pauses"][0]["by"] == "alice"
