"""A year whose working days are estimated, for tests of deadlines that reach into it.

Drawn from the holiday library's coverage and today's date, so the tests never run into a
year the library has since learned, or into deadlines that have already passed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta

import holidays

from shared.domain.calendar import WorkCalendar
from shared.domain.timeutil import CHINA_TZ


def _first_unknown_year() -> int:
    """The first year, from the one after next week's, that the holiday library does not
    know."""
    year = (date.today() + timedelta(days=7)).year + 1
    while not WorkCalendar().is_estimated(year):
        year += 1
    return year


YEAR = _first_unknown_year()
# Approved on 31 December 10:00: the seven working days counted are all in YEAR.
APPROVED_AT = datetime(YEAR - 1, 12, 31, 10, tzinfo=CHINA_TZ)
# The State Council's schedule as a user would add it: New Year's Day off, and the first
# Saturday after it a make-up workday (调休), which brings the deadline one working day
# earlier than the estimate.
MAKEUP_SATURDAY = next(date(YEAR, 1, d) for d in range(2, 9) if date(YEAR, 1, d).weekday() == 5)
HOLIDAY_FILE = (f"[{YEAR}]\nholidays = [{YEAR}-01-01]\n"
                f"workdays = [{MAKEUP_SATURDAY.isoformat()}]\n")


def seventh_working_day(is_workday: Callable[[date], bool]) -> datetime:
    """10:00 on the 7th working day after the approval's date, by the given days."""
    day, counted = APPROVED_AT.date(), 0
    while counted < 7:
        day += timedelta(days=1)
        counted += is_workday(day)
    return datetime(day.year, day.month, day.day, 10, tzinfo=CHINA_TZ)


# The estimate: the `holidays` package's statutory days for the year (and its observed
# days), weekends off. On the file: weekdays but New Year's Day, plus the make-up Saturday.
ESTIMATED_DUE = seventh_working_day(
    holidays.country_holidays("CN", years=YEAR).is_working_day)


def workday_on_file(day: date) -> bool:
    return day == MAKEUP_SATURDAY or (day.weekday() < 5 and day != date(YEAR, 1, 1))


FILE_DUE = seventh_working_day(workday_on_file)
# the cases happen up to a year ahead: widen intake's plausible-time window to take them
MAX_FUTURE_S = int((APPROVED_AT - datetime.now(CHINA_TZ)).total_seconds()) + 30 * 86400
