"""Test doubles shared by the notifier unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class StubNotice:
    """Shaped like shared.domain.Notice (which the policy must accept without importing)."""

    reason: str
    case_id: str = "AS20261122001"
    step: str = "merchant_response"
    party: str | None = "merchant"
    due_at: datetime | None = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
    urgent: bool = False
    params: dict[str, Any] = field(default_factory=dict)
