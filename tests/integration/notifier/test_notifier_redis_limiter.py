"""RedisRateLimiter against the real Redis (AFTERSALES_REDIS_URL, default 127.0.0.1:6379).

No Redis = these tests FAIL: the rate limit is part of the notifier's promise.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis

from services.notifier.channels import FakeChannel
from services.notifier.delivery import QuietHours, decide_and_send
from services.notifier.ratelimit import RateLimit, RedisRateLimiter, subject_for
from shared.domain.timeutil import CHINA_TZ_NAME
from shared.notifications.policy import NotificationRequest, RenderedMessage

T0 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
HOUR, DAY = RateLimit("sms", 2, 3600), RateLimit("sms", 3, 86400)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    url = os.environ.get("AFTERSALES_REDIS_URL", "redis://127.0.0.1:6379/0")
    c = redis.Redis.from_url(url, socket_connect_timeout=2)
    c.ping()  # raises -> the test fails (never skipped) when Redis is not there
    yield c
    c.close()


@pytest.fixture
def limiter(client: redis.Redis) -> Iterator[RedisRateLimiter]:
    prefix = f"aftersales-test:{uuid.uuid4()}:"
    yield RedisRateLimiter(client, prefix)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)


def test_sliding_window_defers_with_the_time_a_slot_frees(limiter: RedisRateLimiter) -> None:
    s = subject_for("sms", "13812345678")
    assert limiter.acquire(s, "m1", (HOUR, DAY), T0) is None
    assert limiter.acquire(s, "m2", (HOUR, DAY), T0 + timedelta(minutes=10)) is None
    wait = limiter.acquire(s, "m3", (HOUR, DAY), T0 + timedelta(minutes=20))
    assert wait == pytest.approx(40 * 60)
    # once the first send leaves the hour window, a slot is free again
    assert limiter.acquire(s, "m3", (HOUR, DAY), T0 + timedelta(minutes=60)) is None
    # the day window (3) is now full, though the hour window has room
    wait = limiter.acquire(s, "m4", (HOUR, DAY), T0 + timedelta(minutes=75))
    assert wait == pytest.approx(86400 - 75 * 60)


def test_acquire_is_idempotent_per_message(limiter: RedisRateLimiter,
                                           client: redis.Redis) -> None:
    s = subject_for("sms", "13812345678")
    for _ in range(5):
        assert limiter.acquire(s, "same-key", (HOUR,), T0) is None
    assert client.zcard(limiter.key(s, 3600)) == 1


def test_a_refused_message_takes_no_slot_anywhere(limiter: RedisRateLimiter,
                                                  client: redis.Redis) -> None:
    s = subject_for("sms", "13812345678")
    tight_day = RateLimit("sms", 1, 86400)
    assert limiter.acquire(s, "m1", (HOUR, tight_day), T0) is None
    assert limiter.acquire(s, "m2", (HOUR, tight_day), T0) is not None
    assert client.zcard(limiter.key(s, 3600)) == 1  # m2 did not use up an hourly slot


def test_keys_expire_and_hold_no_address(limiter: RedisRateLimiter,
                                         client: redis.Redis) -> None:
    s = subject_for("sms", "13812345678")
    limiter.acquire(s, "m1", (HOUR, DAY), datetime.now(UTC))
    keys = [k.decode() for k in client.scan_iter(match=limiter.prefix + "*")]
    assert len(keys) == 2
    for k in keys:
        assert "13812345678" not in k
        assert 0 < client.pttl(k) <= 86400 * 1000


def test_recipients_and_channels_are_limited_separately(limiter: RedisRateLimiter) -> None:
    one = RateLimit("sms", 1, 3600)
    assert limiter.acquire(subject_for("sms", "13812345678"), "a", (one,), T0) is None
    assert limiter.acquire(subject_for("sms", "+86 138 1234 5678"), "b", (one,), T0) is not None
    assert limiter.acquire(subject_for("sms", "13900000000"), "c", (one,), T0) is None
    assert limiter.acquire(subject_for("email", "13812345678"), "d", (one,), T0) is None


def test_concurrent_workers_never_exceed_the_limit(limiter: RedisRateLimiter) -> None:
    s = subject_for("sms", "13812345678")
    limit = RateLimit("sms", 5, 3600)
    allowed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def worker(i: int) -> None:
        start.wait(timeout=10)
        if limiter.acquire(s, f"m{i}", (limit,), T0) is None:
            with lock:
                allowed.append(f"m{i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(allowed) == 5


def test_decide_and_send_defers_the_sixth_sms_of_the_hour(limiter: RedisRateLimiter) -> None:
    ch = FakeChannel()
    limits = (RateLimit("sms", 5, 3600),)

    def render(r: NotificationRequest) -> RenderedMessage:
        return RenderedMessage(channel="sms", recipient=r.recipient, template="t", body="x")

    statuses = []
    for i in range(6):
        req = NotificationRequest(
            dedup_key=f"{i:032x}", case_id=f"AS{i}", reason="reminder.due_soon",
            party="merchant", channel="sms", recipient="13812345678", template="t",
            params={}, urgent=False, tz=CHINA_TZ_NAME,
        )
        r = decide_and_send(req, ch, now=T0 + timedelta(minutes=i), attempt=1, limiter=limiter,
                            quiet_hours=QuietHours(), render=render, limits=limits)
        statuses.append(r.status)
    assert statuses == ["sent"] * 5 + ["deferred"]
    assert r.retry_at == T0 + timedelta(hours=1)
    assert len(ch.sent) == 5


def test_acquire_many_answers_as_one_call_each_in_order(limiter: RedisRateLimiter,
                                                        client: redis.Redis) -> None:
    a, b = subject_for("sms", "13812345678"), subject_for("sms", "13900000000")
    slots = [(a, "m1", (HOUR,)), (b, "n1", (HOUR,)), (a, "m2", (HOUR,)),
             (a, "m3", (HOUR,)), (a, "m1", (HOUR,))]
    waits = limiter.acquire_many(slots, T0)
    # a: two allowed, the third over the limit (a slot frees in an hour), m1 again is the
    # same message (idempotent); b is someone else.
    assert waits[:3] == [None, None, None] and waits[4] is None
    assert waits[3] is not None and 3599 <= waits[3] <= 3600
    # What the pipeline stored is what one call each would have: m3 is still refused.
    assert limiter.acquire(a, "m3", (HOUR,), T0 + timedelta(minutes=1)) is not None
    assert limiter.acquire_many([], T0) == []
