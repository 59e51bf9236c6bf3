"""Chinese working days: public holidays and make-up workdays (调休).

Data comes from the `chinese_calendar` library, corrected or extended by a user holiday
file that wins over it, because the library may not know next year's schedule yet (the
State Council publishes it each November). A year neither knows raises
`CalendarDataMissing`: guessing would silently move deadlines.

User holiday file (TOML), one table per year; every listed date must lie in that year:

    [2027]
    holidays = [2027-01-01, 2027-02-08]   # days off, even if Monday..Friday
    workdays = [2027-02-06]               # make-up workdays (调休), even if Saturday/Sunday

In a year the file lists, an unlisted date falls back to chinese_calendar when it knows
the year, else to Monday..Friday.

Working-day arithmetic ("7wd"): from a moment, take its Asia/Shanghai local date, step
forward to the N-th working day *after* that date, keep the local time of day. So "7wd"
from a Wednesday 10:00 is 10:00 on the 7th following working day, whether or not the start
day itself is a working day (a request made on a holiday counts from the next workdays).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from pathlib import Path

import chinese_calendar

from shared.domain.errors import CalendarDataMissing, HolidayFileError
from shared.domain.timeutil import SHANGHAI, as_utc
from shared.domain.tomlfiles import header_lines, toml_error_line


class WorkCalendar:
    def __init__(self, holiday_file: Path | None = None) -> None:
        self.holiday_file = holiday_file
        self._user_holidays: set[date] = set()
        self._user_workdays: set[date] = set()
        self._user_years: set[int] = set()
        # Day -> working day or not. The answer never changes for a loaded calendar, and
        # asking the library costs far more than the dict (docs/benchmarks.md).
        self._known: dict[date, bool] = {}
        if holiday_file is not None:
            self._load_user_file(Path(holiday_file))

    def is_workday(self, day: date) -> bool:
        known = self._known.get(day)
        if known is None:
            known = self._known[day] = self._lookup(day)
        return known

    def _lookup(self, day: date) -> bool:
        if day in self._user_holidays:
            return False
        if day in self._user_workdays:
            return True
        try:
            return bool(chinese_calendar.is_workday(day))
        except NotImplementedError:  # the library's way of saying "year not covered"
            if day.year in self._user_years:
                return day.weekday() < 5
            raise CalendarDataMissing(day.year) from None

    def covered_until(self) -> date:
        """The last day whose working-day status is known (library or user file): past
        it, working-day deadlines cannot be computed. Ops watch this (a metric and an
        alert) so next year's schedule is added before it is needed."""
        year = max(self._user_years, default=date.today().year)
        while True:
            try:
                chinese_calendar.is_workday(date(year + 1, 1, 1))
            except NotImplementedError:
                break
            year += 1
        known_by_library = True
        try:
            chinese_calendar.is_workday(date(year, 1, 1))
        except NotImplementedError:
            known_by_library = False
        if not known_by_library and year not in self._user_years:
            year -= 1
        return date(year, 12, 31)

    def add_workdays(self, moment: datetime, days: int) -> datetime:
        if days < 0:
            raise ValueError("only forward working-day arithmetic is defined")
        local = as_utc(moment).astimezone(SHANGHAI)
        day = local.date()
        counted = 0
        while counted < days:
            day += timedelta(days=1)
            if self.is_workday(day):
                counted += 1
        return as_utc(local.replace(year=day.year, month=day.month, day=day.day))

    def _load_user_file(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise HolidayFileError(path, None, f"cannot read: {exc.strerror}") from exc
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line, reason = toml_error_line(exc, text)
            raise HolidayFileError(path, line, reason) from exc
        for key, table in doc.items():
            self._load_year(path, text, key, table)

    def _load_year(self, path: Path, text: str, key: str, table: object) -> None:
        found = header_lines(text, f"[{key}]")
        line = found[0] if found else None
        if not key.isdigit() or not isinstance(table, Mapping):
            raise HolidayFileError(
                path, line, f"expected a table per year like [2027], got {key!r}"
            )
        year = int(key)
        unknown = set(table) - {"holidays", "workdays"}
        if unknown:
            raise HolidayFileError(path, line, f"unknown keys in [{key}]: {sorted(unknown)}")
        for name, target in (("holidays", self._user_holidays), ("workdays", self._user_workdays)):
            days = table.get(name, [])
            if not isinstance(days, list):
                raise HolidayFileError(path, line, f"[{key}] {name} must be a list of dates")
            for day in days:
                if type(day) is not date or day.year != year:
                    raise HolidayFileError(
                        path, line, f"[{key}] {name}: {day!r} is not a date in {year}"
                    )
                target.add(day)
        self._user_years.add(year)

