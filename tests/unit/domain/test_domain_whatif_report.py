"""The what-if report's counts (shared/domain/whatif.py): cases moved earlier and later,
by how much, and the decisions ahead of each (survivors of its mutation run)."""

from __future__ import annotations

from datetime import timedelta

from domain_support import Driver, cst

from shared.domain import Engine
from shared.domain.whatif import CaseComparison, Projected, WhatIfReport, project

NOW = cst(2026, 11, 2, 12)


def comparison(engine: Engine, shift_hours: float) -> CaseComparison:
    driver = Driver(engine)
    driver.open("refund_only", cst(2026, 11, 2, 10))
    assert driver.case is not None
    due = driver.deadline.due_at
    return CaseComparison(driver.case, due, due + timedelta(hours=shift_hours), (), ())


def test_the_report_counts_each_case_once_by_the_way_its_deadline_moves(
    engine: Engine,
) -> None:
    report = WhatIfReport(now=NOW)
    for hours in (-48, -24, 0, 24, 72, 72, 96):
        report.add(comparison(engine, hours))
    assert (report.compared, report.earlier, report.later) == (7, 2, 4)
    assert (report.max_earlier_s, report.max_later_s) == (48 * 3600, 96 * 3600)
    assert report.shifts_days == {-2: 1, -1: 1, 1: 1, 3: 2, 4: 1}
    # the first five moved cases, no more; the unmoved one is no example
    assert [e["due_after"] for e in report.examples] == [
        (comparison(engine, 0).old_due + timedelta(hours=h)).isoformat()
        for h in (-48, -24, 24, 72, 72)]


def test_the_decisions_ahead_are_counted_per_horizon(engine: Engine) -> None:
    driver = Driver(engine)
    driver.open("refund_only", cst(2026, 11, 2, 10))
    assert driver.case is not None
    soon = Projected(NOW + timedelta(hours=1), "decision.auto_approved", "merchant_response")
    later = Projected(NOW + timedelta(days=3), "decision.auto_refunded", "refund_pending")
    due = driver.deadline.due_at
    report = WhatIfReport(now=NOW)
    report.add(CaseComparison(driver.case, due, due, (soon, later), (soon,)))
    key = ("kuaishou", "refund_only")
    assert report.decisions == {
        ("24h", "before", *key, "merchant_response", "decision.auto_approved"): 1,
        ("7d", "before", *key, "merchant_response", "decision.auto_approved"): 1,
        ("7d", "before", *key, "refund_pending", "decision.auto_refunded"): 1,
        ("24h", "after", *key, "merchant_response", "decision.auto_approved"): 1,
        ("7d", "after", *key, "merchant_response", "decision.auto_approved"): 1,
    }


def test_projection_follows_the_chain_of_deadlines_up_to_the_horizon(engine: Engine) -> None:
    driver = Driver(engine)
    opened = cst(2026, 11, 2, 10)  # a Monday
    driver.open("return_refund", opened)
    assert driver.case is not None
    deadline = driver.deadline
    # nobody acts: approved at the merchant's deadline, then the buyer's return is missed
    everything = project(engine, driver.case, deadline, opened + timedelta(days=60))
    assert [(p.type, p.step) for p in everything] == [
        ("decision.auto_approved", "merchant_response"),
        ("decision.auto_closed", "buyer_return_shipping")]
    assert everything[0].at == deadline.due_at
    # a horizon ending exactly at the first deadline still sees it, not the next
    first = project(engine, driver.case, deadline, deadline.due_at)
    assert [p.step for p in first] == ["merchant_response"]
    assert project(engine, driver.case, deadline, deadline.due_at - timedelta(seconds=1)) == ()
