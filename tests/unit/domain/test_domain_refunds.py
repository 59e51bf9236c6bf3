"""Refund only (仅退款) and return & refund (退货退款): the *default* rule set."""

from __future__ import annotations

from datetime import timedelta

from domain_support import Driver, cst

from shared.domain import RuleRef

OPENED = cst(2026, 11, 2, 10)


def test_refund_only_merchant_48h_default_then_auto_approve_and_refund(driver: Driver) -> None:
    driver.open("refund_only", OPENED, amount_fen=4990)
    # kuaishou has no refund_only rule: the default set applies
    assert driver.deadline.rule == RuleRef("default", "1", "any.merchant_response")
    assert driver.due_local() == cst(2026, 11, 4, 10)
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_approved"
    assert out.decisions[0].data["refund_fen"] == 4990
    assert driver.step == "refund_pending"
    assert driver.case is not None and driver.case.refund_fen == 4990


def test_refund_pending_7_working_days_then_escalate(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))  # Monday
    assert driver.due_local() == cst(2026, 11, 11, 12)  # 7 working days: next Wednesday
    out = driver.fire()
    assert out.decisions[0].type == "decision.escalated"
    assert driver.step == "intervention"


def test_refund_completed_closes_as_refunded(driver: Driver) -> None:
    driver.open("refund_only", OPENED, amount_fen=4990)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    out = driver.send("refund.completed", cst(2026, 11, 3, 12), amount_fen=4990)
    assert driver.case is not None and driver.case.resolution == "refunded"
    assert driver.case.refund_fen == 4990
    assert [n.party for n in out.notices] == ["buyer"]


def test_refund_only_merchant_may_refund_directly(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    driver.send("refund.completed", cst(2026, 11, 2, 12))
    assert driver.case is not None and driver.case.resolution == "refunded"


def test_return_refund_buyer_ships_within_10_days_default_else_auto_close(driver: Driver) -> None:
    driver.open("return_refund", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    assert driver.deadline.rule == RuleRef("default", "1", "any.buyer_return_shipping")
    assert driver.due_local() == cst(2026, 11, 12, 12)
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_closed"
    assert driver.case is not None and driver.case.resolution == "auto_closed"


def test_return_refund_merchant_refunds_within_7_days_of_sign_off_else_auto_refund(
    driver: Driver,
) -> None:
    driver.open("return_refund", OPENED, amount_fen=12345)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("buyer.shipped", cst(2026, 11, 3, 12))
    driver.send("merchant.received", cst(2026, 11, 5, 8))
    assert driver.step == "merchant_inspection"
    assert driver.due_local() == cst(2026, 11, 12, 8)
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_refunded"
    assert out.decisions[0].data["refund_fen"] == 12345
    assert driver.step == "refund_pending"


def test_return_in_transit_15_days_default_then_escalate(driver: Driver) -> None:
    driver.open("return_refund", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("buyer.shipped", cst(2026, 11, 3, 12))
    assert driver.due_local() == cst(2026, 11, 18, 12)
    out = driver.fire()
    assert out.decisions[0].type == "decision.escalated"


def test_late_merchant_action_is_applied_but_not_met(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    # the timer has not fired yet when the (late) approval arrives
    out = driver.send("merchant.approved", OPENED + timedelta(hours=50))
    assert out.applied and out.steps[0].met is False
