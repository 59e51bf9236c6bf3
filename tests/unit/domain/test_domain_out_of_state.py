"""Events that do not fit the state are reported, never applied, never raised."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from domain_support import Driver, cst, make_event

from shared.domain import Engine, facts_of

OPENED = cst(2026, 11, 2, 10)


def test_event_before_case_opened(engine: Engine) -> None:
    out = engine.apply(None, make_event("merchant.approved", OPENED), OPENED)
    assert not out.applied and out.case is None
    assert out.problem is not None and out.problem.startswith("out_of_state:")


def test_out_of_order_event_leaves_the_case_unchanged(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    before = driver.case
    out = driver.send("buyer.shipped", OPENED + timedelta(hours=1))
    assert not out.applied and facts_of(out.case) == facts_of(before) and out.deadlines is None
    assert out.problem == ("out_of_state: buyer.shipped does not fit a exchange case in step "
                           "merchant_response")


def test_late_approval_after_the_auto_approval(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.fire()
    out = driver.send("merchant.approved", OPENED + timedelta(hours=47))
    assert not out.applied and out.problem is not None
    assert "buyer_return_shipping" in out.problem


def test_step_the_kind_does_not_have(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    out = driver.send("repair.scheduled", OPENED + timedelta(hours=1),
                      visit_at="2026-11-03T10:00:00+08:00")
    assert not out.applied and out.problem is not None
    assert out.problem.startswith("out_of_state:")


def test_any_event_on_a_closed_case(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("buyer.cancelled", OPENED + timedelta(hours=1))
    out = driver.send("buyer.cancelled", OPENED + timedelta(hours=2))
    assert not out.applied and out.problem is not None and "closed" in out.problem


def test_second_case_opened_is_out_of_state(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    out = driver.send("case.opened", OPENED + timedelta(hours=1), kind="exchange", amount_fen=1)
    assert not out.applied and out.problem is not None
    assert out.problem.startswith("out_of_state:")


@pytest.mark.parametrize("data", [
    {"kind": "teleport", "amount_fen": 100},
    {"kind": "exchange", "amount_fen": -1},
    {"kind": "exchange", "amount_fen": 1.5},
    {"kind": "exchange"},
])
def test_bad_case_opened_data_is_invalid(engine: Engine, data: dict[str, Any]) -> None:
    out = engine.apply(None, make_event("case.opened", OPENED, **data), OPENED)
    assert not out.applied and out.problem is not None and out.problem.startswith("invalid:")


def test_voucher_expired_cannot_open_another_kind(engine: Engine) -> None:
    out = engine.apply(None, make_event("voucher.expired", OPENED, kind="exchange",
                                        amount_fen=1), OPENED)
    assert out.problem is not None and out.problem.startswith("invalid:")


def test_inspection_without_passed_is_invalid(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", OPENED)
    driver.send("buyer.shipped", OPENED)
    driver.send("merchant.received", OPENED)
    out = driver.send("merchant.inspected", OPENED)
    assert out.problem == "invalid: merchant.inspected needs data.passed true or false"


def test_several_cases_on_one_order_are_independent(engine: Engine) -> None:
    first = engine.apply(None, make_event("case.opened", OPENED, case_id="AS1",
                                          kind="exchange", amount_fen=100), OPENED)
    second = engine.apply(None, make_event("case.opened", OPENED, case_id="AS2",
                                           kind="refund_only", amount_fen=50), OPENED)
    assert first.case is not None and second.case is not None
    approved = engine.apply(first.case, make_event("merchant.approved", OPENED, case_id="AS1"),
                            OPENED)
    assert approved.case is not None and approved.case.step == "buyer_return_shipping"
    assert second.case.step == "merchant_response"
    assert {d.case_id for d in second.deadlines or ()} == {"AS2"}


def test_an_event_for_another_case_is_a_programming_error(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    with pytest.raises(ValueError, match="AS9"):
        driver.engine.apply(driver.case, make_event("merchant.approved", OPENED, case_id="AS9"),
                            OPENED)


def test_event_with_skewed_clock_never_ends_a_step_before_it_began(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    out = driver.send("merchant.approved", OPENED - timedelta(hours=1))
    assert out.applied and out.steps[0].seconds == 0
    assert driver.case is not None and driver.case.step_started_at == OPENED
