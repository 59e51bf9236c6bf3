"""Retention and dedup settings: the dedup window is never shorter than the retention; a
service (or command) with a shorter one stops at start with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.config import load_settings
from shared.errors import ConfigError


def test_the_dedup_window_defaults_to_the_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("AFTERSALES_"):
            monkeypatch.delenv(key)
    s = load_settings()
    assert (s.retention_days, s.dedup_window, s.archive_dir) == (400, 400, None)
    monkeypatch.setenv("AFTERSALES_RETENTION_DAYS", "30")
    assert load_settings().dedup_window == 30
    monkeypatch.setenv("AFTERSALES_DEDUP_WINDOW_DAYS", "90")
    assert load_settings().dedup_window == 90


def test_a_dedup_window_shorter_than_the_retention_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFTERSALES_RETENTION_DAYS", "400")
    monkeypatch.setenv("AFTERSALES_DEDUP_WINDOW_DAYS", "399")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value).startswith("AFTERSALES_DEDUP_WINDOW_DAYS:")
    assert "AFTERSALES_RETENTION_DAYS (400)" in str(err.value)


def test_a_service_with_it_stops_at_start_with_one_line() -> None:
    env = {**os.environ, "AFTERSALES_DEDUP_WINDOW_DAYS": "7"}
    proc = subprocess.run([sys.executable, "-m", "aftersales_cli.cli", "run", "intake"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "AFTERSALES_DEDUP_WINDOW_DAYS" in lines[0]
