"""A buyer's satisfaction rating after the after-sales case is finished (seeds 000, 001,
003: 完成售后处理后, 可以对商家进行评价).

`buyer.rated` (data: `rating` 1..5, `comment` optional) is the one event a closed case
takes: it changes no step and no deadline, and is kept in `data.buyer_rating`; intake
counts it per platform, kind and rating (`aftersales_buyer_ratings_total`). On an open
case it does not fit yet; a second rating does not replace the first.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from shared.domain.model import Case, Event, Outcome
from shared.domain.timeutil import as_utc

RATED = "buyer.rated"
RATINGS = range(1, 6)


def rate(case: Case, event: Event, now: datetime) -> Outcome:
    rating = event.data.get("rating")
    if type(rating) is not int or rating not in RATINGS:
        return _refused(case, f"invalid: buyer.rated needs data.rating 1..5, got {rating!r}")
    if case.is_open:
        return _refused(case, f"out_of_state: buyer.rated while the case is still open "
                              f"(step {case.step}): a rating follows completion")
    if "buyer_rating" in case.data:
        return _refused(case, "out_of_state: buyer.rated: the case is already rated")
    rated = {"rating": rating, "at": as_utc(event.occurred_at).isoformat()}
    if isinstance(event.data.get("comment"), str):
        rated["comment"] = event.data["comment"][:500]
    return Outcome(case=replace(case, version=case.version + 1,
                                data={**case.data, "buyer_rating": rated}),
                   applied=True, problem=None, deadlines=None)


def _refused(case: Case, problem: str) -> Outcome:
    return Outcome(case=case, applied=False, problem=problem, deadlines=None)
