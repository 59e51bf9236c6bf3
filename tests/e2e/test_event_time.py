"""Event time through the real services (issue 14): the facts decide, whatever the
arrival order and however late the timer runs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from shared.db.models import CaseEventRow, CaseRow, NotificationRow
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import DecisionTap, System, publish_events

pytestmark = pytest.mark.e2e

OPS_EMAIL = "ops-oncall@example.com"


@pytest.fixture(scope="module")
def system(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[System]:
    log_dir: Path = tmp_path_factory.mktemp("services-event-time")
    env = {
        "AFTERSALES_DATABASE_URL": database_url,
        "AFTERSALES_AMQP_URL": amqp_url,
        "AFTERSALES_REDIS_PREFIX": f"aftersales-test:{log_dir.name}:",
        "AFTERSALES_EMAIL_TRANSPORT": "log",
        "AFTERSALES_TIMER_POLL_SECONDS": "0.1",
        "AFTERSALES_OUTBOX_POLL_SECONDS": "0.1",
        "AFTERSALES_OPS_EMAILS": OPS_EMAIL,
        "AFTERSALES_QUIET_HOURS": "off",  # a non-urgent message goes out at any hour here
        "AFTERSALES_LOG_LEVEL": "INFO",
    }
    system = System(env, log_dir)
    system.start("intake", "timer", "resolver", "notifier")
    try:
        for service in ("intake", "timer", "resolver", "notifier"):
            wait_for(lambda s=service: system.metrics_ready(s), timeout=60,
                     what=f"{service} to serve metrics")
        yield system
    finally:
        system.stop()


def now() -> datetime:
    return datetime.now(UTC)


def event(event_id: str, type_: str, case_id: str, occurred_at: datetime, *,
          due_at: datetime | None = None, data: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": event_id, "type": type_, "occurred_at": occurred_at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": f"O-{case_id}",
        "case_id": case_id, "data": data or {},
    }
    if due_at is not None:
        doc["due_at"] = due_at.isoformat()
    return doc


def opened(case_id: str, at: datetime, kind: str, due_at: datetime | None = None
           ) -> dict[str, Any]:
    return event(f"{case_id}-open", "case.opened", case_id, at, due_at=due_at, data={
        "kind": kind, "amount_fen": 5000, "reason": "质量问题",
        "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"},
    })


def decisions_for(tap: DecisionTap, case_id: str) -> list[dict[str, Any]]:
    return [m for m in tap.snapshot() if m["case_id"] == case_id]


def case_row(db: Database, case_id: str) -> Any:
    with db.transaction() as s:
        return s.execute(select(CaseRow).where(CaseRow.case_id == case_id)).scalar_one_or_none()


def event_outcomes(db: Database, case_id: str) -> dict[str, str]:
    with db.transaction() as s:
        rows = s.execute(select(CaseEventRow.event_id, CaseEventRow.outcome)
                         .where(CaseEventRow.case_id == case_id)).all()
    return {event_id: outcome for event_id, outcome in rows}


def marker(amqp_url: str, tap: DecisionTap, case_id: str, due_in: float) -> None:
    """A case that comes due `due_in` seconds from now: once its decision is out, every
    deadline due before it has had its chance to fire."""
    publish_events(amqp_url, [opened(case_id, now(), "exchange",
                                     due_at=now() + timedelta(seconds=due_in))])
    wait_for(lambda: decisions_for(tap, case_id), timeout=90, what=f"{case_id}'s decision")


def test_a_shipment_that_arrives_before_the_earlier_approval_counts(
    system: System, db: Database, amqp_url: str
) -> None:
    t0 = now() - timedelta(hours=2)
    with DecisionTap(amqp_url) as tap:
        publish_events(amqp_url, [
            opened("ET-A1", t0, "exchange"),
            # happened second, arrives first (does not fit yet: no approval)
            event("ET-A1-ship", "buyer.shipped", "ET-A1", t0 + timedelta(hours=1, minutes=30),
                  data={"carrier": "SF", "tracking_no": "SF1"}),
        ])
        wait_for(lambda: event_outcomes(db, "ET-A1").get("ET-A1-ship") == "out_of_state",
                 timeout=60, what="the early shipment recorded")
        # the approval happened an hour earlier; the platform's deadline for shipping
        # would auto-close the exchange in 2 s if the shipment did not count
        publish_events(amqp_url, [event("ET-A1-ok", "merchant.approved", "ET-A1",
                                        t0 + timedelta(hours=1),
                                        due_at=now() + timedelta(seconds=2))])
        wait_for(lambda: event_outcomes(db, "ET-A1") == {
            "ET-A1-open": "applied", "ET-A1-ok": "applied", "ET-A1-ship": "applied"},
            timeout=60, what="both events applied in event time")
        marker(amqp_url, tap, "ET-A2-marker", due_in=4)
        assert decisions_for(tap, "ET-A1") == []
    row = case_row(db, "ET-A1")
    assert row.step == "return_in_transit" and row.status == "open"
    assert row.snapshot["data"]["return_tracking_no"] == "SF1"
    wait_for(lambda: _counter(system, "aftersales_cases_rebuilt_total") >= 1, timeout=30,
             what="aftersales_cases_rebuilt_total")


def test_a_rejection_one_second_late_loses_even_before_the_timer_fires(
    system: System, db: Database, amqp_url: str
) -> None:
    due = now() - timedelta(minutes=5)  # the deadline passed; the timer has not seen it yet
    with DecisionTap(amqp_url) as tap:
        publish_events(amqp_url, [
            opened("ET-B1", due - timedelta(hours=1), "refund_only", due_at=due),
            event("ET-B1-no", "merchant.rejected", "ET-B1", due + timedelta(seconds=1),
                  data={"reason": "不同意", "evidence": ["https://img.example/no.jpg"]}),
        ])
        got = wait_for(lambda: decisions_for(tap, "ET-B1"), timeout=60,
                       what="the automatic approval")
        wait_for(lambda: event_outcomes(db, "ET-B1").get("ET-B1-no") == "out_of_state",
                 timeout=60, what="the late rejection judged")
        marker(amqp_url, tap, "ET-B2-marker", due_in=1)
        got = decisions_for(tap, "ET-B1")
    assert [d["type"] for d in got] == ["decision.auto_approved"]
    assert got[0]["due_at"] == due.isoformat()
    assert case_row(db, "ET-B1").step == "refund_pending"


def test_a_stale_deadline_change_never_moves_the_buyers_deadline(
    system: System, db: Database, amqp_url: str
) -> None:
    t0 = now() - timedelta(hours=2)
    approved_at = t0 + timedelta(hours=1)
    with DecisionTap(amqp_url) as tap:
        publish_events(amqp_url, [
            opened("ET-C1", t0, "exchange"),
            event("ET-C1-ok", "merchant.approved", "ET-C1", approved_at),
            # issued for the merchant's step before the approval, delivered after it
            event("ET-C1-move", "deadline.changed", "ET-C1", t0 + timedelta(minutes=30),
                  due_at=now() + timedelta(seconds=2)),
        ])
        wait_for(lambda: len(event_outcomes(db, "ET-C1")) == 3, timeout=60,
                 what="the three events judged")
        marker(amqp_url, tap, "ET-C2-marker", due_in=4)
        assert decisions_for(tap, "ET-C1") == []
    row = case_row(db, "ET-C1")
    assert row.step == "buyer_return_shipping"
    assert row.step_due_at == approved_at + timedelta(days=10)


def _counter(system: System, name: str) -> float:
    found = re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", system.metrics("intake"),
                       re.M)
    return sum(float(v) for v in found)


def _superseded_metric(system: System) -> float:
    text = system.metrics("intake")
    found = re.findall(r'^aftersales_decisions_superseded_total\{[^}]*type="'
                       r'decision\.auto_approved"[^}]*\} ([0-9.e+]+)$', text, re.M)
    return sum(float(v) for v in found)


def test_a_late_fact_supersedes_a_published_decision_end_to_end(
    system: System, db: Database, amqp_url: str
) -> None:
    t0 = now()
    with DecisionTap(amqp_url) as tap:
        publish_events(amqp_url, [opened("ET-D1", t0, "refund_only",
                                         due_at=t0 + timedelta(seconds=2))])
        approval = wait_for(lambda: decisions_for(tap, "ET-D1"), timeout=60,
                            what="the automatic approval")[0]
        assert approval["type"] == "decision.auto_approved"
        # the merchant had rejected in time; the event reaches us only now
        publish_events(amqp_url, [event("ET-D1-no", "merchant.rejected", "ET-D1",
                                        t0 + timedelta(seconds=1),
                                        data={"reason": "缺货",
                                              "evidence": ["https://img.example/no.jpg"]})])
        withdrawn = wait_for(
            lambda: [d for d in decisions_for(tap, "ET-D1")
                     if d["type"] == "decision.superseded"],
            timeout=60, what="decision.superseded on the exchange")
    assert len(withdrawn) == 1
    message = withdrawn[0]
    assert message["data"]["supersedes"] == approval["decision_id"]
    assert message["data"]["superseded_type"] == "decision.auto_approved"
    assert message["data"]["reason"].startswith("late_fact:")
    assert [f["event_id"] for f in message["data"]["late_facts"]] == ["ET-D1-no"]
    assert message["step"] == "merchant_response" and message["due_at"] == approval["due_at"]
    row = case_row(db, "ET-D1")
    assert row.step == "buyer_after_rejection"
    assert event_outcomes(db, "ET-D1")["ET-D1-no"] == "applied"

    def ops_notified() -> list[Any]:
        with db.transaction() as s:
            return list(s.execute(select(NotificationRow).where(
                NotificationRow.case_id == "ET-D1",
                NotificationRow.reason == "decision.superseded",
                NotificationRow.recipient == OPS_EMAIL)).scalars())

    notified = wait_for(ops_notified, timeout=60, what="ops told of the withdrawal")
    assert not notified[0].urgent
    wait_for(lambda: any(n.status == "sent" for n in ops_notified()),
             timeout=60, what="the ops email sent")
    wait_for(lambda: _superseded_metric(system) >= 1, timeout=30,
             what="aftersales_decisions_superseded_total")
