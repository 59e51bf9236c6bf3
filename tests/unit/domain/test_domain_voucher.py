"""Local-life vouchers (卡券), Kuaishou rules effective 2022-12-22 (seed 004)."""

from __future__ import annotations

from domain_support import Driver, cst

from shared.domain import RuleRef

OPENED = cst(2026, 11, 2, 10)


def test_voucher_unused_is_approved_immediately_on_case_opened(driver: Driver) -> None:
    out = driver.open("voucher_refund", OPENED, amount_fen=9900)
    assert [d.type for d in out.decisions] == ["decision.auto_approved"]
    decision = out.decisions[0]
    assert decision.rule == RuleRef("kuaishou", "2022-12-22", "voucher_refund.refund_request")
    assert decision.data["refund_fen"] == 9900 and decision.due_at == OPENED
    assert driver.step == "refund_pending"
    # money back within 7 working days
    assert driver.deadline.rule == RuleRef("kuaishou", "2022-12-22",
                                           "voucher_refund.refund_pending")
    assert driver.due_local() == cst(2026, 11, 11, 10)
    assert "buyer" in {n.party for n in out.notices}


def test_voucher_partly_used_refunds_pro_rata_floored_to_the_fen(driver: Driver) -> None:
    out = driver.open("voucher_refund", OPENED, amount_fen=10000, voucher_total_count=3,
                      voucher_used_count=1)
    assert out.decisions[0].data["refund_fen"] == 6666  # 6666.67 floored
    assert driver.case is not None and driver.case.refund_fen == 6666


def test_voucher_used_by_value(driver: Driver) -> None:
    driver.open("voucher_refund", OPENED, amount_fen=10000, used_fen=2501)
    assert driver.case is not None and driver.case.refund_fen == 7499


def test_voucher_fully_used_closes_with_nothing_to_refund(driver: Driver) -> None:
    out = driver.open("voucher_refund", OPENED, amount_fen=10000, voucher_total_count=2,
                      voucher_used_count=2)
    assert driver.case is not None and driver.case.resolution == "nothing_to_refund"
    assert out.decisions == () and out.deadlines == ()


def test_voucher_used_count_above_total_is_invalid(driver: Driver) -> None:
    out = driver.open("voucher_refund", OPENED, voucher_total_count=2, voucher_used_count=3)
    assert not out.applied and out.case is None
    assert out.problem is not None and out.problem.startswith("invalid:")


def test_voucher_expired_auto_refund_initiated_within_24h(driver: Driver) -> None:
    out = driver.send("voucher.expired", cst(2026, 11, 30, 0), amount_fen=5000,
                      voucher_total_count=2, voucher_used_count=1)
    assert out.applied and driver.step == "expiry_refund"
    assert driver.due_local() == cst(2026, 12, 1, 0)
    fired = driver.fire()
    assert fired.decisions[0].type == "decision.auto_refunded"
    assert fired.decisions[0].data["refund_fen"] == 2500
    assert driver.step == "refund_pending"


def test_voucher_expired_refunded_by_the_platform_first(driver: Driver) -> None:
    driver.send("voucher.expired", cst(2026, 11, 30, 0), amount_fen=5000)
    driver.send("refund.completed", cst(2026, 11, 30, 6), amount_fen=5000)
    assert driver.case is not None and driver.case.resolution == "refunded"


def test_voucher_rules_before_2022_12_22_fall_back_to_default(driver: Driver) -> None:
    driver.open("voucher_refund", cst(2022, 12, 21, 23, 59))
    assert driver.case is not None
    assert driver.last is not None
    assert driver.last.decisions[0].rule.set == "default"
    driver2 = Driver(driver.engine)
    driver2.open("voucher_refund", cst(2022, 12, 22, 0, 0))
    assert driver2.last is not None
    assert driver2.last.decisions[0].rule == RuleRef("kuaishou", "2022-12-22",
                                                     "voucher_refund.refund_request")
