from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from services.notifier.channels import FakeChannel, LogChannel
from services.notifier.delivery import InMemoryRateLimiter, QuietHours, decide_and_send
from services.notifier.errors import PermanentSendError
from shared.notifications.masking import mask_address, mask_email, mask_phone, mask_text
from shared.notifications.policy import NotificationRequest, RenderedMessage


@pytest.mark.parametrize(
    "phone,masked",
    [
        ("13812345678", "138****5678"),
        ("+8613812345678", "+86138****5678"),
        ("138 1234 5678", "138****5678"),
        ("12345", "***45"),
        ("", ""),
    ],
)
def test_mask_phone(phone: str, masked: str) -> None:
    assert mask_phone(phone) == masked


@pytest.mark.parametrize(
    "email,masked",
    [
        ("zhangsan@example.com", "z***@example.com"),
        ("a@b.cn", "a***@b.cn"),
        ("not-an-address", "***"),
        ("", ""),
    ],
)
def test_mask_email(email: str, masked: str) -> None:
    assert mask_email(email) == masked


def test_mask_address_and_text() -> None:
    assert mask_address("zhangsan@example.com") == "z***@example.com"
    assert mask_address("13812345678", "sms") == "138****5678"
    assert mask_text("550 <zhangsan@example.com>: no such user; 13812345678 blocked") == (
        "550 <z***@example.com>: no such user; 138****5678 blocked"
    )


def _req(channel: str, recipient: str) -> NotificationRequest:
    return NotificationRequest(
        dedup_key="k" * 32, case_id="AS1", reason="decision.auto_approved", party="buyer",
        channel=channel, recipient=recipient, template="t", params={}, urgent=True,
    )


def test_no_log_line_carries_a_full_address(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    now = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    for channel, addr in (("sms", "13812345678"), ("email", "zhangsan@example.com")):
        req = _req(channel, addr)

        def render(r: NotificationRequest) -> RenderedMessage:
            return RenderedMessage(channel=r.channel, recipient=r.recipient, template="t",
                                   subject="s", body="b")

        for ch in (
            LogChannel(channel),
            FakeChannel(),
            FakeChannel(script=[PermanentSendError(f"550 <{addr}> user unknown")]),
        ):
            result = decide_and_send(req, ch, now=now, attempt=1,
                                     limiter=InMemoryRateLimiter(), quiet_hours=QuietHours(),
                                     render=render)
            assert addr not in (result.error or "")
    text = caplog.text
    assert "13812345678" not in text and "zhangsan@example.com" not in text
    assert "138****5678" in text and "z***@example.com" in text
