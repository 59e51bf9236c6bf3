"""The shipped broker limit and intake's settings agree: a burst of the largest messages
the broker accepts cannot exceed intake's memory budget."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import REPO

from shared.config import Settings
from shared.errors import ConfigError


def _broker_max_message_size() -> int:
    conf = (REPO / "deploy" / "docker" / "rabbitmq" / "rabbitmq.conf").read_text()
    match = re.search(r"^max_message_size\s*=\s*(\d+)\s*$", conf, re.MULTILINE)
    assert match, "rabbitmq.conf must set max_message_size"
    return int(match.group(1))


def test_the_shipped_broker_limit_is_the_settings_default() -> None:
    settings = Settings()
    assert _broker_max_message_size() == settings.broker_max_message_bytes
    assert settings.max_event_bytes <= settings.broker_max_message_bytes
    held = settings.intake_prefetch * settings.broker_max_message_bytes
    assert held <= settings.intake_max_buffered_bytes
    doc = (REPO / "deploy" / "k8s" / "rabbitmq-quorum.md").read_text()
    assert f"max_message_size = {settings.broker_max_message_bytes}" in doc


def test_a_prefetch_that_could_exhaust_memory_is_refused(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from shared.config import load_settings

    monkeypatch.setenv("AFTERSALES_INTAKE_PREFETCH", "5000")
    monkeypatch.setenv("AFTERSALES_BROKER_MAX_MESSAGE_BYTES", str(1024 * 1024))
    with pytest.raises(ConfigError, match="intake_max_buffered_bytes"):
        load_settings()
