"""Messages built as the platforms send them (fields from their public SDKs and docs), and
the platforms' signatures, for the gateway's tests."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from services.gateway.platforms import taobao_sign
from shared.domain.timeutil import CHINA_TZ

DOUYIN_KEY, DOUYIN_SECRET = "7012345678901234567", "douyin-test-secret"
KUAISHOU_KEY = "ks6543210987654321"
KUAISHOU_SECRET = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
TAOBAO_KEY, TAOBAO_SECRET = "12345678", "taobao-test-secret"

GATEWAY_ENV = {
    "AFTERSALES_DOUYIN_APP_KEY": DOUYIN_KEY,
    "AFTERSALES_DOUYIN_APP_SECRET": DOUYIN_SECRET,
    "AFTERSALES_KUAISHOU_APP_KEY": KUAISHOU_KEY,
    "AFTERSALES_KUAISHOU_MSG_SECRET": KUAISHOU_SECRET,
    "AFTERSALES_TAOBAO_APP_KEY": TAOBAO_KEY,
    "AFTERSALES_TAOBAO_APP_SECRET": TAOBAO_SECRET,
}


# ---- Douyin ---------------------------------------------------------------------------------

def douyin_data(aftersale_id: int, *, status: int, type_: int = 1, amount: int = 4990,
                **extra: Any) -> dict[str, Any]:
    """The common `data` fields of tags 200-208 (doudian SDK message structs; their
    `update_time` is a Go time.Time, RFC 3339 in JSON)."""
    return {"aftersale_id": aftersale_id, "aftersale_status": status, "aftersale_type": type_,
            "p_id": 4900000000000000000 + aftersale_id, "s_id": 4900000000000000001,
            "shop_id": 1234567, "reason_code": 3, "refund_amount": amount,
            "refund_post_amount": 0, "refund_voucher_num": 0,
            "update_time": datetime.now(CHINA_TZ).isoformat(timespec="seconds"), **extra}


def douyin_message(tag: str, msg_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """One element of the pushed batch: `data` is a JSON object encoded as a string."""
    return {"tag": tag, "msg_id": msg_id, "data": json.dumps(data, ensure_ascii=False)}


def douyin_body(*messages: dict[str, Any]) -> bytes:
    return json.dumps(list(messages), ensure_ascii=False).encode()


def douyin_headers(body: bytes, key: str = DOUYIN_KEY, secret: str = DOUYIN_SECRET
                   ) -> dict[str, str]:
    sign = hashlib.md5(key.encode() + body + secret.encode()).hexdigest()
    return {"app-id": key, "event-sign": sign, "content-type": "application/json"}


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


# ---- Kuaishou -------------------------------------------------------------------------------

def kuaishou_encrypt(plain: bytes, msg_secret: str) -> bytes:
    """Kuaishou's side of `services.gateway.platforms.kuaishou_decrypt`."""
    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(base64.b64decode(msg_secret)),
                       modes.CBC(bytes(16))).encryptor()
    return base64.b64encode(encryptor.update(data) + encryptor.finalize())


def kuaishou_body(event: str, event_id: str, info: dict[str, Any], *,
                  app_key: str = KUAISHOU_KEY, secret: str = KUAISHOU_SECRET) -> bytes:
    """The pushed body: base64 AES-CBC of the message envelope; `info` a JSON string."""
    envelope = {"eventId": event_id, "msgId": event_id, "bizId": info.get("refundId"),
                "userId": info.get("sellerId"), "openId": "f0a1b2c3", "appKey": app_key,
                "event": event, "info": json.dumps(info), "status": 1,
                "createTime": info.get("createTime"), "updateTime": info.get("updateTime"),
                "test": False}
    return kuaishou_encrypt(json.dumps(envelope).encode(), secret)


def kuaishou_info(refund_id: int, *, status: int, handling_way: int = 10,
                  refund_fee: int = 2990, end_time: datetime | None = None,
                  **extra: Any) -> dict[str, Any]:
    # Times default to now: a fixed date ages, and its deadlines pass (the refund's 7
    # working days once escalated a test case the moment it was approved).
    sent = int(time.time() * 1000)
    info = {"refundId": refund_id, "orderId": 2300000000000 + refund_id,
            "sellerId": 88001, "handlingWay": handling_way, "specialRefundType": 0,
            "status": status, "refundFee": refund_fee,
            "createTime": sent, "updateTime": sent, **extra}
    if end_time is not None:
        info["endTime"] = int(end_time.timestamp() * 1000)
    return info


# ---- Taobao ---------------------------------------------------------------------------------

def taobao_message(topic: str, message_id: int, refund_id: int, *, modified: datetime,
                   refund_fee: str = "129.00", refund: dict[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    content = {"refund_id": refund_id, "tid": 3900000000000 + refund_id,
               "oid": 3900000000001 + refund_id, "refund_fee": refund_fee,
               "bill_type": "refund_bill", "refund_phase": "aftersale",
               "modified": modified.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S"),
               "seller_nick": "测试店铺", "buyer_nick": "t**1", **extra}
    message: dict[str, Any] = {"id": message_id, "topic": topic, "content": json.dumps(content),
                               "pub_time": content["modified"], "pub_app_key": "12497914",
                               "user_id": 66001, "user_nick": "测试店铺"}
    if refund is not None:
        message["refund"] = refund
    return message


def taobao_query(body: bytes, now: datetime, *, key: str = TAOBAO_KEY,
                 secret: str = TAOBAO_SECRET) -> dict[str, str]:
    params = {"app_key": key, "sign_method": "md5", "format": "json", "v": "2.0",
              "timestamp": now.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S")}
    params["sign"] = taobao_sign(params, body, secret)
    return params


def china_text(moment: datetime) -> str:
    return moment.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S")
