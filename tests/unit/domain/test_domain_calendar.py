"""Chinese working days: chinese_calendar data, make-up workdays, the user holiday file."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from domain_support import cst

from shared.domain import HolidayFileError, WorkCalendar
from shared.domain.durations import Duration


@pytest.fixture(scope="module")
def calendar() -> WorkCalendar:
    return WorkCalendar()


def test_national_day_2026_per_chinese_calendar(calendar: WorkCalendar) -> None:
    # chinese_calendar 1.11: 10-01..10-07 off, Thursday 10-08 back, Saturday 10-10 make-up
    assert [calendar.is_workday(date(2026, 10, d)) for d in range(1, 12)] == [
        False, False, False, False, False, False, False, True, True, True, False]
    assert date(2026, 10, 10).weekday() == 5


def test_7_working_days_across_national_day_2026(calendar: WorkCalendar) -> None:
    # from Wed 09-30 10:00: 10-08, 10-09, 10-10 (make-up Saturday), 10-12, 10-13, 10-14, 10-15
    assert calendar.add_workdays(cst(2026, 9, 30, 10), 7) == cst(2026, 10, 15, 10)


def test_working_days_from_a_holiday_count_from_the_next_workday(calendar: WorkCalendar) -> None:
    assert calendar.add_workdays(cst(2026, 10, 3, 16, 30), 1) == cst(2026, 10, 8, 16, 30)
    assert calendar.add_workdays(cst(2026, 10, 3, 16, 30), 3) == cst(2026, 10, 10, 16, 30)


def test_working_days_use_the_china_local_date() -> None:
    # 2026-10-09 17:00 UTC is already Saturday 10-10 01:00 in China (a make-up workday)
    moment = cst(2026, 10, 10, 1)
    assert WorkCalendar().add_workdays(moment, 1) == cst(2026, 10, 12, 1)


def test_wd_duration_uses_the_calendar(calendar: WorkCalendar) -> None:
    assert Duration.parse("7wd").add_to(cst(2026, 9, 30, 10), calendar) == cst(2026, 10, 15, 10)
    assert Duration.parse("10d").add_to(cst(2026, 9, 30, 10), calendar) == cst(2026, 10, 10, 10)


def test_user_holiday_file_adds_a_year_and_wins(tmp_path: Path) -> None:
    holiday_file = tmp_path / "holidays.toml"
    holiday_file.write_text(
        "[2031]\nholidays = [2031-01-01]\nworkdays = [2031-01-04]\n"
        "[2026]\nholidays = [2026-10-09]\n",
        encoding="utf-8",
    )
    calendar = WorkCalendar(holiday_file)
    assert calendar.is_workday(date(2031, 1, 1)) is False  # Wednesday, listed holiday
    assert calendar.is_workday(date(2031, 1, 4)) is True  # Saturday, listed workday
    assert calendar.is_workday(date(2031, 1, 5)) is False  # Sunday, not listed
    assert calendar.is_workday(date(2031, 1, 6)) is True  # Monday, not listed
    assert calendar.is_workday(date(2026, 10, 9)) is False  # the user wins over the library
    assert calendar.is_workday(date(2026, 10, 10)) is True  # the library still fills the rest


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("[2031]\nholidays = [2032-01-01]\n", 1, "not a date in 2031"),
    ("[2031]\nholiday = []\n", 1, "unknown keys"),
    ("[year]\nholidays = []\n", 1, "a table per year"),
    ("[2031]\nholidays = [2031-01-01\n", 2, "Unclosed array"),
    ("[2031]\nholidays = [2031-01-01,,]\nworkdays = []\n", 2, "Invalid"),
])
def test_broken_holiday_file_names_file_and_line(tmp_path: Path, text: str, line: int,
                                                 reason: str) -> None:
    holiday_file = tmp_path / "holidays.toml"
    holiday_file.write_text(text, encoding="utf-8")
    with pytest.raises(HolidayFileError) as info:
        WorkCalendar(holiday_file)
    assert str(info.value).startswith(f"{holiday_file}:{line}: ")
    assert reason in str(info.value)
