"""Tencent Cloud SMS `SendSms` (API 3.0, version 2021-01-11), signed with TC3-HMAC-SHA256.

Signing (Tencent Cloud API signature v3):
  CanonicalRequest = POST \\n / \\n (empty query) \\n CanonicalHeaders \\n SignedHeaders \\n
                     hex(sha256(body))
    CanonicalHeaders: "name:value\\n" per signed header, names and values lower-cased and
    trimmed, sorted by name; we sign content-type, host and x-tc-action.
  StringToSign = "TC3-HMAC-SHA256\\n" + X-TC-Timestamp + "\\n" + Date/service/tc3_request + "\\n"
                 + hex(sha256(CanonicalRequest))        (Date = UTC date of the timestamp)
  SecretDate = HMAC("TC3" + SecretKey, Date); SecretService = HMAC(SecretDate, "sms");
  SecretSigning = HMAC(SecretService, "tc3_request"); Signature = hex(HMAC(SecretSigning, S2S))
  Authorization: TC3-HMAC-SHA256 Credential=SecretId/Date/sms/tc3_request,
                 SignedHeaders=content-type;host;x-tc-action, Signature=...

Response: {"Response": {"SendStatusSet": [{"Code": "Ok", "SerialNo": ...}], "RequestId"}} or
{"Response": {"Error": {"Code", "Message"}, "RequestId"}} when the whole request failed.
SessionContext carries our dedup key; Tencent returns it in delivery receipts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from services.notifier.channels.base import SendResult, e164_phone
from services.notifier.errors import (
    PermanentSendError,
    SendError,
    ThrottledError,
    TransientSendError,
)
from services.notifier.timeutil import seconds_until_next_day
from shared.notifications.masking import mask_phone, mask_text
from shared.notifications.policy import RenderedMessage

log = logging.getLogger("aftersales.notifier.tencent")

DEFAULT_ENDPOINT = "https://sms.tencentcloudapi.com/"
DEFAULT_REGION = "ap-guangzhou"
SERVICE = "sms"
API_VERSION = "2021-01-11"
ALGORITHM = "TC3-HMAC-SHA256"
CONTENT_TYPE = "application/json; charset=utf-8"
SIGNED_HEADERS = ("content-type", "host", "x-tc-action")

# Per-number and per-app quotas; how long to wait when the provider does not say.
_THROTTLE_WAIT_S = {
    "LimitExceeded.PhoneNumberThirtySecondLimit": 30.0,
    "LimitExceeded.PhoneNumberOneHourLimit": 3600.0,
    "LimitExceeded.DeliveryFrequencyLimit": 60.0,
    "RequestLimitExceeded": 5.0,  # API calls per second of the account
}
_DAILY = (
    "LimitExceeded.PhoneNumberDailyLimit",
    "LimitExceeded.PhoneNumberSameContentDailyLimit",
    "LimitExceeded.AppDailyLimit",
    "LimitExceeded.AppGlobalDailyLimit",
    "LimitExceeded.AppCountryOrRegionDailyLimit",
    "LimitExceeded.AppMainlandChinaDailyLimit",
    "LimitExceeded.DailyLimit",
)
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "FailedOperation.InsufficientBalanceInSmsPackage",  # ops can top up
        "ResourceUnavailable",
    }
)
PERMANENT_CODES = frozenset(
    {
        "InvalidParameterValue.IncorrectPhoneNumber",
        "FailedOperation.PhoneNumberInBlacklist",
        "FailedOperation.PhoneNumberOnBlacklist",
        "FailedOperation.TemplateIncorrectOrUnapproved",
        "FailedOperation.SignatureIncorrectOrUnapproved",
        "FailedOperation.ContainSensitiveWord",
        "FailedOperation.MissingTemplateToModify",
        "UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber",
        "UnauthorizedOperation.SmsSdkAppIdVerifyFail",
        "AuthFailure.SignatureFailure",
        "AuthFailure.SecretIdNotFound",
        "AuthFailure.InvalidSecretId",
        "AuthFailure.UnauthorizedOperation",
        "MissingParameter",
    }
)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def canonical_request(headers: Mapping[str, str], signed: tuple[str, ...], payload: bytes) -> str:
    lower = {k.lower(): v for k, v in headers.items()}
    canon_headers = "".join(f"{h}:{lower[h].strip().lower()}\n" for h in sorted(signed))
    return "\n".join(
        [
            "POST",
            "/",
            "",
            canon_headers,
            ";".join(sorted(signed)),
            hashlib.sha256(payload).hexdigest(),
        ]
    )


def signature(
    secret_key: str,
    timestamp: int,
    headers: Mapping[str, str],
    payload: bytes,
    signed: tuple[str, ...] = SIGNED_HEADERS,
    service: str = SERVICE,
) -> str:
    date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
    scope = f"{date}/{service}/tc3_request"
    creq = canonical_request(headers, signed, payload)
    to_sign = "\n".join(
        [ALGORITHM, str(timestamp), scope, hashlib.sha256(creq.encode("utf-8")).hexdigest()]
    )
    k_date = _hmac(("TC3" + secret_key).encode("utf-8"), date)
    k_service = _hmac(k_date, service)
    k_signing = _hmac(k_service, "tc3_request")
    return hmac.new(k_signing, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


class TencentSmsChannel:
    name = "tencent"

    def __init__(
        self,
        secret_id: str,
        secret_key: str,
        sdk_app_id: str,
        sign_name: str,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        region: str = DEFAULT_REGION,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.secret_id = secret_id
        self._secret_key = secret_key
        self.sdk_app_id = sdk_app_id
        self.sign_name = sign_name
        self.endpoint = endpoint
        self.region = region
        self._client = client or httpx.Client(timeout=timeout)
        self._clock = clock

    def close(self) -> None:
        self._client.close()

    def request(self, message: RenderedMessage, dedup_key: str) -> tuple[dict[str, str], bytes]:
        """Headers and body of the signed request for one message (exposed for tests)."""
        template_id = message.template_code(self.name)
        if not template_id:
            raise PermanentSendError(
                f"no Tencent template id for {message.template!r} (AFTERSALES_SMS_TEMPLATES)",
                code="template_code",
            )
        body = {
            "PhoneNumberSet": [e164_phone(message.recipient)],
            "SmsSdkAppId": self.sdk_app_id,
            "SignName": self.sign_name,
            "TemplateId": template_id,
            # Positional: the order the template declares its parameters in.
            "TemplateParamSet": [str(v) for v in message.template_param.values()],
            "SessionContext": dedup_key,
        }
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        ts = int(self._clock().timestamp())
        host = urlsplit(self.endpoint).netloc
        headers = {
            "Content-Type": CONTENT_TYPE,
            "Host": host,
            "X-TC-Action": "SendSms",
            "X-TC-Version": API_VERSION,
            "X-TC-Timestamp": str(ts),
            "X-TC-Region": self.region,
        }
        sig = signature(self._secret_key, ts, headers, payload)
        date = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
        headers["Authorization"] = (
            f"{ALGORITHM} Credential={self.secret_id}/{date}/{SERVICE}/tc3_request, "
            f"SignedHeaders={';'.join(SIGNED_HEADERS)}, Signature={sig}"
        )
        return headers, payload

    def send(self, message: RenderedMessage, dedup_key: str) -> SendResult:
        if message.channel != "sms":
            raise PermanentSendError(f"tencent channel cannot send a {message.channel} message")
        headers, payload = self.request(message, dedup_key)
        to = mask_phone(message.recipient)
        try:
            resp = self._client.post(self.endpoint, content=payload, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Never reached the provider: safe to retry.
            raise TransientSendError(f"{type(exc).__name__}: {exc}", code="connection") from exc
        except httpx.HTTPError as exc:
            # Sent (perhaps partly) and no answer: the provider may have accepted it.
            raise TransientSendError(
                f"{type(exc).__name__}: {exc}", code="no_answer", maybe_sent=True
            ) from exc
        try:
            data = resp.json().get("Response") or {}
        except (ValueError, AttributeError):
            data = {}
        error = data.get("Error")
        if error or resp.status_code != 200:
            code = str((error or {}).get("Code") or "")
            err = self.classify(resp.status_code, code, str((error or {}).get("Message") or ""))
        else:
            statuses = data.get("SendStatusSet") or []
            status = statuses[0] if statuses else {}
            code = str(status.get("Code") or "")
            if code == "Ok":
                serial = str(status.get("SerialNo") or "")
                log.info("sms sent via tencent to=%s key=%s serial=%s", to, dedup_key, serial)
                return SendResult(provider=self.name, provider_id=serial,
                                  detail=str(data.get("RequestId") or ""))
            err = self.classify(resp.status_code, code or "Unknown",
                                str(status.get("Message") or "no send status"))
        log.warning("sms via tencent failed to=%s key=%s %s=%s", to, dedup_key, err.kind,
                    mask_text(str(err)))
        raise err

    def classify(self, status: int, code: str, message: str) -> SendError:
        if code in _DAILY:
            return ThrottledError(message, retry_after=seconds_until_next_day(self._clock()),
                                  code=code)
        if code in _THROTTLE_WAIT_S:
            return ThrottledError(message, retry_after=_THROTTLE_WAIT_S[code], code=code)
        if code.startswith(("LimitExceeded.", "RequestLimitExceeded")) or status == 429:
            return ThrottledError(message, retry_after=60.0, code=code or str(status))
        if code in PERMANENT_CODES:
            return PermanentSendError(message, code=code)
        if (
            code in TRANSIENT_CODES
            or code.startswith(("InternalError", "ResourceUnavailable"))
            or status >= 500
        ):
            return TransientSendError(message, code=code or str(status))
        # InvalidParameter*, UnauthorizedOperation.*, FailedOperation.* and other 4xx:
        # the same request would fail the same way.
        return PermanentSendError(message, code=code or str(status))
