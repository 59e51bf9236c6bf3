"""The SMS adapters against local servers that check requests and signatures as the
providers do (see notifier_fakes.py)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from notifier_fakes import FakeAliyun, FakeTencent

from services.notifier.channels import AliyunSmsChannel, TencentSmsChannel, build_channels
from services.notifier.channels import aliyun as aliyun_mod
from services.notifier.delivery import InMemoryRateLimiter, QuietHours, decide_and_send
from services.notifier.errors import (
    PermanentSendError,
    SendError,
    ThrottledError,
    TransientSendError,
)
from shared.bootstrap import build_policy
from shared.config import load_settings
from shared.notifications.policy import NotificationPolicy, OpsContacts, RenderedMessage

# Keys are generated per run: nothing secret lives in the repository.
KEY_ID, KEY_SECRET = "LTAItest" + secrets.token_hex(4), secrets.token_urlsafe(24)
SECRET_ID, SECRET_KEY = "AKIDtest" + secrets.token_hex(4), secrets.token_urlsafe(24)
APP_ID = "1400123456"

SMS = RenderedMessage(
    channel="sms", recipient="13812345678", template="auto_approved.buyer",
    body="您的售后单AS1商家已超时未处理，系统已自动同意退款¥12.34。",
    template_codes={"aliyun": "SMS_465912345", "tencent": "2012345"},
    template_param={"case_id": "AS1", "what": "退款¥12.34"},
)
KEY = "0123456789abcdef0123456789abcdef"

ErrType = type[SendError]


def to(phone: str) -> RenderedMessage:
    return RenderedMessage(
        channel=SMS.channel, recipient=phone, template=SMS.template, body=SMS.body,
        template_codes=SMS.template_codes, template_param=SMS.template_param,
    )


# ---- Aliyun ------------------------------------------------------------------------------


@pytest.fixture
def fake_aliyun() -> Iterator[FakeAliyun]:
    with FakeAliyun(
        {KEY_ID: KEY_SECRET},
        behaviour={
            "13800000001": (200, "isv.BUSINESS_LIMIT_CONTROL", "触发小时级流控Permits:5"),
            "13800000002": (200, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号"),
            "13800000003": (503, "ServiceUnavailable", "The request has failed due to a "
                                                       "temporary failure of the server."),
            "13800000004": (200, "isp.SYSTEM_ERROR", "系统错误"),
        },
    ) as server:
        yield server


def aliyun_channel(url: str, secret: str = KEY_SECRET) -> AliyunSmsChannel:
    return AliyunSmsChannel(KEY_ID, secret, "售后服务", endpoint=url, timeout=5)


def test_aliyun_valid_signature_is_accepted(fake_aliyun: FakeAliyun) -> None:
    result = aliyun_channel(fake_aliyun.url).send(SMS, KEY)
    assert result.provider == "aliyun" and result.provider_id == "1^0"
    (req,) = fake_aliyun.requests
    assert req["PhoneNumbers"] == "13812345678"
    assert req["SignName"] == "售后服务"
    assert req["TemplateCode"] == "SMS_465912345"
    assert req["TemplateParam"] == '{"case_id":"AS1","what":"退款¥12.34"}'
    assert req["OutId"] == KEY
    assert req["Format"] == "JSON" and req["RegionId"] == "cn-hangzhou"


def test_aliyun_wrong_secret_is_rejected_as_permanent(fake_aliyun: FakeAliyun) -> None:
    with pytest.raises(PermanentSendError) as err:
        aliyun_channel(fake_aliyun.url, secret="not-the-secret").send(SMS, KEY)
    assert err.value.code == "SignatureDoesNotMatch"
    assert fake_aliyun.requests == []


def test_aliyun_tampered_request_is_rejected(fake_aliyun: FakeAliyun) -> None:
    params = aliyun_channel(fake_aliyun.url).params(SMS, KEY)
    params["PhoneNumbers"] = "13900000000"  # changed after signing
    form = "&".join(f"{aliyun_mod.percent_encode(k)}={aliyun_mod.percent_encode(v)}"
                    for k, v in params.items())
    resp = httpx.post(fake_aliyun.url, content=form,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.json()["Code"] == "SignatureDoesNotMatch"
    # and the untouched request passes the same check
    params = aliyun_channel(fake_aliyun.url).params(SMS, KEY)
    form = "&".join(f"{aliyun_mod.percent_encode(k)}={aliyun_mod.percent_encode(v)}"
                    for k, v in params.items())
    assert httpx.post(fake_aliyun.url, content=form).json()["Code"] == "OK"


@pytest.mark.parametrize(
    "phone,kind,code",
    [
        ("13800000001", ThrottledError, "isv.BUSINESS_LIMIT_CONTROL"),
        ("13800000002", PermanentSendError, "isv.MOBILE_NUMBER_ILLEGAL"),
        ("13800000003", TransientSendError, "ServiceUnavailable"),
        ("13800000004", TransientSendError, "isp.SYSTEM_ERROR"),
    ],
)
def test_aliyun_answers_are_classified(fake_aliyun: FakeAliyun, phone: str, kind: ErrType,
                                       code: str) -> None:
    with pytest.raises(kind) as err:
        aliyun_channel(fake_aliyun.url).send(to(phone), KEY)
    assert err.value.code == code
    if isinstance(err.value, ThrottledError):
        assert err.value.retry_after == 3600.0  # 小时级流控


def test_aliyun_unreachable_is_transient() -> None:
    with FakeAliyun({}) as server:
        url = server.url
    with pytest.raises(TransientSendError):
        aliyun_channel(url).send(SMS, KEY)


# ---- Tencent -----------------------------------------------------------------------------


@pytest.fixture
def fake_tencent() -> Iterator[FakeTencent]:
    with FakeTencent(
        {SECRET_ID: SECRET_KEY}, APP_ID,
        behaviour={
            "+8613800000001": "LimitExceeded.PhoneNumberDailyLimit",
            "+8613800000002": "InvalidParameterValue.IncorrectPhoneNumber",
            "+8613800000003": "InternalError.Timeout",
            "+8613800000004": "LimitExceeded.PhoneNumberThirtySecondLimit",
        },
    ) as server:
        yield server


def tencent_channel(url: str, key: str = SECRET_KEY) -> TencentSmsChannel:
    return TencentSmsChannel(SECRET_ID, key, APP_ID, "售后服务", endpoint=url, timeout=5)


def test_tencent_valid_signature_is_accepted(fake_tencent: FakeTencent) -> None:
    result = tencent_channel(fake_tencent.url).send(SMS, KEY)
    assert result.provider == "tencent" and result.provider_id.startswith("2028:")
    (req,) = fake_tencent.requests
    assert req == {
        "PhoneNumberSet": ["+8613812345678"], "SmsSdkAppId": APP_ID, "SignName": "售后服务",
        "TemplateId": "2012345", "TemplateParamSet": ["AS1", "退款¥12.34"],
        "SessionContext": KEY,
    }


def test_tencent_wrong_key_is_rejected_as_permanent(fake_tencent: FakeTencent) -> None:
    with pytest.raises(PermanentSendError) as err:
        tencent_channel(fake_tencent.url, key="not-the-key").send(SMS, KEY)
    assert err.value.code == "AuthFailure.SignatureFailure"
    assert fake_tencent.requests == []


def test_tencent_tampered_body_is_rejected(fake_tencent: FakeTencent) -> None:
    headers, body = tencent_channel(fake_tencent.url).request(SMS, KEY)
    tampered = body.replace(b"12.34", b"99.99")  # same length, different content
    resp = httpx.post(fake_tencent.url, content=tampered, headers=headers)
    assert resp.json()["Response"]["Error"]["Code"] == "AuthFailure.SignatureFailure"
    resp = httpx.post(fake_tencent.url, content=body, headers=headers)
    assert resp.json()["Response"]["SendStatusSet"][0]["Code"] == "Ok"


def test_tencent_stale_timestamp_is_rejected(fake_tencent: FakeTencent) -> None:
    old = TencentSmsChannel(SECRET_ID, SECRET_KEY, APP_ID, "售后服务", endpoint=fake_tencent.url,
                            clock=lambda: datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(PermanentSendError) as err:
        old.send(SMS, KEY)
    assert err.value.code == "AuthFailure.SignatureExpire"


@pytest.mark.parametrize(
    "phone,kind,code",
    [
        ("13800000001", ThrottledError, "LimitExceeded.PhoneNumberDailyLimit"),
        ("13800000002", PermanentSendError, "InvalidParameterValue.IncorrectPhoneNumber"),
        ("13800000003", TransientSendError, "InternalError.Timeout"),
        ("13800000004", ThrottledError, "LimitExceeded.PhoneNumberThirtySecondLimit"),
    ],
)
def test_tencent_answers_are_classified(fake_tencent: FakeTencent, phone: str, kind: ErrType,
                                        code: str) -> None:
    with pytest.raises(kind) as err:
        tencent_channel(fake_tencent.url).send(to(phone), KEY)
    assert err.value.code == code


# ---- wired from settings, through the delivery policy ------------------------------------


def test_settings_choose_the_provider_and_delivery_retries_throttling(
    fake_aliyun: FakeAliyun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = tmp_path / "codes.toml"
    policy = NotificationPolicy.load()
    codes.write_text("".join(
        f'["{name}"]\naliyun = "SMS_{i:09d}"\n'
        for i, name in enumerate(policy.missing_sms_codes("aliyun"))
    ), encoding="utf-8")
    for name, value in {"SMS_PROVIDER": "aliyun", "ALIYUN_ACCESS_KEY_ID": KEY_ID,
                        "ALIYUN_ACCESS_KEY_SECRET": KEY_SECRET, "SMS_ENDPOINT": fake_aliyun.url,
                        "SMS_TEMPLATES": str(codes)}.items():
        monkeypatch.setenv(f"AFTERSALES_{name}", value)
    settings = load_settings()
    policy = build_policy(settings)
    sms = build_channels(settings.smtp, settings.sms, policy)["sms"]
    notice = {"reason": "decision.auto_approved", "case_id": "AS9", "step": "merchant_response",
              "party": "merchant", "due_at": "2026-11-24T10:00:00+08:00", "urgent": False,
              "params": {"refund_fen": 1234, "kind": "refund_only", "action": "auto_approve",
                         "missed_party": "merchant", "missed_step": "merchant_response",
                         "next_step": "refund_pending", "next_party": "platform",
                         "next_due_at": "2026-12-03T10:00:00+08:00"}}
    contacts = {"buyer": {"phone": "13812345678"}, "merchant": {"phone": "13800000001"}}
    reqs = policy.expand(notice, contacts, OpsContacts())
    now = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)
    results = {
        r.party: decide_and_send(r, sms, now=now, attempt=1, limiter=InMemoryRateLimiter(),
                                 quiet_hours=QuietHours(), render=policy.render)
        for r in reqs
    }
    assert results["buyer"].status == "sent"
    assert results["merchant"].status == "retry"
    assert results["merchant"].error_kind == "throttled"
    (sent,) = fake_aliyun.requests
    assert json.loads(sent["TemplateParam"]) == {
        "case_id": "AS9", "kind": "仅退款", "why": "商家未在11月24日 10:00前处理售后申请",
        "what": "自动同意退款申请，退款¥12.34", "next": "下一步：平台需在12月3日 10:00前完成退款"}
    assert sent["OutId"] == next(r.dedup_key for r in reqs if r.party == "buyer")
