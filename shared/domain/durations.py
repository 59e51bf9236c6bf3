"""Rule durations: "48h" (hours), "30m" (minutes), "10d" (calendar days), "7wd" (working days)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

_PATTERN = re.compile(r"^(\d+)(m|h|d|wd)$")
_UNIT_WORDS = {"m": "min", "h": "h", "d": "calendar days", "wd": "working days"}


class WorkdayAdder(Protocol):
    def add_workdays(self, moment: datetime, days: int) -> datetime: ...


@dataclass(frozen=True)
class Duration:
    amount: int
    unit: str  # "m" | "h" | "d" | "wd"

    @classmethod
    def parse(cls, text: str) -> Duration:
        match = _PATTERN.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"bad duration {text!r}: expected a whole number followed by m, h, d or wd "
                '(e.g. "48h", "10d", "7wd")'
            )
        return cls(int(match.group(1)), match.group(2))

    @property
    def text(self) -> str:
        return f"{self.amount}{self.unit}"

    @property
    def is_zero(self) -> bool:
        return self.amount == 0

    @property
    def is_fixed(self) -> bool:
        """True if it is a fixed length of time (not working days, which need a calendar)."""
        return self.unit != "wd"

    def as_timedelta(self) -> timedelta:
        if self.unit == "wd":
            raise ValueError("working days have no fixed length; use add_to with a calendar")
        # China has no daylight saving time, so a calendar day is always 24 hours
        per_unit = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
        return self.amount * per_unit[self.unit]

    def add_to(self, moment: datetime, calendar: WorkdayAdder) -> datetime:
        if self.unit == "wd":
            return calendar.add_workdays(moment, self.amount)
        return moment + self.as_timedelta()

    def describe(self) -> str:
        return f"{self.amount} {_UNIT_WORDS[self.unit]}"
