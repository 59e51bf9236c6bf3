"""The platform acted first (issue 20): a platform message saying the platform's own timer
took the step's action ends our deadline without a decision of ours; `deadline.changed`
naming another step than the case's does not move the current step's deadline."""

from __future__ import annotations

from domain_support import Driver, cst

OPENED = cst(2026, 11, 2, 10)


def test_platform_auto_close_ends_the_step_as_missed_without_a_decision(driver: Driver) -> None:
    driver.open("return_refund", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 11))
    assert driver.step == "buyer_return_shipping"
    out = driver.send("buyer.cancelled", cst(2026, 11, 12, 11), actor="platform")
    assert out.applied and driver.case is not None
    assert driver.case.resolution == "closed_by_platform"
    assert out.deadlines == ()  # our pending deadline (and reminders) for the step is gone
    assert out.decisions == ()  # and no decision of ours
    assert [(s.step, s.met) for s in out.steps] == [("buyer_return_shipping", False)]
    assert out.notices == ()  # not "the buyer cancelled": the platform told both sides


def test_buyer_cancelling_is_still_a_cancellation(driver: Driver) -> None:
    driver.open("return_refund", OPENED)
    out = driver.send("buyer.cancelled", cst(2026, 11, 2, 11), actor="buyer")
    assert driver.case is not None and driver.case.resolution == "cancelled"
    assert out.steps == () and [n.party for n in out.notices] == ["merchant"]


def test_platform_auto_agree_moves_on_and_counts_the_merchant_as_late(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    # in time by the clock, but the platform says its timer acted: the merchant missed it
    out = driver.send("merchant.approved", cst(2026, 11, 2, 12), actor="platform")
    assert driver.step == "refund_pending" and out.decisions == ()
    assert [(s.step, s.met) for s in out.steps] == [("merchant_response", False)]
    driver2 = Driver(driver.engine)
    driver2.open("refund_only", OPENED)
    out2 = driver2.send("merchant.approved", cst(2026, 11, 2, 12), actor="merchant")
    assert [(s.step, s.met) for s in out2.steps] == [("merchant_response", True)]


def test_our_decision_first_then_the_platforms_message_is_recorded_not_applied(
        driver: Driver) -> None:
    driver.open("return_refund", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 11))
    fired = driver.fire()
    assert fired.decisions[0].type == "decision.auto_closed"
    late = driver.send("buyer.cancelled", cst(2026, 11, 12, 12), actor="platform")
    assert not late.applied and late.problem is not None
    assert late.problem.startswith("out_of_state") and late.decisions == ()


def test_deadline_changed_for_the_current_step_moves_it(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    new_due = cst(2026, 11, 3, 18)
    out = driver.send("deadline.changed", cst(2026, 11, 2, 11), due_at=new_due,
                      step="merchant_response")
    assert out.applied and driver.due_local() == new_due


def test_deadline_changed_for_another_step_is_not_applied(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    before = driver.due_local()
    out = driver.send("deadline.changed", cst(2026, 11, 2, 11), due_at=cst(2026, 11, 9),
                      step="buyer_return_shipping")
    assert not out.applied and out.problem is not None
    assert "buyer_return_shipping" in out.problem
    assert driver.due_local() == before
