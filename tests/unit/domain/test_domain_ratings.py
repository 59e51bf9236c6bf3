"""`buyer.rated` on its own (shared/domain/ratings.py): what a rating keeps, and that a
refused one leaves the case as it was (survivors of its mutation run)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from domain_support import Driver, cst, make_event

from shared.domain import Case, Engine
from shared.domain.ratings import rate


def finished(engine: Engine) -> Case:
    driver = Driver(engine, platform="douyin")
    driver.open("refund_only", cst(2026, 11, 2, 10))
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("refund.completed", cst(2026, 11, 3, 12), amount_fen=10000)
    assert driver.case is not None and not driver.case.is_open
    return driver.case


def test_a_rating_keeps_its_value_its_time_and_its_comment_up_to_500_characters(
    engine: Engine,
) -> None:
    case = finished(engine)
    at = cst(2026, 11, 4, 9)
    out = rate(case, make_event("buyer.rated", at, rating=4, comment="好" * 600), at)
    assert out.applied is True and out.problem is None
    assert out.case is not None
    assert out.case.data["buyer_rating"] == {
        "rating": 4, "at": at.astimezone(UTC).isoformat(), "comment": "好" * 500}
    plain = rate(case, make_event("buyer.rated", at, rating=1), at)
    assert plain.case is not None
    assert plain.case.data["buyer_rating"] == {"rating": 1,
                                               "at": datetime(2026, 11, 4, 1, tzinfo=UTC)
                                               .isoformat()}


@pytest.mark.parametrize("rating", [0, 6, "5", None])
def test_an_invalid_rating_leaves_the_case_as_it_was(engine: Engine, rating: object) -> None:
    case = finished(engine)
    at = cst(2026, 11, 4, 9)
    out = rate(case, make_event("buyer.rated", at, rating=rating), at)
    assert out.applied is False and out.case is case
    assert out.problem == f"invalid: buyer.rated needs data.rating 1..5, got {rating!r}"


def test_a_rating_of_an_open_or_already_rated_case_leaves_it_as_it_was(
    engine: Engine,
) -> None:
    driver = Driver(engine)
    driver.open("refund_only", cst(2026, 11, 2, 10))
    assert driver.case is not None
    at = cst(2026, 11, 2, 11)
    early = rate(driver.case, make_event("buyer.rated", at, rating=5), at)
    assert early.applied is False and early.case is driver.case
    rated = rate(finished(engine), make_event("buyer.rated", at, rating=5), at).case
    assert rated is not None
    again = rate(rated, make_event("buyer.rated", at, rating=2), at)
    assert again.applied is False and again.case is rated
    assert again.problem == "out_of_state: buyer.rated: the case is already rated"
