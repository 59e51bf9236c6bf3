"""Exchange (换货), Kuaishou rules effective 2022-09-30 (seed 004)."""

from __future__ import annotations

from datetime import timedelta

from domain_support import CHINA_TZ, Driver, cst

from shared.domain import RuleRef

OPENED = cst(2026, 11, 2, 10)  # a Monday, far from holidays


def test_exchange_merchant_48h_then_auto_approve(driver: Driver) -> None:
    out = driver.open("exchange", OPENED)
    assert driver.step == "merchant_response"
    assert driver.due_local() == cst(2026, 11, 4, 10)
    assert driver.deadline.action == "auto_approve"
    assert driver.deadline.rule == RuleRef("kuaishou", "2022-09-30", "exchange.merchant_response")
    assert [n.party for n in out.notices] == ["merchant"]

    fired = driver.fire(late=timedelta(minutes=3))
    assert [d.type for d in fired.decisions] == ["decision.auto_approved"]
    decision = fired.decisions[0]
    assert decision.due_at == cst(2026, 11, 4, 10)
    assert decision.rule.id == "exchange.merchant_response"
    assert decision.data["next_step"] == "buyer_return_shipping"
    assert driver.step == "buyer_return_shipping"
    assert fired.steps[0].step == "merchant_response" and fired.steps[0].met is False
    assert fired.notices[0].party == "merchant" and fired.notices[0].reason == decision.type


def test_exchange_merchant_approves_within_48h_is_met(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    out = driver.send("merchant.approved", OPENED + timedelta(hours=47))
    assert driver.step == "buyer_return_shipping"
    assert out.steps[0].met is True and out.steps[0].seconds == 47 * 3600
    assert out.decisions == ()


def test_exchange_buyer_ships_within_10_days_of_approval_else_auto_close(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    assert driver.due_local() == cst(2026, 11, 13, 9)
    assert driver.deadline.action == "auto_close"
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_closed"
    assert driver.case is not None
    assert driver.case.status == "closed" and driver.case.resolution == "auto_closed"
    assert driver.case.data["closed_at_step"] == "buyer_return_shipping"
    assert out.deadlines == ()


def test_exchange_buyer_return_window_starts_at_the_auto_approval(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.fire(late=timedelta(hours=5))  # a late timer must not shorten the buyer's 10 days
    assert driver.due_local() == cst(2026, 11, 14, 10)


def test_exchange_inspection_within_7_days_of_sign_off_else_deemed_passed(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    driver.send("buyer.shipped", cst(2026, 11, 4, 9), carrier="SF", tracking_no="SF1")
    assert driver.step == "return_in_transit"
    driver.send("merchant.received", cst(2026, 11, 6, 15))
    assert driver.step == "merchant_inspection"
    assert driver.due_local() == cst(2026, 11, 13, 15)
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_approved"
    assert driver.step == "merchant_reship"


def test_exchange_buyer_confirms_within_10_days_else_auto_confirm(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    driver.send("buyer.shipped", cst(2026, 11, 4, 9))
    driver.send("merchant.received", cst(2026, 11, 6, 15))
    driver.send("merchant.inspected", cst(2026, 11, 7, 15), passed=True)
    driver.send("merchant.reshipped", cst(2026, 11, 8, 12), carrier="SF", tracking_no="SF2")
    assert driver.step == "replacement_in_transit"
    # seed 004: 签收换货后10天 - the buyer's 10 days count from the sign-off
    out = driver.send("buyer.received", cst(2026, 11, 10, 18))
    assert [n.party for n in out.notices] == ["merchant"]
    assert driver.step == "buyer_confirm"
    assert driver.due_local() == cst(2026, 11, 20, 18)
    out = driver.fire()
    assert out.decisions[0].type == "decision.auto_confirmed"
    assert driver.case is not None and driver.case.resolution == "completed"


def test_exchange_without_sign_off_is_deemed_received_after_15_days(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    driver.send("buyer.shipped", cst(2026, 11, 4, 9))
    driver.send("merchant.received", cst(2026, 11, 6, 15))
    driver.send("merchant.reshipped", cst(2026, 11, 8, 12))
    assert driver.due_local() == cst(2026, 11, 23, 12)  # the documented fallback
    assert driver.reminders == []
    out = driver.fire()
    assert [d.type for d in out.decisions] == ["decision.deemed_received"]
    assert out.decisions[0].data["next_step"] == "buyer_confirm"
    assert driver.step == "buyer_confirm"
    assert driver.due_local() == cst(2026, 12, 3, 12)  # then the buyer's 10 days


def test_exchange_full_happy_path_records_facts(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    driver.send("buyer.shipped", cst(2026, 11, 4, 9), carrier="SF", tracking_no="SF1")
    driver.send("merchant.received", cst(2026, 11, 6, 15))
    driver.send("merchant.inspected", cst(2026, 11, 7, 15), passed=True)
    driver.send("merchant.reshipped", cst(2026, 11, 8, 12), tracking_no="SF2")
    out = driver.send("buyer.confirmed", cst(2026, 11, 9, 12))
    case = driver.case
    assert case is not None and case.status == "closed" and case.resolution == "completed"
    assert case.data["return_tracking_no"] == "SF1" and case.data["reship_tracking_no"] == "SF2"
    assert case.closed_at == cst(2026, 11, 9, 12)
    assert out.deadlines == () and out.steps[0].met is True
    assert case.version == 7  # one version per applied change


def test_exchange_failed_inspection_is_a_rejection(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    driver.send("buyer.shipped", cst(2026, 11, 4, 9))
    driver.send("merchant.received", cst(2026, 11, 6, 15))
    out = driver.send("merchant.inspected", cst(2026, 11, 7, 15), passed=False, reason="used")
    assert driver.step == "buyer_after_rejection"
    assert driver.case is not None and driver.case.data["rejected_at_step"] == "merchant_inspection"
    assert [n.party for n in out.notices] == ["buyer"]


def test_exchange_merchant_reship_48h_default_then_escalate(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    driver.send("buyer.shipped", cst(2026, 11, 4, 9))
    driver.send("merchant.received", cst(2026, 11, 6, 15))
    driver.send("merchant.inspected", cst(2026, 11, 7, 15), passed=True)
    assert driver.deadline.rule == RuleRef("default", "1", "exchange.merchant_reship")
    out = driver.fire()
    assert out.decisions[0].type == "decision.escalated"
    assert out.notices[0].party == "ops" and out.notices[0].urgent is True
    assert driver.step == "intervention" and out.deadlines == ()


def test_times_are_stored_in_utc(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    assert driver.case is not None
    assert driver.case.step_due_at is not None
    assert driver.case.step_due_at.utcoffset() == timedelta(0)
    assert driver.case.step_due_at.astimezone(CHINA_TZ).hour == 10
