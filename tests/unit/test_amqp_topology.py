"""The simulator's asynchronous publisher declares the same topology as every blocking
publisher (it had drifted: the outbox ledger queue was missing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shared.amqp import (
    INTAKE_QUEUE,
    OUTBOX_LEDGER_QUEUE,
    declare_topology,
    declare_topology_async,
)


class RecordingChannel:
    """Records declarations; as an asynchronous channel, answers each one at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, method: str) -> Callable[..., None]:
        def call(**kwargs: Any) -> None:
            callback = kwargs.pop("callback", None)
            self.calls.append((method, kwargs))
            if callback is not None:
                callback(object())
        return call


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_async_and_blocking_declarations_are_the_same(queue_type: str) -> None:
    blocking, asynchronous, done = RecordingChannel(), RecordingChannel(), []
    declare_topology(blocking, queue_type)  # type: ignore[arg-type]
    declare_topology_async(asynchronous, queue_type, lambda: done.append(True))

    assert asynchronous.calls == blocking.calls
    assert done == [True]
    declared = {kwargs.get("queue") for method, kwargs in blocking.calls
                if method == "queue_declare"}
    assert {INTAKE_QUEUE, OUTBOX_LEDGER_QUEUE} <= declared
