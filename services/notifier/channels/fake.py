"""An in-memory channel for unit tests: records sends, can be scripted to fail."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from services.notifier.channels.base import SendResult
from shared.notifications.policy import RenderedMessage


@dataclass(frozen=True)
class SentRecord:
    message: RenderedMessage
    dedup_key: str


class FakeChannel:
    """`script`: what the next calls do, in order: None = succeed, an exception = raise it.
    Once the script is used up every call succeeds."""

    def __init__(self, name: str = "fake", script: Iterable[BaseException | None] = ()) -> None:
        self.name = name
        self._script = list(script)
        self._lock = threading.Lock()
        self.sent: list[SentRecord] = []  # successful sends only
        self.calls = 0

    def fail_next(self, *outcomes: BaseException | None) -> None:
        with self._lock:
            self._script.extend(outcomes)

    def send(self, message: RenderedMessage, dedup_key: str) -> SendResult:
        with self._lock:
            self.calls += 1
            step = self._script.pop(0) if self._script else None
            if step is not None:
                raise step
            self.sent.append(SentRecord(message, dedup_key))
            n = len(self.sent)
        return SendResult(provider=self.name, provider_id=f"{self.name}-{n}")

    def sends_per_key(self) -> Counter[str]:
        """How many times each dedup key went out (a test asserts every count is 1)."""
        return Counter(r.dedup_key for r in self.sent)
