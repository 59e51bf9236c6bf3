"""The notifier's composition root reads its groups of the one Settings: a bad quiet-hours
setting stops it naming the variable; the limits and retries are the settings'."""

from __future__ import annotations

import os

import pytest

from services.notifier.delivery import DEFAULT_RATE_LIMITS, rate_limits
from services.notifier.main import quiet_hours
from services.notifier.ratelimit import RateLimit
from shared.config import Settings, load_settings
from shared.errors import ConfigError


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for key in list(os.environ):
        if key.startswith("AFTERSALES_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(f"AFTERSALES_{key}", value)
    return load_settings()


@pytest.mark.parametrize(("name", "value"), [("QUIET_HOURS", "soon"),
                                             ("QUIET_HOURS_TZ", "Mars/Olympus")])
def test_bad_quiet_hours_are_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str
                                   ) -> None:
    settings = settings_from(monkeypatch, **{name: value})
    with pytest.raises(ConfigError, match=f"^AFTERSALES_{name}:"):
        quiet_hours(settings.quiet_hours)


def test_quiet_hours_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    hours = quiet_hours(settings_from(monkeypatch, QUIET_HOURS="23:00-07:30",
                                      QUIET_HOURS_TZ="Asia/Urumqi").quiet_hours)
    assert (hours.start.isoformat(), hours.end.isoformat(), hours.tz) == (
        "23:00:00", "07:30:00", "Asia/Urumqi")
    assert not quiet_hours(settings_from(monkeypatch, QUIET_HOURS="off").quiet_hours).enabled


def test_rate_limits_are_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rate_limits(settings_from(monkeypatch).rate_limits) == DEFAULT_RATE_LIMITS
    limits = rate_limits(settings_from(monkeypatch, SMS_PER_PHONE_PER_HOUR="2",
                                       OPS_EMAIL_PER_ADDRESS_PER_HOUR="9").rate_limits)
    assert RateLimit("sms", 2, 3600) in limits
    assert RateLimit("email", 9, 3600, scope="ops") in limits
