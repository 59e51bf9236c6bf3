"""Mail-in repair (寄修) and on-site repair (上门维修), seed 004."""

from __future__ import annotations

from datetime import timedelta

from domain_support import Driver, cst

from shared.domain import Engine, facts_of

OPENED = cst(2026, 11, 2, 10)


def _repair_received(driver: Driver) -> None:
    driver.open("repair", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("buyer.shipped", cst(2026, 11, 3, 12))
    driver.send("merchant.received", cst(2026, 11, 5, 9))


def test_repair_merchant_30_days_after_receipt_then_auto_refund(driver: Driver) -> None:
    _repair_received(driver)
    assert driver.step == "merchant_repair"
    assert driver.due_local() == cst(2026, 12, 5, 9)
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_refunded"
    assert out.decisions[0].rule.id == "repair.merchant_repair"
    assert driver.step == "refund_pending"


def test_repair_sent_back_then_buyer_confirms(driver: Driver) -> None:
    _repair_received(driver)
    driver.send("merchant.reshipped", cst(2026, 11, 20, 9))
    assert driver.step == "replacement_in_transit"
    driver.send("buyer.received", cst(2026, 11, 21, 9))
    assert driver.step == "buyer_confirm"
    assert driver.due_local() == cst(2026, 12, 1, 9)  # 10 days from the sign-off
    driver.send("buyer.confirmed", cst(2026, 11, 22, 9))
    assert driver.case is not None and driver.case.resolution == "completed"


def test_repair_refused_without_reason_is_an_immediate_return_and_refund(driver: Driver) -> None:
    _repair_received(driver)
    out = driver.send("merchant.refused_repair", cst(2026, 11, 6, 9))
    assert [d.type for d in out.decisions] == ["decision.auto_refunded"]
    decision = out.decisions[0]
    assert decision.step == "repair_refused" and decision.rule.id == "any.repair_refused"
    assert decision.due_at == cst(2026, 11, 6, 9)
    assert driver.step == "refund_pending"
    # the merchant acted (refused) in time; the immediate step reports no SLA result
    assert [(s.step, s.met) for s in out.steps] == [("merchant_repair", True)]
    assert {n.party for n in out.notices} == {"buyer"}


def test_onsite_repair_3_day_agreement_else_15_day_visit_window(driver: Driver) -> None:
    driver.open("onsite_repair", OPENED)
    assert driver.step == "visit_agreement"
    assert driver.due_local() == cst(2026, 11, 5, 10)
    out = driver.fire()
    # not an escalation to the platform: the merchant must visit within 15 days
    assert out.decisions[0].type == "decision.visit_required"
    assert out.decisions[0].data["action"] == "require_visit"
    assert [(n.party, n.urgent) for n in out.notices] == [("merchant", False)]
    assert driver.step == "visit_window"
    assert driver.due_local() == cst(2026, 11, 20, 10)  # 15 days after the 3-day window
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_refunded"


def test_onsite_repair_visit_at_the_agreed_time_else_refund(driver: Driver) -> None:
    driver.open("onsite_repair", OPENED)
    driver.send("repair.scheduled", cst(2026, 11, 3, 9), visit_at="2026-11-07T14:00:00+08:00")
    assert driver.step == "visit_scheduled"
    # kuaishou: within the agreed time; a bare visit_at is the slot, plus the set's 2 h grace
    assert driver.due_local() == cst(2026, 11, 7, 16)
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_refunded"


def test_onsite_repair_default_set_allows_24h_after_the_visit_time(engine: Engine) -> None:
    driver = Driver(engine, platform="douyin")
    driver.open("onsite_repair", OPENED)
    driver.send("repair.scheduled", cst(2026, 11, 3, 9), visit_at="2026-11-07T14:00:00")
    assert driver.due_local() == cst(2026, 11, 8, 14)


def test_onsite_repair_30_days_after_first_visit(driver: Driver) -> None:
    driver.open("onsite_repair", OPENED)
    driver.send("repair.scheduled", cst(2026, 11, 3, 9), visit_at="2026-11-07T14:00:00+08:00")
    driver.send("repair.visited", cst(2026, 11, 7, 15))
    assert driver.step == "repair_in_progress"
    assert driver.due_local() == cst(2026, 12, 7, 15)
    due_before = driver.case.step_due_at if driver.case else None
    driver.send("repair.visited", cst(2026, 11, 20, 15))  # a second visit moves nothing
    assert driver.case is not None and driver.case.step_due_at == due_before
    assert driver.case.data["visits"] == 2
    assert driver.case.data["first_visit_at"] == "2026-11-07T07:00:00+00:00"
    driver.send("repair.completed", cst(2026, 11, 21, 15))
    assert driver.case.resolution == "completed"


def test_onsite_repair_reschedule_moves_the_visit_deadline(driver: Driver) -> None:
    driver.open("onsite_repair", OPENED)
    driver.send("repair.scheduled", cst(2026, 11, 3, 9), visit_at="2026-11-07T14:00:00+08:00")
    driver.send("repair.scheduled", cst(2026, 11, 6, 9), visit_at="2026-11-09T10:00:00+08:00")
    assert driver.due_local() == cst(2026, 11, 9, 12)  # the new slot plus the 2 h grace


def test_onsite_repair_missing_visit_at_is_invalid(driver: Driver) -> None:
    driver.open("onsite_repair", OPENED)
    before = driver.case
    out = driver.send("repair.scheduled", OPENED + timedelta(hours=1))
    assert not out.applied and out.problem is not None and out.problem.startswith("invalid:")
    assert facts_of(out.case) == facts_of(before)
