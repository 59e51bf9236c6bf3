"""Events and constants shared by the write path's unit tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

T0 = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
OPS = {"emails": ["ops@example.com"], "phones": []}


def ev(event_id: str, type_: str, case_id: str = "AS1", at: datetime = T0,
       data: dict[str, Any] | None = None, **extra: Any) -> bytes:
    return json.dumps({
        "event_id": event_id, "type": type_, "occurred_at": at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": "O1", "case_id": case_id,
        "data": data or {}, **extra,
    }).encode()


def opened(event_id: str, case_id: str = "AS1", at: datetime = T0) -> bytes:
    return ev(event_id, "case.opened", case_id, at, {
        "kind": "exchange", "amount_fen": 12900, "reason": "尺码不合适",
        "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"},
    })


