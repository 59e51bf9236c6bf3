"""Each platform's transport: is the request really from the platform (its documented
check), and which messages does it carry.

Pure functions of the request (headers, query, raw body) and the secrets; the clock is
passed in. A request the platform did not send, or cannot have meant, is a `Refusal`
(401 / 400, nothing published). Inside an authentic request, an element that makes no
sense is not a reason to refuse the others: it is returned in `Unpacked.malformed` and
kept for ops.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from services.gateway.mapping import PlatformMapping, PlatformMessage, platform_time

MAX_ID_CHARS = 128
# TOP's own SDK refuses SPI requests whose timestamp is further than this from now.
TAOBAO_TIMESTAMP_WINDOW = timedelta(minutes=15)


@dataclass(frozen=True)
class Refusal:
    status: int  # 400 or 401
    reason: str  # bad_signature | bad_request (a metric label)
    detail: str


@dataclass
class Unpacked:
    messages: list[PlatformMessage] = field(default_factory=list)
    malformed: list[tuple[bytes, str, str]] = field(default_factory=list)  # raw, id, detail


def _json(raw: bytes | str, what: str) -> Any:
    """Parse JSON strictly (no NaN/Infinity); raise ValueError naming `what`."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    try:
        return json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"{what} is not JSON: {exc}"[:300]) from None


def _embedded_object(value: Any, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """The platforms put a message's payload in a string field holding a JSON object:
    (the object, None) or (None, what is wrong)."""
    if not isinstance(value, str):
        return None, f"{what} must be a JSON object encoded as a string"
    try:
        parsed = _json(value, what)
    except ValueError as exc:
        return None, str(exc)
    if not isinstance(parsed, dict):
        return None, f"{what} must encode a JSON object"
    return parsed, None


def _ident(value: Any) -> str | None:
    """An id as the platforms send them (number or string) as text; None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return str(value)
    if isinstance(value, str) and 0 < len(value.strip()) <= MAX_ID_CHARS:
        return value.strip()
    return None


def _fen(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value <= 10**12:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) <= 13:
        return int(value)
    return None


def _yuan_to_fen(value: Any) -> int | None:
    """Taobao amounts are yuan as text ("12.90")."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0 or amount > 10**10:
        return None
    fen = amount * 100
    return int(fen) if fen == fen.to_integral_value() else None


def _code(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)) and len(str(value)) <= 64:
        return str(value)
    return None


def _text(value: Any) -> str:
    return value[:2000] if isinstance(value, str) else ""


def _element_id(element: Any, *names: str) -> str:
    if isinstance(element, dict):
        for name in names:
            value = _ident(element.get(name))
            if value:
                return value
    return ""


# ---- Douyin (抖店) ------------------------------------------------------------------------

def douyin_verify(headers: Mapping[str, str], body: bytes, app_key: str,
                  app_secret: str) -> Refusal | None:
    """`app-id` is our app key; `event-sign` = md5_hex(app_key + raw body + app_secret)."""
    app_id = headers.get("app-id", "")
    sign = headers.get("event-sign", "")
    if not app_id or not sign:
        return Refusal(401, "bad_signature", "app-id and event-sign headers are required")
    if not hmac.compare_digest(app_id.encode(), app_key.encode()):
        return Refusal(401, "bad_signature", "app-id is not this app's key")
    # MD5 is Douyin's choice, not ours: the documented scheme.
    expected = hashlib.md5(app_key.encode() + body + app_secret.encode()).hexdigest()  # noqa: S324
    if not hmac.compare_digest(expected, sign.strip().lower()):
        return Refusal(401, "bad_signature", "event-sign does not match the body")
    return None


def douyin_unpack(body: bytes, mapping: PlatformMapping, max_messages: int
                  ) -> Unpacked | Refusal:
    """The body is a JSON array of {tag, msg_id, data: "<JSON object as a string>"}."""
    try:
        batch = _json(body, "the body")
    except ValueError as exc:
        return Refusal(400, "bad_request", str(exc))
    if not isinstance(batch, list):
        return Refusal(400, "bad_request",
                       f"the body must be a JSON array of messages, got {type(batch).__name__}")
    if len(batch) > max_messages:
        return Refusal(400, "bad_request",
                       f"{len(batch)} messages in one request, at most {max_messages}")
    out = Unpacked()
    for element in batch:
        raw = json.dumps(element, ensure_ascii=False).encode()
        msg_id = _element_id(element, "msg_id")
        problem = None
        data: Any = None
        if not isinstance(element, dict):
            problem = "a message must be a JSON object"
        elif not msg_id:
            problem = "msg_id is missing or not an id"
        elif not isinstance(element.get("tag"), (str, int)) or isinstance(element["tag"], bool):
            problem = "tag is missing"
        else:
            data, problem = _embedded_object(element.get("data"), "data")
        if problem is not None:
            out.malformed.append((raw, msg_id, problem))
            continue
        assert isinstance(element, dict) and isinstance(data, dict)
        out.messages.append(PlatformMessage(
            platform="douyin", message_id=msg_id, keys=(str(element["tag"]),), data=data,
            raw=raw, case_ref=_ident(data.get("aftersale_id")),
            order_ref=_ident(data.get("p_id")) or _ident(data.get("s_id")),
            shop_ref=_ident(data.get("shop_id")),
            kind_code=_code(data.get("aftersale_type")),
            status_code=_code(data.get("aftersale_status")),
            amount_fen=_fen(data.get("refund_amount")),
            due_at=platform_time(data.get("status_deadline"), mapping.time_format,
                                 mapping.timezone),
            note=_text(data.get("latest_record")),
        ))
    return out


# ---- Kuaishou (快手小店) --------------------------------------------------------------------

def kuaishou_decrypt(body: bytes, msg_secret: str) -> str | Refusal:
    """The push body is base64 of AES-CBC (key = base64-decoded message secret, zero IV,
    PKCS#7 padding), as Kuaishou's SDKs decrypt it. Only the holder of the secret can
    produce a body that decrypts to JSON: that is the message's authenticity."""
    try:
        key = base64.b64decode(msg_secret, validate=True)
        ciphertext = base64.b64decode(body.strip(), validate=True)
    except (binascii.Error, ValueError):
        return Refusal(401, "bad_signature", "the body is not base64 ciphertext")
    if len(key) not in (16, 24, 32) or not ciphertext or len(ciphertext) % 16:
        return Refusal(401, "bad_signature", "the body is not AES ciphertext for this key")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(decryptor.update(ciphertext) + decryptor.finalize())
        plain += unpadder.finalize()
        return plain.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return Refusal(401, "bad_signature", "the body does not decrypt with the message secret")


def kuaishou_unpack(body: bytes, msg_secret: str, app_key: str, mapping: PlatformMapping
                    ) -> Unpacked | Refusal:
    """One message per request: {eventId, msgId, appKey, event, info: "<JSON>", ...}."""
    plain = kuaishou_decrypt(body, msg_secret)
    if isinstance(plain, Refusal):
        return plain
    try:
        envelope = _json(plain, "the decrypted message")
    except ValueError as exc:
        return Refusal(401, "bad_signature", str(exc))
    if not isinstance(envelope, dict):
        return Refusal(400, "bad_request", "the decrypted message must be a JSON object")
    if not hmac.compare_digest(str(envelope.get("appKey", "")).encode(), app_key.encode()):
        return Refusal(401, "bad_signature", "appKey is not this app's key")
    raw = plain.encode()
    out = Unpacked()
    message_id = _element_id(envelope, "eventId", "msgId")
    info: Any = envelope.get("info")
    problem = None
    if not message_id:
        problem = "eventId is missing or not an id"
    elif not isinstance(envelope.get("event"), str):
        problem = "event is missing"
    else:
        info, problem = _embedded_object(info, "info")
    if problem is not None:
        out.malformed.append((raw, message_id, problem))
        return out
    assert isinstance(info, dict)
    event = envelope["event"]
    status = _code(info.get("status"))
    keys: tuple[str, ...] = (event,)
    if event == "kwaishop_aftersales_updateRefund":
        negotiate = _code(info.get("negotiateStatus"))
        keys = (f"status:{status}",)
        if status in ("10", "11") and negotiate is not None:
            keys = (f"negotiate:{negotiate}", *keys)
    out.messages.append(PlatformMessage(
        platform="kuaishou", message_id=message_id, keys=keys, data=info, raw=raw,
        case_ref=_ident(info.get("refundId")), order_ref=_ident(info.get("orderId")),
        shop_ref=_ident(info.get("sellerId")) or _ident(envelope.get("userId")),
        kind_code=_code(info.get("handlingWay")), status_code=status,
        amount_fen=_fen(info.get("refundFee")),
        due_at=platform_time(info.get("endTime"), mapping.time_format, mapping.timezone),
        carrier=_ident(info.get("expressCode")), tracking_no=_ident(info.get("expressNo")),
    ))
    return out


# ---- Taobao / Tmall (TOP) -------------------------------------------------------------------

def taobao_sign(params: Mapping[str, str], body: bytes, secret: str,
                method: str = "md5") -> str:
    """TOP's signature of a pushed (SPI) request, as its SDK checks it: the query
    parameters except `sign`, sorted by name, each name followed by its value, then the raw
    body; md5 wraps that in the secret, hmac keys HMAC-MD5 with it; upper-case hex."""
    text = "".join(f"{k}{v}" for k, v in sorted(params.items()) if k != "sign").encode()
    text += body
    if method == "hmac":
        return hmac.new(secret.encode(), text, hashlib.md5).hexdigest().upper()
    return hashlib.md5(secret.encode() + text + secret.encode()).hexdigest().upper()  # noqa: S324


def taobao_verify(params: Mapping[str, str], body: bytes, app_key: str, secret: str,
                  now: datetime, mapping: PlatformMapping) -> Refusal | None:
    if params.get("app_key") != app_key:
        return Refusal(401, "bad_signature", "app_key is not this app's key")
    method = params.get("sign_method", "md5")
    if method not in ("md5", "hmac"):
        return Refusal(401, "bad_signature", f"sign_method {method[:20]!r} is not supported")
    sign = params.get("sign", "")
    if not sign or not hmac.compare_digest(taobao_sign(params, body, secret, method),
                                           sign.upper()):
        return Refusal(401, "bad_signature", "sign does not match the request")
    stamp = platform_time(params.get("timestamp"), "local_text", mapping.timezone)
    if stamp is None or abs(now - stamp) > TAOBAO_TIMESTAMP_WINDOW:
        return Refusal(401, "bad_signature", "timestamp missing or more than 15 minutes off")
    return None


def taobao_unpack(body: bytes, mapping: PlatformMapping, max_messages: int
                  ) -> Unpacked | Refusal:
    """A TMC message {id, topic, content: "<JSON>", user_id, ...} or an array of them.
    The deadline is not in the refund topics: when the relay attaches the refund as
    `taobao.refund.get` returns it (`refund`: status, has_good_return,
    refund_remind_timeout), its deadline and status are used."""
    try:
        doc = _json(body, "the body")
    except ValueError as exc:
        return Refusal(400, "bad_request", str(exc))
    if isinstance(doc, dict):
        batch: list[Any] = [doc]
    elif isinstance(doc, list):
        batch = doc
    else:
        return Refusal(400, "bad_request", "the body must be a JSON object or array of them, "
                                          f"got {type(doc).__name__}")
    if len(batch) > max_messages:
        return Refusal(400, "bad_request",
                       f"{len(batch)} messages in one request, at most {max_messages}")
    out = Unpacked()
    for element in batch:
        raw = json.dumps(element, ensure_ascii=False).encode()
        content: Any = element.get("content") if isinstance(element, dict) else None
        problem = None
        if not isinstance(element, dict):
            problem = "a message must be a JSON object"
        elif not isinstance(element.get("topic"), str):
            problem = "topic is missing"
        else:
            content, problem = _embedded_object(content, "content")
        refund = element.get("refund") if isinstance(element, dict) else None
        if problem is None and refund is not None and not isinstance(refund, dict):
            problem = "refund must be a JSON object"
        message_id = _element_id(element, "id")
        if problem is None and not message_id:
            # No TMC id: the refund's own version identifies this change of it.
            assert isinstance(content, dict)
            parts = [_ident(content.get("refund_id")), _ident(content.get("modified"))]
            message_id = ":".join([element["topic"], *[p or "" for p in parts]])
        if problem is not None:
            out.malformed.append((raw, message_id, problem))
            continue
        assert isinstance(element, dict) and isinstance(content, dict)
        refund = refund or {}
        remind = refund.get("refund_remind_timeout", content.get("refund_remind_timeout"))
        due_at = None
        if isinstance(remind, dict) and remind.get("exist_timeout", True) is not False:
            due_at = platform_time(remind.get("timeout"), "local_text", mapping.timezone)
        has_return = refund.get("has_good_return", content.get("has_good_return"))
        out.messages.append(PlatformMessage(
            platform="taobao", message_id=message_id, keys=(element["topic"],), data=content,
            raw=raw, case_ref=_ident(content.get("refund_id")),
            order_ref=_ident(content.get("tid")),
            shop_ref=_ident(element.get("user_id")) or _ident(content.get("seller_nick")),
            kind_code=_code(has_return if has_return is not None else False),
            status_code=_code(refund.get("status", content.get("status"))),
            amount_fen=_yuan_to_fen(content.get("refund_fee")),
            due_at=due_at,
            carrier=_ident(content.get("company_name")), tracking_no=_ident(content.get("sid")),
        ))
    return out
