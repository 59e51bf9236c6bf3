"""Time zone helpers: platforms state times in China time, the domain keeps UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final
from zoneinfo import ZoneInfo

# The one time zone of the project: platforms state times in it, people read them in it.
CHINA_TZ_NAME: Final = "Asia/Shanghai"
CHINA_TZ: Final = ZoneInfo(CHINA_TZ_NAME)


def as_utc(moment: datetime) -> datetime:
    """A UTC datetime; a naive one is read as China time (how platforms state deadlines)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=CHINA_TZ)
    return moment.astimezone(UTC)


def parse_moment(value: object) -> datetime | None:
    """An RFC 3339 string or datetime from event data, in UTC; None if it is neither."""
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, str):
        try:
            return as_utc(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def local_text(moment: datetime) -> str:
    """China local time for people, e.g. '2026-11-24 10:00'."""
    return moment.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M")
