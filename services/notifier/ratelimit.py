"""Per-recipient rate limits (e.g. at most 5 SMS per phone per hour, 10 per day).

Sliding-window log: one sorted set per (recipient, channel, window) whose members are the
dedup keys of the messages sent, scored by send time. Over the limit nothing is dropped:
the caller gets the time a slot frees up and defers the message until then.

Taking a slot is idempotent per dedup key: a message that took a slot, then failed
transiently and is retried, does not take a second one.

Redis holds only this (losing it means a burst may pass, nothing worse), keys expire
with their window, and keys hold a hash of the address, never the address itself.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from shared.notifications.policy import normalize_address


@dataclass(frozen=True)
class RateLimit:
    channel: str  # "sms" | "email"
    limit: int  # messages per window per recipient
    window_s: int
    # Whose messages it limits: "contacts" (buyers, merchants) or "ops" (escalations to
    # our own people, who must not share the 10-a-day cap meant to spare customers).
    scope: str = "contacts"


def scope_of(party: str) -> str:
    return "ops" if party == "ops" else "contacts"


# What one acquisition asks for: (subject, member, limits).
Slot = tuple[str, str, Sequence[RateLimit]]


class RateLimiter(Protocol):
    def acquire(
        self, subject: str, member: str, limits: Sequence[RateLimit], now: datetime
    ) -> float | None:
        """Take a slot for `member` in every window of `limits`, all or none.

        Returns None when allowed, else the seconds until a slot frees in the fullest window.
        """
        ...

    def acquire_many(self, slots: Sequence[Slot], now: datetime) -> list[float | None]:
        """`acquire` for each slot, in order, as if called one after another."""
        ...


def subject_for(channel: str, recipient: str, scope: str = "contacts") -> str:
    """The rate-limited subject: channel + a hash of the normalised address (ops' own
    counters apart: an ops phone that is also a merchant's does not share them)."""
    digest = hashlib.sha256(normalize_address(recipient, channel).encode("utf-8")).hexdigest()
    prefix = channel if scope == "contacts" else f"{scope}-{channel}"
    return f"{prefix}:{digest[:24]}"


# KEYS: one sorted set per limit. ARGV: now_ms, member, then (window_ms, limit) per key.
# Checks every window first and only then records the send in all of them, so a message
# refused by the daily window does not use up a slot of the hourly one.
_ACQUIRE_LUA = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local wait = 0
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[1 + 2 * i])
  local limit = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if not redis.call('ZSCORE', key, member) then
    if redis.call('ZCARD', key) >= limit then
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      local w = tonumber(oldest[2]) + window - now
      if w > wait then wait = w end
    end
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[1 + 2 * i])
  if not redis.call('ZSCORE', key, member) then
    redis.call('ZADD', key, now, member)
  end
  redis.call('PEXPIRE', key, window)
end
return 0
"""


class RedisRateLimiter:
    """`redis_client`: a redis.Redis; `prefix`: the deployment's key prefix
    (AFTERSALES_REDIS_PREFIX, e.g. "aftersales:"), so tests and tenants never collide."""

    def __init__(self, redis_client: Any, prefix: str = "aftersales:") -> None:
        self._redis = redis_client
        self.prefix = prefix
        self._script = redis_client.register_script(_ACQUIRE_LUA)

    def key(self, subject: str, window_s: int) -> str:
        return f"{self.prefix}ratelimit:{subject}:{window_s}"

    def acquire(
        self, subject: str, member: str, limits: Sequence[RateLimit], now: datetime
    ) -> float | None:
        if not limits:
            return None
        keys = [self.key(subject, lim.window_s) for lim in limits]
        args: list[Any] = [int(now.timestamp() * 1000), member]
        for lim in limits:
            args += [lim.window_s * 1000, lim.limit]
        wait_ms = int(self._script(keys=keys, args=args))
        return None if wait_ms <= 0 else wait_ms / 1000.0

    def acquire_many(self, slots: Sequence[Slot], now: datetime) -> list[float | None]:
        """One round trip for all: the scripts run one after another in a pipeline (no
        MULTI needed: each script is atomic, and order is all `acquire` promises)."""
        now_ms = int(now.timestamp() * 1000)
        pipe = self._redis.pipeline(transaction=False)
        for subject, member, limits in slots:
            args: list[Any] = [now_ms, member]
            for lim in limits:
                args += [lim.window_s * 1000, lim.limit]
            self._script(keys=[self.key(subject, lim.window_s) for lim in limits], args=args,
                         client=pipe)
        return [None if int(wait_ms) <= 0 else int(wait_ms) / 1000.0
                for wait_ms in pipe.execute()]


class InMemoryRateLimiter:
    """The same semantics in a dict, for unit tests and single-process local runs."""

    def __init__(self) -> None:
        self._sets: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def acquire(
        self, subject: str, member: str, limits: Sequence[RateLimit], now: datetime
    ) -> float | None:
        t = now.timestamp()
        with self._lock:
            wait = 0.0
            for lim in limits:
                s = self._sets.setdefault(f"{subject}:{lim.window_s}", {})
                for m, ts in list(s.items()):
                    if ts <= t - lim.window_s:
                        del s[m]
                if member not in s and len(s) >= lim.limit:
                    wait = max(wait, min(s.values()) + lim.window_s - t)
            if wait > 0:
                return wait
            for lim in limits:
                self._sets[f"{subject}:{lim.window_s}"].setdefault(member, t)
            return None

    def acquire_many(self, slots: Sequence[Slot], now: datetime) -> list[float | None]:
        return [self.acquire(subject, member, limits, now) for subject, member, limits in slots]

    def count(self, subject: str, window_s: int) -> int:
        return len(self._sets.get(f"{subject}:{window_s}", {}))
