"""Fixtures the integration tests share."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from services.intake.consumer import IntakeConsumer
from services.intake.processor import IntakeProcessor


@pytest.fixture
def running_intake(amqp: Any, amqp_url: str, processor: IntakeProcessor
                   ) -> Iterator[IntakeConsumer]:
    """Intake's real consumer on the test vhost, in a thread, around the test module's
    `processor` fixture; it must stop cleanly at the end."""
    consumer = IntakeConsumer(amqp_url, processor, prefetch=200, batch_size=100)
    thread = threading.Thread(target=consumer.run_forever, daemon=True)
    thread.start()
    yield consumer
    consumer.stop()
    thread.join(10)
    assert not thread.is_alive()
