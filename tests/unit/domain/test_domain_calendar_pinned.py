"""Working days, calendar coverage and the user holiday file (shared/domain/calendar.py),
pinned the way a user checks them (issue 14): which day a working-day deadline lands on,
what ops see as covered, which line of a bad holiday file is named and why."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from domain_support import cst

from shared.domain import HolidayFileError, WorkCalendar
from shared.domain import calendar as calendar_module
from shared.domain.calendar import (
    CALENDAR_KEY,
    ESTIMATED,
    FILE,
    LIBRARY,
    YearInfo,
    calendar_record,
    deadline_calendar,
)
from shared.domain.durations import Duration
from shared.domain.timeutil import as_utc


def _file(tmp_path: Path, text: str) -> Path:
    holiday_file = tmp_path / "holidays.toml"
    holiday_file.write_text(text, encoding="utf-8")
    return holiday_file


def _broken(tmp_path: Path, text: str) -> HolidayFileError:
    holiday_file = _file(tmp_path, text)
    with pytest.raises(HolidayFileError) as info:
        WorkCalendar(holiday_file)
    assert info.value.path == str(holiday_file)
    return info.value


# ---- where the data comes from -----------------------------------------------------------

def test_each_year_says_where_its_working_days_come_from(tmp_path: Path) -> None:
    calendar = WorkCalendar(_file(tmp_path, "[2031]\nholidays = []\n[2026]\nworkdays = []\n"))
    assert [calendar.year_source(y) for y in (2025, 2026, 2027, 2031)] == [
        LIBRARY, FILE, ESTIMATED, FILE]
    assert [calendar.is_estimated(y) for y in (2025, 2026, 2027, 2031)] == [
        False, False, True, False]
    assert WorkCalendar().year_source(2026) == LIBRARY


def test_in_a_file_year_unknown_to_the_library_unlisted_days_are_monday_to_friday(
    tmp_path: Path,
) -> None:
    calendar = WorkCalendar(_file(tmp_path, "[2031]\nholidays = [2031-01-03]\n"))
    # 2031-01-01 is New Year on the estimate, but the file is taken as the schedule
    assert calendar.is_workday(date(2031, 1, 1)) is True  # Wednesday, not listed
    assert calendar.is_workday(date(2031, 1, 3)) is False  # Friday, listed
    assert calendar.is_workday(date(2031, 1, 10)) is True  # Friday, not listed
    assert calendar.is_workday(date(2031, 1, 11)) is False  # Saturday
    assert calendar.is_workday(date(2031, 1, 12)) is False  # Sunday
    # the year next to it is still the estimate: New Year 2032 is off
    assert calendar.is_workday(date(2032, 1, 1)) is False


def test_a_date_listed_both_ways_is_a_day_off(tmp_path: Path) -> None:
    calendar = WorkCalendar(_file(
        tmp_path, "[2031]\nholidays = [2031-01-04]\nworkdays = [2031-01-04, 2031-01-05]\n"))
    assert calendar.is_workday(date(2031, 1, 4)) is False
    assert calendar.is_workday(date(2031, 1, 5)) is True  # Sunday made a workday


def test_the_file_wins_over_the_library_both_ways(tmp_path: Path) -> None:
    # 2026-10-08 is a working Thursday, 2026-10-03 a holiday Saturday in chinese_calendar
    calendar = WorkCalendar(_file(
        tmp_path, "[2026]\nholidays = [2026-10-08]\nworkdays = [2026-10-03]\n"))
    assert WorkCalendar().is_workday(date(2026, 10, 8)) is True
    assert WorkCalendar().is_workday(date(2026, 10, 3)) is False
    assert calendar.is_workday(date(2026, 10, 8)) is False
    assert calendar.is_workday(date(2026, 10, 3)) is True
    assert calendar.is_workday(date(2026, 10, 5)) is False  # unlisted: the library's holiday


def test_asking_twice_gives_the_same_answer() -> None:
    calendar = WorkCalendar()
    days = [date(2026, 10, 1) + timedelta(days=n) for n in range(14)]
    first = [calendar.is_workday(d) for d in days]
    assert [calendar.is_workday(d) for d in days] == first
    assert first.count(True) == 6  # 10-08, 09, make-up Saturday 10, 12, 13, 14


def test_a_loaded_calendar_asks_the_library_once_per_day(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the answer never changes for a loaded calendar, and the library is slow
    # (docs/benchmarks.md): the timer asks about the same days again and again
    asked: list[date] = []
    library = calendar_module.chinese_calendar.is_workday
    assert WorkCalendar().year_source(2026) == LIBRARY  # the library knows 2026 (kept)

    def counting(day: date) -> bool:
        asked.append(day)
        return bool(library(day))

    monkeypatch.setattr(calendar_module.chinese_calendar, "is_workday", counting)
    calendar = WorkCalendar()
    assert calendar.is_workday(date(2026, 10, 8)) is True
    assert calendar.is_workday(date(2026, 10, 9)) is True
    assert calendar.is_workday(date(2026, 10, 8)) is True
    assert calendar.is_workday(date(2026, 10, 9)) is True
    assert asked == [date(2026, 10, 8), date(2026, 10, 9)]


def test_an_estimate_the_package_cannot_give_falls_back_to_weekends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_tables(year: int) -> object:
        raise KeyError(year)

    monkeypatch.setattr(calendar_module, "_estimate", no_tables)
    calendar = WorkCalendar()
    # New Year 2031 (a Wednesday) would be off on the estimate: without it, a working day
    assert calendar.is_workday(date(2031, 1, 1)) is True
    assert calendar.is_workday(date(2031, 1, 3)) is True  # Friday
    assert calendar.is_workday(date(2031, 1, 4)) is False  # Saturday
    assert calendar.is_workday(date(2031, 1, 5)) is False  # Sunday
    assert calendar.add_workdays(cst(2030, 12, 31, 9), 3) == cst(2031, 1, 3, 9)


# ---- what ops see ------------------------------------------------------------------------

def test_year_info_counts_weekday_holidays_and_weekend_workdays(tmp_path: Path) -> None:
    # 2032 is a leap year: 01-01 Thursday and 12-31 Friday off, Sunday 02-29 worked
    calendar = WorkCalendar(_file(
        tmp_path, "[2032]\nholidays = [2032-01-01, 2032-12-31]\nworkdays = [2032-02-29]\n"))
    assert calendar.year_info(2032) == YearInfo(2032, FILE, 2, 1)
    # chinese_calendar's 2026: 19 weekdays off, 6 make-up weekend days
    assert WorkCalendar().year_info(2026) == YearInfo(2026, LIBRARY, 19, 6)
    assert WorkCalendar().year_info(2031).source == ESTIMATED


def test_covered_until_is_the_end_of_the_unbroken_official_run(tmp_path: Path) -> None:
    today = date(2026, 11, 27)
    assert WorkCalendar().covered_until(today) == date(2026, 12, 31)
    two = WorkCalendar(_file(tmp_path, "[2027]\nholidays = []\n[2028]\nholidays = []\n"))
    assert two.covered_until(today) == date(2028, 12, 31)
    # a gap: 2027 is estimated, so 2029 in the file does not extend the coverage
    (tmp_path / "gap").mkdir()
    gap = WorkCalendar(_file(tmp_path / "gap", "[2029]\nholidays = []\n"))
    assert gap.covered_until(today) == date(2026, 12, 31)
    # in a year nobody published, coverage ended with the year before
    assert WorkCalendar().covered_until(date(2031, 3, 1)) == date(2030, 12, 31)
    assert gap.covered_until(date(2029, 3, 1)) == date(2029, 12, 31)


def test_covered_until_defaults_to_today() -> None:
    calendar = WorkCalendar()
    assert calendar.covered_until() == calendar.covered_until(date.today())


# ---- working-day arithmetic ---------------------------------------------------------------

def test_zero_working_days_is_the_moment_itself_and_negative_is_refused() -> None:
    calendar = WorkCalendar()
    assert calendar.add_workdays(cst(2026, 10, 3, 16, 30), 0) == cst(2026, 10, 3, 16, 30)
    with pytest.raises(ValueError, match="forward"):  # only counting forward is defined
        calendar.add_workdays(cst(2026, 10, 3, 16, 30), -1)


def test_a_working_day_deadline_keeps_the_local_time_across_new_year() -> None:
    calendar = WorkCalendar()
    # Thursday 2026-12-31 22:00 in China: the next working day is Monday 2027-01-04 on the
    # estimate (New Year off, then the weekend)
    due = calendar.add_workdays(cst(2026, 12, 31, 22), 1)
    assert due == cst(2027, 1, 4, 22)
    assert due.tzinfo is not None and due.utcoffset() == timedelta(0)  # stored in UTC
    # 2025-12-31 20:00 UTC is already 2026-01-01 04:00 in China: counting starts there
    start = datetime(2025, 12, 31, 20, tzinfo=as_utc(cst(2026, 1, 1)).tzinfo)
    assert calendar.add_workdays(start, 1) == cst(2026, 1, 4, 4)  # Sunday make-up day


def test_a_working_day_count_reaches_from_december_into_february() -> None:
    calendar = WorkCalendar()
    # from Monday 2025-12-29: 22 working days (with 2026's New Year and make-up Sunday 01-04)
    due = calendar.add_workdays(cst(2025, 12, 29, 10), 22)
    assert due == cst(2026, 1, 29, 10)
    assert Duration.parse("22wd").add_to(cst(2025, 12, 29, 10), calendar) == due


# ---- what a deadline stood on ------------------------------------------------------------

def test_span_basis_counts_the_days_after_the_start_only(tmp_path: Path) -> None:
    calendar = WorkCalendar(_file(tmp_path, "[2031]\nholidays = []\n"))
    # from 2030-12-31 (estimated) the days counted are 2031's (from the file)
    assert calendar.span_basis(cst(2030, 12, 31, 10), cst(2031, 1, 3, 10)) == {
        "source": FILE, "estimated": False}
    assert calendar.span_basis(cst(2030, 12, 30, 10), cst(2031, 1, 3, 10)) == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2030]}


def test_span_basis_uses_the_china_local_dates_of_start_and_end(tmp_path: Path) -> None:
    calendar = WorkCalendar(_file(tmp_path, "[2031]\nholidays = []\n"))
    # 2030-12-31 05:00 in China is still 12-30 in UTC: the days counted are 2031's
    assert calendar.span_basis(cst(2030, 12, 31, 5), cst(2031, 1, 3, 10)) == {
        "source": FILE, "estimated": False}
    # ending 2032-01-01 05:00 in China (12-31 in UTC) reaches into the estimated 2032
    assert calendar.span_basis(cst(2031, 12, 30, 10), cst(2032, 1, 1, 5)) == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2032]}


def test_span_basis_takes_the_weakest_source_over_all_years(tmp_path: Path) -> None:
    calendar = WorkCalendar(_file(tmp_path, "[2027]\nholidays = []\n"))
    assert calendar.span_basis(cst(2026, 12, 20, 10), cst(2027, 1, 10, 10)) == {
        "source": FILE, "estimated": False}
    assert calendar.span_basis(cst(2026, 12, 20, 10), cst(2029, 1, 10, 10)) == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2028, 2029]}
    assert calendar.span_basis(cst(2026, 1, 20, 10), cst(2026, 2, 10, 10)) == {
        "source": LIBRARY, "estimated": False}


def test_span_basis_of_a_count_ending_on_its_start_day_looks_at_the_next_day() -> None:
    calendar = WorkCalendar()
    assert calendar.span_basis(cst(2026, 12, 31, 10), cst(2026, 12, 31, 10)) == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2027]}


def test_the_calendar_record_keeps_what_a_recount_needs() -> None:
    class Rule:
        duration = Duration.parse("7wd")

    calendar = WorkCalendar()
    start = cst(2026, 12, 23, 10)
    due = calendar.add_workdays(start, 7)
    assert calendar_record(calendar, Rule(), start, due) == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2027],
        "anchor": as_utc(start).isoformat(), "workdays": 7,
        "rule_due": as_utc(cst(2027, 1, 4, 10)).isoformat()}


def test_deadline_calendar_shows_only_the_source_of_the_steps_own_deadline() -> None:
    record = {"source": ESTIMATED, "estimated": True, "estimated_years": [2027],
              "anchor": "2026-12-23T02:00:00+00:00", "workdays": 7,
              "rule_due": "2027-01-04T02:00:00+00:00"}
    assert deadline_calendar({CALENDAR_KEY: record}) == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2027]}
    assert deadline_calendar({CALENDAR_KEY: {"source": LIBRARY, "estimated": False}}) == {
        "source": LIBRARY, "estimated": False}
    assert deadline_calendar({CALENDAR_KEY: record, "deadline_source": "platform"}) is None
    assert deadline_calendar({CALENDAR_KEY: record, "deadline_source": "rule"}) is not None
    assert deadline_calendar({CALENDAR_KEY: "estimated"}) is None
    assert deadline_calendar({}) is None


# ---- a bad holiday file -------------------------------------------------------------------

def test_an_unreadable_holiday_file_names_the_file_without_a_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(HolidayFileError) as info:
        WorkCalendar(missing)
    assert (info.value.path, info.value.line) == (str(missing), None)
    assert "cannot read" in info.value.reason


@pytest.mark.parametrize(("text", "line", "fact"), [
    # the error names the header of the year table at fault, not the first one
    ("[2031]\nholidays = [2031-01-01]\n\n[2032]\nholidays = [2031-01-01]\n", 4, "2032"),
    ("[2031]\nholidays = []\n[2032]\nworkdays = [2032-01-01, 2033-01-01]\n", 3, "workdays"),
    ("[2031]\nholidays = 2031-01-01\n", 1, "list"),
    ("[2031]\nworkdays = \"2031-01-04\"\n", 1, "workdays"),
    ("[2031]\nholidays = [\"2031-01-01\"]\n", 1, "2031-01-01"),
    ("[2031]\nholidays = [2031-01-01T09:00:00]\n", 1, "2031"),
    ("[2031]\nholidays = []\nextra = 1\nmore = 2\n", 1, "['extra', 'more']"),
    ("[2031]\nholidays = []\n[x2032]\nholidays = []\n", 3, "x2032"),
])
def test_a_bad_year_table_names_its_header_line(tmp_path: Path, text: str, line: int,
                                                fact: str) -> None:
    error = _broken(tmp_path, text)
    assert error.line == line
    assert fact in error.reason


def test_a_year_given_as_a_plain_value_names_no_line(tmp_path: Path) -> None:
    error = _broken(tmp_path, "2031 = [2031-01-01]\n")
    assert error.line is None and "2031" in error.reason


def test_a_valid_file_loads_every_year_and_both_lists(tmp_path: Path) -> None:
    calendar = WorkCalendar(_file(
        tmp_path, "[2031]\nholidays = [2031-01-02]\n\n[2032]\nworkdays = [2032-01-03]\n"))
    assert calendar.holiday_file == tmp_path / "holidays.toml"
    assert calendar.is_workday(date(2031, 1, 2)) is False  # Thursday off
    assert calendar.is_workday(date(2032, 1, 3)) is True  # Saturday worked
    assert calendar.year_source(2032) == FILE
    assert WorkCalendar().holiday_file is None
