"""Platform sets from the seeds, and per-shop policies: chosen by shop_id, versioned by
effective date, never looser than the platform rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from domain_support import cst, make_event, opened

from shared.domain import DeadlineSpec, Engine, Kind, RuleBook, RuleFileError, WorkCalendar

AT = datetime(2026, 11, 2, tzinfo=UTC)


def test_douyin_set_follows_seed_001_and_says_which_values_are_sourced() -> None:
    book = RuleBook.load(None)
    review = book.rule_for("douyin", Kind.refund_only, "merchant_response", AT)
    refund = book.rule_for("douyin", Kind.return_refund, "refund_pending", AT)
    assert review is not None and (review.set_name, review.duration.text) == ("douyin", "3wd")
    assert "duration" in review.sourced and "on_timeout" not in review.sourced
    assert refund is not None and (refund.duration.text, refund.sourced) == ("7wd",
                                                                            ("duration",))
    for platform in ("taobao", "pinduoduo", "jd", "wechat"):
        rule = book.rule_for(platform, Kind.exchange, "merchant_response", AT)
        assert rule is not None and rule.set_name == platform and rule.sourced == ()


POLICY = """[shop_policy]
platform = "douyin"
shop_id = "S1001"
version = "{version}"
effective = {effective}
source = "店铺售后承诺"

[[rule]]
kind = "any"
step = "merchant_response"
duration = "{duration}"
"""


def _policies(tmp_path: Path, *files: tuple[str, str, str]) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    for version, effective, duration in files:
        (folder / f"shop-{version}.toml").write_text(
            POLICY.format(version=version, effective=effective, duration=duration))
    return folder


def test_a_shop_policy_shortens_its_platform_rule_for_its_shop_only(tmp_path: Path) -> None:
    book = RuleBook.load(_policies(tmp_path, ("v1", "2026-01-01", "24h")))
    mine = book.rule_for("douyin", Kind.refund_only, "merchant_response", AT, shop="S1001")
    other = book.rule_for("douyin", Kind.refund_only, "merchant_response", AT, shop="S2")
    same_id_elsewhere = book.rule_for("taobao", Kind.refund_only, "merchant_response", AT,
                                      shop="S1001")
    assert mine is not None and other is not None and same_id_elsewhere is not None
    assert (mine.set_name, mine.version, mine.duration.text) == ("shop:douyin:S1001", "v1",
                                                                 "24h")
    assert mine.id == "douyin/2024-08-22/any.merchant_response"
    assert (mine.party, mine.on_timeout) == (other.party, other.on_timeout)
    assert mine.reminders == tuple(r for r in other.reminders if r.text != "24h")  # fit only
    assert other.set_name == "douyin" and same_id_elsewhere.set_name == "taobao"
    assert book.get(mine.ref) == mine  # the resolver finds it again by its reference


def test_shop_policy_versions_follow_the_step_start(tmp_path: Path) -> None:
    book = RuleBook.load(_policies(tmp_path, ("v1", "2026-01-01", "24h"),
                                   ("v2", "2026-12-01", "12h")))
    engine = Engine(book, WorkCalendar())

    def deadline_of_case_opened(at: datetime) -> DeadlineSpec:
        event = replace(make_event("case.opened", at, platform="douyin",
                                   **opened("refund_only")), shop_id="S1001")
        specs = engine.apply(None, event, at).deadlines or ()
        return next(d for d in specs if d.purpose == "deadline")

    before = deadline_of_case_opened(cst(2026, 11, 30, 10))
    after = deadline_of_case_opened(cst(2026, 12, 1, 10))
    assert (before.rule.version, before.due_at) == ("v1", cst(2026, 12, 1, 10))
    assert (after.rule.version, after.due_at) == ("v2", cst(2026, 12, 1, 22))


@pytest.mark.parametrize("duration", ["4wd", "73h", "4d"])
def test_a_shop_policy_looser_than_the_platform_is_refused(tmp_path: Path,
                                                          duration: str) -> None:
    folder = _policies(tmp_path, ("v1", "2026-01-01", duration))
    with pytest.raises(RuleFileError) as info:
        RuleBook.load(folder)
    assert str(info.value).startswith(f"{folder / 'shop-v1.toml'}:8: shop S1001 promises")
    assert "looser than the platform rule douyin/2024-08-22/any.merchant_response" in str(
        info.value)


def test_never_looser_holds_against_a_later_platform_version(tmp_path: Path) -> None:
    folder = _policies(tmp_path, ("v1", "2026-01-01", "3d"))
    (folder / "douyin-next.toml").write_text(
        (Path(__file__).resolve().parents[3] / "shared" / "rules" / "douyin-2024-08-22.toml")
        .read_text(encoding="utf-8")
        .replace('version = "2024-08-22"', 'version = "2027-01-01"')
        .replace("effective = 2024-08-22", "effective = 2027-01-01")
        .replace('duration = "3wd"', 'duration = "48h"'))
    with pytest.raises(RuleFileError, match="looser than the platform rule douyin/2027-01-01"):
        RuleBook.load(folder)


def test_three_calendar_days_are_never_looser_than_three_working_days(tmp_path: Path) -> None:
    book = RuleBook.load(_policies(tmp_path, ("v1", "2026-01-01", "3d")))
    rule = book.rule_for("douyin", Kind.exchange, "merchant_response", AT, shop="S1001")
    assert rule is not None and rule.duration.text == "3d"
