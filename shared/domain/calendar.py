"""Chinese working days: public holidays and make-up workdays (调休).

Each year has a source:
- "file": the user holiday file (`AFTERSALES_HOLIDAYS`) lists the year; it wins over the
  library for the dates it lists;
- "library": the `chinese_calendar` library knows the State Council's schedule;
- "estimated": neither knows the year (the schedule is published each November, so every
  December reaches into an unknown year). Working days then come from an estimate: the
  `holidays` package's Chinese statutory holidays at their expected dates (and observed
  days), weekends off, no make-up workdays unless that package knows them. Never an
  exception: a deadline computed on the estimate carries `calendar.estimated = true`
  (see `span_basis`) and is recomputed when official data arrives
  (`shared.domain.recompute`).

User holiday file (TOML), one table per year; every listed date must lie in that year:

    [2027]
    holidays = [2027-01-01, 2027-02-08]   # days off, even if Monday..Friday
    workdays = [2027-02-06]               # make-up workdays (调休), even if Saturday/Sunday

In a year the file lists, an unlisted date falls back to chinese_calendar when it knows
the year, else to Monday..Friday (the file is taken as the official schedule).

Working-day arithmetic ("7wd"): from a moment, take its Asia/Shanghai local date, step
forward to the N-th working day *after* that date, keep the local time of day. So "7wd"
from a Wednesday 10:00 is 10:00 on the 7th following working day, whether or not the start
day itself is a working day (a request made on a holiday counts from the next workdays).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import chinese_calendar
import holidays as holiday_estimates

from shared.domain.errors import HolidayFileError
from shared.domain.timeutil import CHINA_TZ, as_utc
from shared.domain.tomlfiles import header_lines, toml_error_line

# case.data key of the record of a working-day deadline's calendar data (`calendar_record`)
CALENDAR_KEY = "calendar"
FILE = "file"
LIBRARY = "library"
ESTIMATED = "estimated"


@cache
def _library_knows(year: int) -> bool:
    try:
        chinese_calendar.is_workday(date(year, 6, 1))
    except NotImplementedError:  # the library's way of saying "year not covered"
        return False
    return True


@cache
def _estimate(year: int) -> Any:
    """The `holidays` package's Chinese calendar for one year (statutory holidays at their
    expected dates, observed days; make-up workdays only where it knows the schedule)."""
    return holiday_estimates.country_holidays("CN", years=year)


def calendar_record(calendar: WorkCalendar, rule: Any, anchor: datetime,
                    due: datetime) -> dict[str, Any]:
    """What a case keeps of a working-day deadline (in `data["calendar"]`): the calendar
    data it stood on, and what it was counted from, so it can be counted again when
    official data replaces an estimate (`shared.domain.recompute`)."""
    return {**calendar.span_basis(anchor, due), "anchor": as_utc(anchor).isoformat(),
            "workdays": rule.duration.amount, "rule_due": as_utc(due).isoformat()}


def deadline_calendar(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The calendar info of the current step's deadline (for DeadlineSpec, decisions and
    `case show`); None for a fixed duration or a deadline the platform set."""
    record = data.get(CALENDAR_KEY)
    if not isinstance(record, Mapping) or data.get("deadline_source") == "platform":
        return None
    return {k: record[k] for k in ("source", "estimated", "estimated_years") if k in record}


def _estimated_workday(day: date) -> bool:
    try:
        return bool(_estimate(day.year).is_working_day(day))
    except Exception:  # a year past the package's lunar tables: weekends only, never raise
        return day.weekday() < 5


@dataclass(frozen=True)
class YearInfo:
    """What the calendar knows of one year (for `aftersales calendar status`)."""

    year: int
    source: str  # file | library | estimated
    holidays_off: int  # Monday..Friday days off
    makeup_workdays: int  # Saturdays/Sundays that are working days (调休)


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

    def year_source(self, year: int) -> str:
        if year in self._user_years:
            return FILE
        return LIBRARY if _library_knows(year) else ESTIMATED

    def is_estimated(self, year: int) -> bool:
        return self.year_source(year) == ESTIMATED

    def _lookup(self, day: date) -> bool:
        if day in self._user_holidays:
            return False
        if day in self._user_workdays:
            return True
        if _library_knows(day.year):
            return bool(chinese_calendar.is_workday(day))
        if day.year in self._user_years:
            return day.weekday() < 5
        return _estimated_workday(day)

    def year_info(self, year: int) -> YearInfo:
        days = [date(year, 1, 1) + timedelta(days=n)
                for n in range((date(year + 1, 1, 1) - date(year, 1, 1)).days)]
        off = sum(1 for d in days if d.weekday() < 5 and not self.is_workday(d))
        makeup = sum(1 for d in days if d.weekday() >= 5 and self.is_workday(d))
        return YearInfo(year, self.year_source(year), off, makeup)

    def covered_until(self, today: date | None = None) -> date:
        """The last day of the last year with official data (library or user file) in an
        unbroken run from this year: past it, working-day deadlines are estimates. Ops
        watch this (a metric and an alert) so next year's schedule is added in time."""
        year = (today or date.today()).year
        if self.is_estimated(year):
            return date(year - 1, 12, 31)
        while not self.is_estimated(year + 1):
            year += 1
        return date(year, 12, 31)

    def add_workdays(self, moment: datetime, days: int) -> datetime:
        if days < 0:
            raise ValueError("only forward working-day arithmetic is defined")
        local = as_utc(moment).astimezone(CHINA_TZ)
        day = local.date()
        counted = 0
        while counted < days:
            day += timedelta(days=1)
            if self.is_workday(day):
                counted += 1
        return as_utc(local.replace(year=day.year, month=day.month, day=day.day))

    def span_basis(self, start: datetime, end: datetime) -> dict[str, Any]:
        """Which data a working-day count from `start` to `end` stood on: the days counted
        are the local dates after start's up to end's. "estimated" if any of their years
        is, else "file" if any is from the user file, else "library"."""
        first = as_utc(start).astimezone(CHINA_TZ).date() + timedelta(days=1)
        last = max(first, as_utc(end).astimezone(CHINA_TZ).date())
        sources = {self.year_source(y) for y in range(first.year, last.year + 1)}
        source = ESTIMATED if ESTIMATED in sources else FILE if FILE in sources else LIBRARY
        basis: dict[str, Any] = {"source": source, "estimated": source == ESTIMATED}
        if source == ESTIMATED:
            basis["estimated_years"] = sorted(
                y for y in range(first.year, last.year + 1) if self.is_estimated(y))
        return basis

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

