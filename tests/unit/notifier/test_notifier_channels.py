"""Adapters without a network: signing vectors, request shapes, error classification."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from urllib.parse import parse_qsl

import httpx
import pytest

from services.notifier.channels import (
    AliyunSmsChannel,
    Channel,
    FakeChannel,
    LogChannel,
    SmtpEmailChannel,
    TencentSmsChannel,
    aliyun,
    build_channels,
    tencent,
)
from services.notifier.channels.base import e164_phone, national_phone
from services.notifier.errors import (
    PermanentSendError,
    SendError,
    ThrottledError,
    TransientSendError,
)
from shared.config import Settings, load_settings
from shared.errors import ConfigError
from shared.notifications.policy import NotificationPolicy, RenderedMessage

NOW = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
SMS = RenderedMessage(
    channel="sms", recipient="13812345678", template="auto_approved.buyer",
    body="您的售后单AS1商家已超时未处理，系统已自动同意退款¥12.34。",
    template_codes={"aliyun": "SMS_465912345", "tencent": "2012345"},
    template_param={"case_id": "AS1", "what": "退款¥12.34"},
)

ErrType = type[SendError]


# ---- Aliyun -------------------------------------------------------------------------------


def payload_text(msg: Message) -> str:
    raw = msg.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return raw.decode("utf-8")


def test_aliyun_signature_matches_the_documented_sendsms_example() -> None:
    # The example in Aliyun's SMS signing documentation (AccessKeySecret "testSecret").
    params = {
        "AccessKeyId": "testId", "Action": "SendSms", "Format": "XML", "OutId": "123",
        "PhoneNumbers": "15300000001", "RegionId": "cn-hangzhou", "SignName": "阿里云短信测试专用",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466", "SignatureVersion": "1.0",
        "TemplateCode": "SMS_71390007", "TemplateParam": '{"customer":"test"}',
        "Timestamp": "2017-07-12T02:42:19Z", "Version": "2017-05-25",
    }
    assert aliyun.sign("GET", params, "testSecret") == "zJDF+Lrzhj/ThnlvIToysFRq6t4="


def test_aliyun_signature_matches_the_documented_rpc_example() -> None:
    params = {
        "Format": "XML", "AccessKeyId": "testid", "Action": "DescribeRegions",
        "SignatureMethod": "HMAC-SHA1", "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
        "SignatureVersion": "1.0", "Version": "2014-05-26", "Timestamp": "2016-02-23T12:46:24Z",
    }
    assert aliyun.sign("GET", params, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="


def test_aliyun_percent_encoding_rules() -> None:
    assert aliyun.percent_encode("a b*~/+") == "a%20b%2A~%2F%2B"
    assert aliyun.percent_encode("派") == "%E6%B4%BE"


Handler = Callable[[httpx.Request], httpx.Response]


def _aliyun(handler: Handler) -> AliyunSmsChannel:
    return AliyunSmsChannel(
        "test-key-id", "test-key-secret", "售后服务", endpoint="https://sms.test/",
        client=httpx.Client(transport=httpx.MockTransport(handler)), clock=lambda: NOW,
        nonce=lambda: "nonce-1",
    )


def test_aliyun_request_has_every_parameter_and_a_valid_signature() -> None:
    seen: dict[str, str] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(parse_qsl(request.content.decode(), keep_blank_values=True))
        return httpx.Response(200, json={"Code": "OK", "Message": "OK", "BizId": "900^1",
                                          "RequestId": "r1"})

    result = _aliyun(handler).send(SMS, "k" * 32)
    assert result.provider_id == "900^1"
    assert seen["Action"] == "SendSms" and seen["Version"] == "2017-05-25"
    assert seen["PhoneNumbers"] == "13812345678" and seen["SignName"] == "售后服务"
    assert seen["TemplateCode"] == "SMS_465912345" and seen["OutId"] == "k" * 32
    assert json.loads(seen["TemplateParam"]) == {"case_id": "AS1", "what": "退款¥12.34"}
    assert seen["Timestamp"] == "2026-11-24T02:00:00Z"
    sig = seen.pop("Signature")
    assert aliyun.sign("POST", seen, "test-key-secret") == sig


@pytest.mark.parametrize(
    "status,code,message,kind",
    [
        (200, "isv.BUSINESS_LIMIT_CONTROL", "触发小时级流控Permits:5", ThrottledError),
        (200, "isv.DAY_LIMIT_CONTROL", "触发天级流控", ThrottledError),
        (200, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号", PermanentSendError),
        (200, "isv.SMS_TEMPLATE_ILLEGAL", "模板不合法", PermanentSendError),
        (200, "isv.SOMETHING_NEW", "unknown business rule", PermanentSendError),
        (200, "isp.SYSTEM_ERROR", "系统错误", TransientSendError),
        (503, "ServiceUnavailable", "busy", TransientSendError),
        (500, "", "", TransientSendError),
        (400, "SignatureDoesNotMatch", "bad signature", PermanentSendError),
    ],
)
def test_aliyun_classifies_errors(status: int, code: str, message: str, kind: ErrType) -> None:
    ch = _aliyun(lambda r: httpx.Response(status, json={"Code": code, "Message": message}))
    with pytest.raises(kind) as err:
        ch.send(SMS, "k" * 32)
    if isinstance(err.value, ThrottledError):
        assert err.value.retry_after == (3600.0 if "小时" in message else 14 * 3600.0)


def test_aliyun_connection_errors_are_transient() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(TransientSendError) as err:
        _aliyun(boom).send(SMS, "k" * 32)
    assert not err.value.maybe_sent


def test_sms_without_a_template_code_is_permanent() -> None:
    msg = RenderedMessage(channel="sms", recipient="13812345678", template="x")
    with pytest.raises(PermanentSendError, match="AFTERSALES_SMS_TEMPLATES"):
        _aliyun(lambda r: httpx.Response(200)).send(msg, "k")


# ---- Tencent ------------------------------------------------------------------------------


def _tencent(handler: Handler) -> TencentSmsChannel:
    return TencentSmsChannel(
        "AKIDtest", "test-secret-key", "1400000001", "售后服务",
        endpoint="https://sms.test/",
        client=httpx.Client(transport=httpx.MockTransport(handler)), clock=lambda: NOW,
    )


def test_tencent_request_shape_and_signature() -> None:
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["headers"] = dict(request.headers)
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"Response": {"SendStatusSet": [
            {"Code": "Ok", "SerialNo": "2028:1", "PhoneNumber": "+8613812345678",
             "SessionContext": "k" * 32}], "RequestId": "r"}})

    assert _tencent(handler).send(SMS, "k" * 32).provider_id == "2028:1"
    headers: dict[str, str] = seen["headers"]  # type: ignore[assignment]
    body = seen["body"]
    assert body == {
        "PhoneNumberSet": ["+8613812345678"], "SmsSdkAppId": "1400000001",
        "SignName": "售后服务", "TemplateId": "2012345",
        "TemplateParamSet": ["AS1", "退款¥12.34"], "SessionContext": "k" * 32,
    }
    assert headers["x-tc-action"] == "SendSms" and headers["x-tc-version"] == "2021-01-11"
    assert headers["x-tc-timestamp"] == str(int(NOW.timestamp()))
    assert headers["authorization"].startswith(
        "TC3-HMAC-SHA256 Credential=AKIDtest/2026-11-24/sms/tc3_request, "
        "SignedHeaders=content-type;host;x-tc-action, Signature="
    )


def test_tencent_canonical_request_follows_the_spec() -> None:
    creq = tencent.canonical_request(
        {"Content-Type": "application/json; charset=utf-8", "Host": "sms.tencentcloudapi.com",
         "X-TC-Action": "SendSms"},
        ("content-type", "host", "x-tc-action"), b"{}",
    )
    assert creq == (
        "POST\n/\n\n"
        "content-type:application/json; charset=utf-8\nhost:sms.tencentcloudapi.com\n"
        "x-tc-action:sendsms\n\n"
        "content-type;host;x-tc-action\n"
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )


@pytest.mark.parametrize(
    "code,kind,wait",
    [
        ("LimitExceeded.PhoneNumberDailyLimit", ThrottledError, 14 * 3600.0),
        ("LimitExceeded.PhoneNumberOneHourLimit", ThrottledError, 3600.0),
        ("LimitExceeded.PhoneNumberThirtySecondLimit", ThrottledError, 30.0),
        ("InvalidParameterValue.IncorrectPhoneNumber", PermanentSendError, None),
        ("FailedOperation.TemplateIncorrectOrUnapproved", PermanentSendError, None),
        ("InternalError.Timeout", TransientSendError, None),
        ("InternalError", TransientSendError, None),
    ],
)
def test_tencent_classifies_send_status(code: str, kind: ErrType, wait: float | None) -> None:
    ch = _tencent(lambda r: httpx.Response(200, json={"Response": {"SendStatusSet": [
        {"Code": code, "Message": "m", "SerialNo": ""}], "RequestId": "r"}}))
    with pytest.raises(kind) as err:
        ch.send(SMS, "k")
    if isinstance(err.value, ThrottledError):
        assert err.value.retry_after == wait


@pytest.mark.parametrize(
    "code,kind",
    [("RequestLimitExceeded", ThrottledError), ("AuthFailure.SignatureFailure", PermanentSendError),
     ("InternalError", TransientSendError)],
)
def test_tencent_classifies_request_errors(code: str, kind: ErrType) -> None:
    ch = _tencent(lambda r: httpx.Response(200, json={"Response": {
        "Error": {"Code": code, "Message": "m"}, "RequestId": "r"}}))
    with pytest.raises(kind):
        ch.send(SMS, "k")


# ---- phones, SMTP message, log and fake channels, config ----------------------------------


@pytest.mark.parametrize(
    "raw,national,e164",
    [
        ("13812345678", "13812345678", "+8613812345678"),
        ("+86 138-1234-5678", "13812345678", "+8613812345678"),
        ("008613812345678", "13812345678", "+8613812345678"),
        ("+85261234567", "85261234567", "+85261234567"),
    ],
)
def test_phone_forms(raw: str, national: str, e164: str) -> None:
    assert national_phone(raw) == national
    assert e164_phone(raw) == e164


def test_smtp_message_has_encoded_subject_and_key_derived_message_id() -> None:
    ch = SmtpEmailChannel("127.0.0.1", 25, "售后服务 <noreply@shop.example>")
    msg = RenderedMessage(channel="email", recipient="buyer@example.com", template="t",
                          subject="您的售后申请 AS1 已自动同意", body="退款 ¥12.34\n")
    raw = ch.build(msg, "k" * 32)
    assert b"=?utf-8?" in raw  # RFC 2047, not raw UTF-8 in a header
    parsed = message_from_bytes(raw)
    assert str(make_header(decode_header(parsed["Subject"]))) == "您的售后申请 AS1 已自动同意"
    assert parsed["Message-ID"] == f"<{'k' * 32}@shop.example>"
    assert payload_text(parsed) == "退款 ¥12.34\n"


def test_smtp_message_folds_a_long_subject_and_refuses_a_header_injection() -> None:
    ch = SmtpEmailChannel("127.0.0.1", 25, "售后服务 <noreply@shop.example>")
    long_subject = "您的售后申请已自动同意，退款将原路退回，请留意账户变动。" * 4
    msg = RenderedMessage(channel="email", recipient="buyer@example.com", template="t",
                          subject=long_subject, body="x\n")
    raw = ch.build(msg, "k" * 32)
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))  # RFC 5322 line length
    parsed = message_from_bytes(raw)
    assert str(make_header(decode_header(parsed["Subject"]))) == long_subject
    assert str(make_header(decode_header(parsed["From"]))) == "售后服务 <noreply@shop.example>"
    injected = RenderedMessage(channel="email", recipient="a@example.com\r\nBcc: x@evil.example",
                               template="t", subject="s", body="x\n")
    with pytest.raises(PermanentSendError):
        ch.build(injected, "k" * 32)


def test_channels_satisfy_the_port() -> None:
    for ch in (LogChannel(), FakeChannel(), _aliyun(lambda r: httpx.Response(200)),
               _tencent(lambda r: httpx.Response(200)),
               SmtpEmailChannel("127.0.0.1", 25, "a@b.c")):
        assert isinstance(ch, Channel)


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    """The settings a process started with exactly these AFTERSALES_* variables reads."""
    for key in list(os.environ):
        if key.startswith("AFTERSALES_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(f"AFTERSALES_{key}", value)
    return load_settings()


def test_build_channels_defaults_to_smtp_and_log_sms(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch)
    chans = build_channels(settings.smtp, settings.sms)
    assert isinstance(chans["email"], SmtpEmailChannel)
    assert isinstance(chans["sms"], LogChannel)


def test_build_channels_needs_provider_keys_and_template_codes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="AFTERSALES_ALIYUN_ACCESS_KEY_ID"):
        settings_from(monkeypatch, SMS_PROVIDER="aliyun")
    settings = settings_from(monkeypatch, SMS_PROVIDER="tencent", TENCENT_SECRET_ID="id",
                             TENCENT_SECRET_KEY="key", TENCENT_SDK_APP_ID="1400")
    sms = build_channels(settings.smtp, settings.sms)["sms"]
    assert isinstance(sms, TencentSmsChannel)
    assert sms.region == "ap-guangzhou"  # Tencent's own default region
    with pytest.raises(ConfigError, match="AFTERSALES_SMS_TEMPLATES"):
        build_channels(settings.smtp, settings.sms, NotificationPolicy.load())


def test_channels_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(
        monkeypatch, SMTP_HOST="mail.example", SMTP_PORT="465", SMTP_FROM="a@b.c",
        SMTP_USER="u", SMTP_PASSWORD="pw-value", SMTP_TLS="tls", SMS_PROVIDER="aliyun",
        SMS_ENDPOINT="http://127.0.0.1:9/", ALIYUN_ACCESS_KEY_ID="id",
        ALIYUN_ACCESS_KEY_SECRET="s3cr3t-value")
    chans = build_channels(settings.smtp, settings.sms)
    sms, email = chans["sms"], chans["email"]
    assert isinstance(sms, AliyunSmsChannel) and isinstance(email, SmtpEmailChannel)
    assert (sms.endpoint, sms.region_id) == ("http://127.0.0.1:9/", "cn-hangzhou")
    assert (email.host, email.port, email.tls) == ("mail.example", 465, "tls")
    assert "s3cr3t-value" not in repr(settings) and "pw-value" not in repr(settings)


def test_password_over_plain_smtp_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="AFTERSALES_SMTP_TLS"):
        settings_from(monkeypatch, SMTP_USER="u", SMTP_PASSWORD="p")


@pytest.mark.parametrize("make", [_aliyun, _tencent])
def test_no_answer_after_sending_may_have_been_delivered(make: Callable[..., Channel]) -> None:
    def silent(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    with pytest.raises(TransientSendError) as err:
        make(silent).send(SMS, "k" * 32)
    assert err.value.maybe_sent
