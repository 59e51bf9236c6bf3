"""Rejection (驳回) → modify / cancel / intervention; intervention outcomes; pause/resume."""

from __future__ import annotations

from datetime import timedelta

from domain_support import Driver, cst

OPENED = cst(2026, 11, 2, 10)
REJECTED = cst(2026, 11, 3, 10)


def _rejected(driver: Driver, kind: str = "exchange") -> None:
    driver.open(kind, OPENED)
    driver.send("merchant.rejected", REJECTED, reason="no defect", evidence=["https://x/1"])


def test_rejection_buyer_has_7_days_default_else_case_closes(driver: Driver) -> None:
    _rejected(driver)
    assert driver.step == "buyer_after_rejection"
    assert driver.last is not None and [n.party for n in driver.last.notices] == ["buyer"]
    assert driver.due_local() == cst(2026, 11, 10, 10)
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_closed"
    assert driver.case is not None and driver.case.resolution == "auto_closed"


def test_rejection_then_buyer_modifies_restarts_the_merchant_clock(driver: Driver) -> None:
    _rejected(driver)
    out = driver.send("buyer.modified", cst(2026, 11, 4, 8), reason="new photos",
                      amount_fen=5000)
    assert driver.step == "merchant_response"
    assert driver.due_local() == cst(2026, 11, 6, 8)
    assert driver.case is not None and driver.case.amount_fen == 5000
    assert driver.case.data["rejection_reason"] == "no defect"
    assert [n.party for n in out.notices] == ["merchant"]


def test_onsite_rejection_modify_goes_back_to_visit_agreement(driver: Driver) -> None:
    _rejected(driver, "onsite_repair")
    driver.send("buyer.modified", cst(2026, 11, 4, 8))
    assert driver.step == "visit_agreement"


def test_buyer_may_cancel_at_any_step(driver: Driver) -> None:
    _rejected(driver)
    out = driver.send("buyer.cancelled", cst(2026, 11, 4, 8))
    assert driver.case is not None and driver.case.resolution == "cancelled"
    assert out.deadlines == () and out.steps == ()


def test_cancel_is_refused_while_the_refund_is_paid(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    driver.send("merchant.approved", REJECTED)
    out = driver.send("buyer.cancelled", REJECTED + timedelta(hours=1))
    assert not out.applied and out.problem is not None
    assert out.problem.startswith("out_of_state:")


def test_intervention_pauses_the_clock_and_resume_keeps_the_time_left(driver: Driver) -> None:
    driver.open("exchange", OPENED)  # merchant due 2026-11-04 10:00
    out = driver.send("intervention.requested", cst(2026, 11, 3, 10), requested_by="buyer")
    case = driver.case
    assert case is not None and case.step == "intervention"
    assert case.paused_remaining_s == 24 * 3600 and case.step_due_at is None
    assert out.deadlines == ()
    assert {n.party for n in out.notices} == {"buyer", "merchant"}
    out = driver.send("intervention.resolved", cst(2026, 11, 8, 10), outcome="resume")
    assert driver.step == "merchant_response"
    assert driver.due_local() == cst(2026, 11, 9, 10)  # the 24 h left, from the resumption
    assert driver.case is not None and driver.case.paused_remaining_s is None
    assert driver.case.rule_id == "exchange.merchant_response"
    assert driver.case.step_started_at == OPENED  # the step did not restart
    assert [s.step for s in out.steps] == ["intervention"]


def test_intervention_after_rejection_buyer_upheld_goes_where_approval_leads(
    driver: Driver,
) -> None:
    _rejected(driver)
    driver.send("intervention.requested", cst(2026, 11, 4, 10))
    driver.send("intervention.resolved", cst(2026, 11, 6, 10), outcome="buyer")
    assert driver.step == "buyer_return_shipping"
    assert driver.due_local() == cst(2026, 11, 16, 10)


def test_intervention_after_failed_inspection_buyer_upheld_for_refund(driver: Driver) -> None:
    driver.open("return_refund", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("buyer.shipped", cst(2026, 11, 3, 12))
    driver.send("merchant.received", cst(2026, 11, 5, 8))
    driver.send("merchant.inspected", cst(2026, 11, 5, 9), passed=False)
    driver.send("intervention.requested", cst(2026, 11, 5, 10))
    driver.send("intervention.resolved", cst(2026, 11, 6, 10), outcome="buyer")
    assert driver.step == "refund_pending"


def test_intervention_merchant_upheld_closes(driver: Driver) -> None:
    _rejected(driver)
    driver.send("intervention.requested", cst(2026, 11, 4, 10))
    driver.send("intervention.resolved", cst(2026, 11, 6, 10), outcome="merchant")
    assert driver.case is not None and driver.case.resolution == "merchant_upheld"


def test_intervention_refund_outcome(driver: Driver) -> None:
    driver.open("repair", OPENED, amount_fen=777)
    driver.send("intervention.requested", cst(2026, 11, 3, 10))
    driver.send("intervention.resolved", cst(2026, 11, 6, 10), outcome="refund")
    assert driver.step == "refund_pending"
    assert driver.case is not None and driver.case.refund_fen == 777


def test_intervention_unknown_outcome_is_invalid(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("intervention.requested", cst(2026, 11, 3, 10))
    out = driver.send("intervention.resolved", cst(2026, 11, 6, 10), outcome="maybe")
    assert not out.applied and out.problem is not None and out.problem.startswith("invalid:")


def test_resume_after_escalation_restarts_the_step_clock(driver: Driver) -> None:
    driver.open("return_refund", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("buyer.shipped", cst(2026, 11, 3, 12))
    driver.fire()  # 15 days in transit: escalated
    assert driver.step == "intervention"
    driver.send("intervention.resolved", cst(2026, 11, 20, 12), outcome="resume")
    assert driver.step == "return_in_transit"
    assert driver.due_local() == cst(2026, 12, 5, 12)


def test_second_intervention_request_is_out_of_state(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("intervention.requested", cst(2026, 11, 3, 10))
    out = driver.send("intervention.requested", cst(2026, 11, 3, 11))
    assert not out.applied and out.problem is not None
    assert out.problem.startswith("out_of_state:")
