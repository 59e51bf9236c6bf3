"""Aliyun SMS (Dysmsapi 2017-05-25) `SendSms`, spoken directly over its RPC API.

Signing (Aliyun "RPC" style, signature version 1.0, HMAC-SHA1):
1. all parameters except Signature, sorted by name (byte order);
2. name and value percent-encoded per RFC 3986 (UTF-8; unreserved A-Z a-z 0-9 - _ . ~ kept,
   space -> %20, * -> %2A, ~ kept), joined as k=v with &;
3. StringToSign = METHOD & percentEncode("/") & percentEncode(canonical query);
4. Signature = base64(HMAC-SHA1(key = AccessKeySecret + "&", StringToSign)).
The request is a POST with a form body (so phone numbers stay out of URL access logs).

Response: {"Code": "OK", "BizId": ..., "RequestId": ...}; any other Code is an error,
classified below. OutId carries our dedup key; Aliyun echoes it in delivery receipts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from urllib.parse import quote

import httpx

from services.notifier.channels.base import SendResult, national_phone
from services.notifier.errors import (
    PermanentSendError,
    SendError,
    ThrottledError,
    TransientSendError,
)
from services.notifier.timeutil import seconds_until_next_day
from shared.notifications.masking import mask_phone, mask_text
from shared.notifications.policy import RenderedMessage

log = logging.getLogger("aftersales.notifier.aliyun")

DEFAULT_ENDPOINT = "https://dysmsapi.aliyuncs.com/"
DEFAULT_REGION = "cn-hangzhou"
API_VERSION = "2017-05-25"

THROTTLED_CODES = frozenset(
    {
        "isv.BUSINESS_LIMIT_CONTROL",  # per-number minute / hour / day flow control
        "isv.DAY_LIMIT_CONTROL",
        "Throttling",
        "Throttling.User",
        "Throttling.Api",
    }
)
TRANSIENT_CODES = frozenset(
    {
        "isp.SYSTEM_ERROR",
        "isp.GATEWAY_ERROR",
        "ServiceUnavailable",
        "InternalError",
        "UnknownError",
        "SignatureNonceUsed",  # a retry gets a fresh nonce
        # Account problems ops can fix (top up, reactivate): retry a few times, then fail.
        "isv.AMOUNT_NOT_ENOUGH",
        "isv.OUT_OF_SERVICE",
    }
)
PERMANENT_CODES = frozenset(
    {
        "isv.MOBILE_NUMBER_ILLEGAL",
        "isv.MOBILE_COUNT_OVER_LIMIT",
        "isv.TEMPLATE_MISSING_PARAMETERS",
        "isv.TEMPLATE_PARAMS_ILLEGAL",
        "isv.INVALID_PARAMETERS",
        "isv.INVALID_JSON_PARAM",
        "isv.SMS_TEMPLATE_ILLEGAL",
        "isv.SMS_SIGNATURE_ILLEGAL",
        "isv.SMS_SIGN_ILLEGAL",
        "isv.PARAM_LENGTH_LIMIT",
        "isv.PARAM_NOT_SUPPORT_URL",
        "isv.BLACK_KEY_CONTROL_LIMIT",
        "isv.ACCOUNT_NOT_EXISTS",
        "isv.ACCOUNT_ABNORMAL",
        "isv.DENY_IP_RANGE",
        "isv.DOMESTIC_NUMBER_NOT_SUPPORTED",
        "isp.RAM_PERMISSION_DENY",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "MissingParameter",
        "Forbidden.RAM",
    }
)


def percent_encode(s: str) -> str:
    """RFC 3986 encoding as Aliyun's signer does it (quote keeps only unreserved + "~")."""
    return quote(s, safe="~")


def canonical_query(params: Mapping[str, str]) -> str:
    return "&".join(
        f"{percent_encode(k)}={percent_encode(v)}"
        for k, v in sorted(params.items())
        if k != "Signature"
    )


def string_to_sign(method: str, params: Mapping[str, str]) -> str:
    return f"{method.upper()}&{percent_encode('/')}&{percent_encode(canonical_query(params))}"


def sign(method: str, params: Mapping[str, str], access_key_secret: str) -> str:
    digest = hmac.new(
        (access_key_secret + "&").encode("utf-8"),
        string_to_sign(method, params).encode("utf-8"),
        hashlib.sha1,
    ).digest()
    return base64.b64encode(digest).decode("ascii")


class AliyunSmsChannel:
    name = "aliyun"

    def __init__(
        self,
        access_key_id: str,
        access_key_secret: str,
        sign_name: str,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        region_id: str = DEFAULT_REGION,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        nonce: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.access_key_id = access_key_id
        self._secret = access_key_secret
        self.sign_name = sign_name
        self.endpoint = endpoint
        self.region_id = region_id
        self._client = client or httpx.Client(timeout=timeout)
        self._clock = clock
        self._nonce = nonce

    def close(self) -> None:
        self._client.close()

    def params(self, message: RenderedMessage, dedup_key: str) -> dict[str, str]:
        """The signed request parameters for one message (exposed for tests)."""
        code = message.template_code(self.name)
        if not code:
            raise PermanentSendError(
                f"no Aliyun template code for {message.template!r} (AFTERSALES_SMS_TEMPLATES)",
                code="template_code",
            )
        p = {
            "Action": "SendSms",
            "Version": API_VERSION,
            "Format": "JSON",
            "AccessKeyId": self.access_key_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0",
            "SignatureNonce": self._nonce(),
            "Timestamp": self._clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "RegionId": self.region_id,
            "PhoneNumbers": national_phone(message.recipient),
            "SignName": self.sign_name,
            "TemplateCode": code,
            "TemplateParam": json.dumps(dict(message.template_param), ensure_ascii=False,
                                        separators=(",", ":")),
            "OutId": dedup_key,
        }
        p["Signature"] = sign("POST", p, self._secret)
        return p

    def send(self, message: RenderedMessage, dedup_key: str) -> SendResult:
        if message.channel != "sms":
            raise PermanentSendError(f"aliyun channel cannot send a {message.channel} message")
        params = self.params(message, dedup_key)
        to = mask_phone(message.recipient)
        try:
            form = canonical_query(params) + "&Signature=" + percent_encode(params["Signature"])
            resp = self._client.post(
                self.endpoint,
                content=form,
                headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Never reached the provider: safe to retry.
            raise TransientSendError(f"{type(exc).__name__}: {exc}", code="connection") from exc
        except httpx.HTTPError as exc:
            # Sent (perhaps partly) and no answer: the provider may have accepted it.
            raise TransientSendError(
                f"{type(exc).__name__}: {exc}", code="no_answer", maybe_sent=True
            ) from exc
        try:
            body = resp.json()
        except ValueError:
            body = {}
        code = str(body.get("Code") or "")
        if resp.status_code == 200 and code == "OK":
            biz_id = str(body.get("BizId") or "")
            log.info("sms sent via aliyun to=%s key=%s biz_id=%s", to, dedup_key, biz_id)
            return SendResult(provider=self.name, provider_id=biz_id,
                              detail=str(body.get("RequestId") or ""))
        err = self.classify(resp.status_code, code, str(body.get("Message") or resp.text[:200]))
        log.warning("sms via aliyun failed to=%s key=%s %s=%s", to, dedup_key, err.kind,
                    mask_text(str(err)))
        raise err

    def classify(self, status: int, code: str, message: str) -> SendError:
        if code in THROTTLED_CODES or status == 429:
            return ThrottledError(message, retry_after=self._retry_after(message), code=code)
        if code in PERMANENT_CODES:
            return PermanentSendError(message, code=code)
        if code in TRANSIENT_CODES or code.startswith("isp.") or status >= 500 or status == 0:
            return TransientSendError(message, code=code or str(status))
        # Unknown isv.* (business rule) codes and 4xx: the same request will fail again.
        return PermanentSendError(message, code=code or str(status))

    def _retry_after(self, message: str) -> float:
        """Aliyun names the window it enforced: 分钟级 / 小时级 / 天级 (minute/hour/day)."""
        if re.search(r"天级|day", message, re.I):
            return seconds_until_next_day(self._clock())
        if re.search(r"小时级|hour", message, re.I):
            return 3600.0
        return 60.0
