"""The rest of the seeds' rules: a rejection needs evidence where the set says so (seed
004), and a request after the after-sales window is flagged (seed 000)."""

from __future__ import annotations

from datetime import datetime, timedelta

from domain_support import Driver, cst

from shared.domain import Engine


def test_kuaishou_rejection_without_evidence_does_not_fit_and_the_step_goes_on(
    engine: Engine,
) -> None:
    driver = Driver(engine, platform="kuaishou")
    driver.open("exchange", cst(2026, 11, 2, 10))
    deadline = driver.deadline
    outcome = driver.send("merchant.rejected", cst(2026, 11, 2, 12), reason="用过了")
    assert not outcome.applied
    assert outcome.problem is not None and outcome.problem.startswith(
        "out_of_state: merchant.rejected without evidence")
    assert driver.case is not None and driver.case.step == "merchant_response"
    assert driver.deadline == deadline  # the merchant's clock runs on
    fired = driver.fire()
    assert [d.type for d in fired.decisions] == ["decision.auto_approved"]


def test_kuaishou_rejection_with_evidence_is_applied(engine: Engine) -> None:
    driver = Driver(engine, platform="kuaishou")
    driver.open("exchange", cst(2026, 11, 2, 10))
    outcome = driver.send("merchant.rejected", cst(2026, 11, 2, 12), reason="用过了",
                          evidence=["https://img/r.jpg"])
    assert outcome.applied and driver.case is not None
    assert driver.case.step == "buyer_after_rejection"


def test_a_set_without_the_requirement_takes_a_bare_rejection(engine: Engine) -> None:
    driver = Driver(engine, platform="taobao")
    driver.open("exchange", cst(2026, 11, 2, 10))
    assert driver.send("merchant.rejected", cst(2026, 11, 2, 12), reason="x").applied


def test_a_request_after_the_window_is_flagged_not_refused(engine: Engine) -> None:
    opened_at = cst(2026, 11, 20, 10)
    late = Driver(engine, platform="kuaishou")
    outcome = late.open("exchange", opened_at,
                        purchased_at=(opened_at - timedelta(days=8)).isoformat())
    assert outcome.applied and late.case is not None
    flag = late.case.data["outside_window"]
    assert (flag["window"], flag["late_by_s"]) == ("7d", 86400)
    assert datetime.fromisoformat(flag["purchased_at"]) == opened_at - timedelta(days=8)
    assert late.case.step == "merchant_response"  # the platform accepted it: it runs
    in_time = Driver(engine, platform="kuaishou")
    in_time.open("exchange", opened_at, purchased_at=(opened_at - timedelta(days=7)).isoformat())
    assert in_time.case is not None and "outside_window" not in in_time.case.data
    elsewhere = Driver(engine, platform="taobao")  # no window in its set: nothing to flag
    elsewhere.open("exchange", opened_at,
                   purchased_at=(opened_at - timedelta(days=30)).isoformat())
    assert elsewhere.case is not None and "outside_window" not in elsewhere.case.data


def test_a_buyer_rates_a_finished_case_once(engine: Engine) -> None:
    driver = Driver(engine, platform="douyin")
    driver.open("refund_only", cst(2026, 11, 2, 10))
    early = driver.send("buyer.rated", cst(2026, 11, 2, 11), rating=5)
    assert not early.applied and early.problem is not None
    assert early.problem.startswith("out_of_state: buyer.rated while the case is still open")
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("refund.completed", cst(2026, 11, 3, 12), amount_fen=10000)
    assert driver.case is not None and not driver.case.is_open
    version = driver.case.version
    rated = driver.send("buyer.rated", cst(2026, 11, 4, 9), rating=2, comment="太慢了")
    assert rated.applied and not rated.deadlines and not rated.decisions
    assert driver.case.data["buyer_rating"]["rating"] == 2
    assert driver.case.version == version + 1 and driver.case.resolution == "refunded"
    again = driver.send("buyer.rated", cst(2026, 11, 4, 10), rating=5)
    assert not again.applied and "already rated" in (again.problem or "")
    bad = Driver(engine)
    bad.open("refund_only", cst(2026, 11, 2, 10))
    bad.send("buyer.cancelled", cst(2026, 11, 2, 11))
    assert bad.send("buyer.rated", cst(2026, 11, 2, 12), rating=9).problem == (
        "invalid: buyer.rated needs data.rating 1..5, got 9")
