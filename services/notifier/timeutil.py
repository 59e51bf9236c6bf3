"""Small time helpers shared by the channels and the delivery policy."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from shared.domain.timeutil import CHINA_TZ_NAME

# Providers reset their daily SMS quotas at midnight China time.


def seconds_until_next_day(now: datetime, tz: str = CHINA_TZ_NAME) -> float:
    """Seconds from `now` to the next local midnight in `tz` (at least 1)."""
    local = now.astimezone(ZoneInfo(tz))
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, (midnight - local).total_seconds())
