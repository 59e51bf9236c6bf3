"""Years without official holiday data: working days come from an estimate, never an
exception, and every deadline computed on it says so."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import chinese_calendar
import holidays
import pytest
from domain_support import Driver, cst

from shared.domain import Engine, RuleBook, WorkCalendar
from shared.domain.calendar import ESTIMATED, FILE, LIBRARY, deadline_calendar
from shared.domain.recompute import recount


def _days(year: int) -> list[date]:
    start = date(year, 1, 1)
    return [start + timedelta(days=n) for n in range((date(year + 1, 1, 1) - start).days)]


@pytest.mark.parametrize("year", [2024, 2025, 2026])
def test_the_estimate_agrees_with_chinese_calendar_on_every_day(year: int) -> None:
    # The estimating package, asked about years with a published schedule, must give the
    # same working days as the library the project trusts: else its estimates are suspect.
    estimate = holidays.country_holidays("CN", years=year)
    differ = [d for d in _days(year)
              if bool(estimate.is_working_day(d)) != chinese_calendar.is_workday(d)]
    assert differ == []


def test_a_year_nobody_publishes_is_estimated_and_never_raises() -> None:
    calendar = WorkCalendar()
    assert calendar.year_source(2026) == LIBRARY
    assert calendar.year_source(2031) == ESTIMATED
    # statutory holidays at their expected dates: New Year, Spring Festival (lunar new
    # year 2031-01-23), Labour Day, National Day; weekends off
    assert not calendar.is_workday(date(2031, 1, 1))
    assert not calendar.is_workday(date(2031, 1, 23))
    assert not calendar.is_workday(date(2031, 5, 1))
    assert not calendar.is_workday(date(2031, 10, 1))
    assert not calendar.is_workday(date(2031, 3, 8))  # a Saturday
    assert calendar.is_workday(date(2031, 3, 10))  # an ordinary Monday
    info = calendar.year_info(2031)
    assert info.source == ESTIMATED
    assert info.makeup_workdays == 0  # no make-up days are guessed
    assert info.holidays_off >= 11  # the 11 statutory days, some moved off weekends


def test_seven_working_days_from_2026_12_23_reach_into_the_estimated_2027() -> None:
    calendar = WorkCalendar()
    start = cst(2026, 12, 23, 10)
    # 12-24, 25, 28, 29, 30, 31; 2027-01-01 is New Year's Day (estimated); then Monday 01-04
    due = calendar.add_workdays(start, 7)
    assert due == cst(2027, 1, 4, 10)
    assert calendar.span_basis(start, due) == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2027]}
    assert calendar.span_basis(cst(2026, 12, 1, 10), cst(2026, 12, 10, 10)) == {
        "source": LIBRARY, "estimated": False}


def test_a_holiday_file_makes_the_year_official(tmp_path: Path) -> None:
    holiday_file = tmp_path / "h.toml"
    holiday_file.write_text("[2027]\nholidays = [2027-01-01]\nworkdays = [2027-01-02]\n")
    calendar = WorkCalendar(holiday_file)
    assert calendar.year_source(2027) == FILE
    assert calendar.covered_until(date(2026, 11, 27)) == date(2027, 12, 31)
    assert WorkCalendar().covered_until(date(2026, 11, 27)) == date(2026, 12, 31)
    start = cst(2026, 12, 23, 10)
    # with the make-up Saturday 01-02 counted, the 7th working day is that Saturday
    due = calendar.add_workdays(start, 7)
    assert due == cst(2027, 1, 2, 10)
    assert calendar.span_basis(start, due) == {"source": FILE, "estimated": False}


def test_a_deadline_on_estimated_data_says_so_in_spec_and_decision() -> None:
    driver = Driver(Engine(RuleBook.load(None), WorkCalendar()))
    driver.open("refund_only", cst(2026, 12, 22, 9))
    assert driver.deadline.calendar is None  # 48 h: no calendar involved
    driver.send("merchant.approved", cst(2026, 12, 23, 10))
    assert driver.case is not None and driver.case.step == "refund_pending"
    assert driver.deadline.due_at == cst(2027, 1, 4, 10)
    assert driver.deadline.calendar == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2027]}
    assert deadline_calendar(driver.case.data) == driver.deadline.calendar
    outcome = driver.fire()
    (decision,) = outcome.decisions
    assert decision.data["calendar"]["estimated"] is True


def test_a_platform_deadline_has_no_calendar_info() -> None:
    driver = Driver(Engine(RuleBook.load(None), WorkCalendar()))
    driver.open("refund_only", cst(2026, 12, 22, 9))
    driver.send("merchant.approved", cst(2026, 12, 23, 10))
    driver.send("deadline.changed", cst(2026, 12, 23, 11), due_at=cst(2026, 12, 30, 10))
    assert driver.deadline.due_at == cst(2026, 12, 30, 10)
    assert driver.deadline.calendar is None


def _estimated_refund_case() -> Driver:
    driver = Driver(Engine(RuleBook.load(None), WorkCalendar()))
    driver.open("refund_only", cst(2026, 12, 22, 9))
    driver.send("merchant.approved", cst(2026, 12, 23, 10))
    return driver


def test_official_data_recounts_an_estimated_deadline(tmp_path: Path) -> None:
    driver = _estimated_refund_case()
    case = driver.case
    assert case is not None
    # Still no official data: recounting changes nothing.
    assert recount(driver.engine, case, cst(2026, 12, 24, 8)) is None
    holiday_file = tmp_path / "h.toml"
    holiday_file.write_text("[2027]\nholidays = [2027-01-01]\nworkdays = [2027-01-02]\n")
    official = Engine(RuleBook.load(None), WorkCalendar(holiday_file))
    result = recount(official, case, cst(2026, 12, 24, 8))
    assert result is not None
    assert (result.old_due_at, result.new_due_at) == (cst(2027, 1, 4, 10), cst(2027, 1, 2, 10))
    assert result.case.version == case.version + 1
    (deadline,) = result.outcome.deadlines or ()
    assert (deadline.due_at, deadline.fence) == (cst(2027, 1, 2, 10), case.version + 1)
    assert deadline.calendar == {"source": FILE, "estimated": False}
    assert result.note()["old_source"] == ESTIMATED and result.note()["shift_s"] == -2 * 86400
    # once official, a second recount has nothing to do
    assert recount(official, result.case, cst(2026, 12, 24, 9)) is None


def test_recount_keeps_the_shift_of_a_paused_and_resumed_clock(tmp_path: Path) -> None:
    driver = _estimated_refund_case()
    driver.send("intervention.requested", cst(2026, 12, 24, 10), requested_by="buyer")
    driver.send("intervention.resolved", cst(2026, 12, 26, 10), outcome="resume")
    assert driver.deadline.due_at == cst(2027, 1, 6, 10)  # two days of pause added
    assert driver.deadline.calendar is not None and driver.deadline.calendar["estimated"]
    holiday_file = tmp_path / "h.toml"
    holiday_file.write_text("[2027]\nholidays = [2027-01-01]\nworkdays = [2027-01-02]\n")
    official = Engine(RuleBook.load(None), WorkCalendar(holiday_file))
    assert driver.case is not None
    result = recount(official, driver.case, cst(2026, 12, 27, 8))
    assert result is not None and result.new_due_at == cst(2027, 1, 4, 10)


def test_a_platform_deadline_is_never_recounted(tmp_path: Path) -> None:
    driver = _estimated_refund_case()
    driver.send("deadline.changed", cst(2026, 12, 23, 11), due_at=cst(2027, 1, 8, 10))
    holiday_file = tmp_path / "h.toml"
    holiday_file.write_text("[2027]\nholidays = [2027-01-01]\nworkdays = [2027-01-02]\n")
    official = Engine(RuleBook.load(None), WorkCalendar(holiday_file))
    assert driver.case is not None
    assert recount(official, driver.case, cst(2026, 12, 24, 8)) is None
