"""Settings: read once from AFTERSALES_* variables; a bad one stops the process with one
line naming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.config import load_settings
from shared.errors import ConfigError


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("AFTERSALES_"):
            monkeypatch.delenv(key)
    s = load_settings()
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert s.database_url == "postgresql+psycopg://127.0.0.1/aftersales"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.smtp.host, s.smtp.port) == ("127.0.0.1", 25)
    assert s.sms.provider == "log"
    assert [s.metrics_port_for(n) for n in ("intake", "timer", "resolver", "notifier")] == [
        9101, 9102, 9103, 9104]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AFTERSALES_METRICS_PORT", "not-a-port"),
        ("AFTERSALES_AMQP_URL", "http://127.0.0.1"),
        ("AFTERSALES_DATABASE_URL", "mysql://x"),
        ("AFTERSALES_SMS_PROVIDER", "carrier-pigeon"),
        ("AFTERSALES_RULES", "/no/such/rules"),
        # Variables of a group (settings.smtp, settings.gateway) are named the same way.
        ("AFTERSALES_SMTP_PORT", "0"),
        ("AFTERSALES_SMTP_FROM", "no-address"),
        ("AFTERSALES_GATEWAY_MAPPINGS", "/no/such/folder"),
        ("AFTERSALES_CONSOLE_PORT", "http"),
    ],
)
def test_a_bad_setting_is_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value).startswith(name + ":")


def test_the_service_stops_at_start_with_one_line() -> None:
    env = {**os.environ, "AFTERSALES_METRICS_PORT": "99999"}
    proc = subprocess.run(
        [sys.executable, "-m", "aftersales_cli.cli", "run", "intake"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "AFTERSALES_METRICS_PORT" in lines[0]
