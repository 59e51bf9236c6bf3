from __future__ import annotations

import pytest

from shared.notifications.policy import NotificationPolicy, OpsContacts


@pytest.fixture(scope="session")
def policy() -> NotificationPolicy:
    return NotificationPolicy.load()


@pytest.fixture
def contacts() -> dict[str, dict[str, str]]:
    return {
        "buyer": {"phone": "13812345678", "email": "buyer@example.com"},
        "merchant": {"phone": "13987654321", "email": "shop@example.com"},
    }


@pytest.fixture
def ops() -> OpsContacts:
    return OpsContacts.parse("ops1@example.com, ops2@example.com", "13700000001")
