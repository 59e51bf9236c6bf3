"""Quiet hours, rate limits, retry classification: the decisions around a send."""

from __future__ import annotations

import random
from datetime import UTC, datetime, time, timedelta

import pytest

from services.notifier.channels import FakeChannel
from services.notifier.delivery import (
    DeliveryResult,
    InMemoryRateLimiter,
    QuietHours,
    RateLimit,
    RetryPolicy,
    decide_and_send,
)
from services.notifier.errors import PermanentSendError, ThrottledError, TransientSendError
from shared.domain.timeutil import CHINA_TZ, CHINA_TZ_NAME
from shared.notifications.policy import NotificationRequest, RenderedMessage


def at(hh: int, mm: int = 0, day: int = 24) -> datetime:
    """An instant given as Shanghai wall time."""
    return datetime(2026, 11, day, hh, mm, tzinfo=CHINA_TZ)


# ---- quiet hours -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "now,until",
    [
        (at(21, 59), None),
        (at(22, 0), at(8, 0, day=25)),  # evening: until tomorrow morning
        (at(23, 30), at(8, 0, day=25)),
        (at(0, 0), at(8, 0)),  # after midnight: until this morning
        (at(7, 59), at(8, 0)),
        (at(8, 0), None),
        (at(12, 0), None),
    ],
)
def test_quiet_hours_across_midnight(now: datetime, until: datetime | None) -> None:
    got = QuietHours().defer_until(now.astimezone(UTC))
    assert got == until
    if got is not None:
        assert got.tzinfo is not None


def test_quiet_hours_use_the_recipient_zone() -> None:
    qh = QuietHours()
    now = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)  # 22:00 Shanghai, 15:00 Berlin
    assert qh.defer_until(now) is not None
    assert qh.defer_until(now, "Europe/Berlin") is None


def test_quiet_hours_within_one_day_and_disabled() -> None:
    lunch = QuietHours(time(12, 0), time(14, 0))
    assert lunch.defer_until(at(13, 0)) == at(14, 0)
    assert lunch.defer_until(at(14, 0)) is None
    assert lunch.defer_until(at(23, 0)) is None
    assert QuietHours.parse("off").defer_until(at(23, 0)) is None
    assert QuietHours.parse("22:30-07:00").defer_until(at(22, 15)) is None
    with pytest.raises(ValueError, match="22:00-08:00"):
        QuietHours.parse("night")


# ---- decide_and_send -------------------------------------------------------------------


def req(urgent: bool = False, channel: str = "sms", recipient: str = "13812345678",
        key: str = "a" * 32) -> NotificationRequest:
    return NotificationRequest(
        dedup_key=key, case_id="AS1", reason="reminder.due_soon", party="merchant",
        channel=channel, recipient=recipient, template="t", params={}, urgent=urgent,
        tz=CHINA_TZ_NAME,
    )


def render(r: NotificationRequest) -> RenderedMessage:
    return RenderedMessage(channel=r.channel, recipient=r.recipient, template=r.template,
                           body="text", template_param={"case_id": r.case_id})


def send(r: NotificationRequest, ch: FakeChannel, now: datetime, attempt: int = 1,
         limiter: InMemoryRateLimiter | None = None, **kw: object) -> DeliveryResult:
    return decide_and_send(r, ch, now=now, attempt=attempt,
                           limiter=limiter or InMemoryRateLimiter(), quiet_hours=QuietHours(),
                           render=render, rng=random.Random(7), **kw)  # type: ignore[arg-type]


def test_sends_in_daytime_with_the_dedup_key() -> None:
    ch = FakeChannel()
    r = send(req(), ch, at(10))
    assert r.status == "sent" and r.attempted and r.provider_id == "fake-1"
    assert ch.sent[0].dedup_key == "a" * 32


def test_non_urgent_waits_for_morning_urgent_goes_now() -> None:
    ch = FakeChannel()
    r = send(req(urgent=False), ch, at(23))
    assert r == DeliveryResult("deferred", retry_at=at(8, day=25), error_kind="quiet_hours")
    assert ch.calls == 0  # deferred, not an attempt, nothing sent
    assert send(req(urgent=True), ch, at(23)).status == "sent"


def test_rate_limit_defers_never_drops() -> None:
    limiter = InMemoryRateLimiter()
    ch = FakeChannel()
    limits = (RateLimit("sms", 2, 3600),)
    t0 = at(10)
    results = [
        send(req(key=f"{i:032d}"), ch, t0 + timedelta(minutes=i), limiter=limiter, limits=limits)
        for i in range(3)
    ]
    assert [r.status for r in results] == ["sent", "sent", "deferred"]
    third = results[2]
    assert third.error_kind == "rate_limited" and not third.attempted
    assert third.retry_at == t0 + timedelta(hours=1)  # when the first slot frees
    later = send(req(key=f"{2:032d}"), ch, third.retry_at, limiter=limiter, limits=limits)
    assert later.status == "sent"
    # other channels and other phones are not limited by it
    assert send(req(recipient="13900000000", key="b" * 32), ch, t0, limiter=limiter,
                limits=limits).status == "sent"


def test_a_retry_does_not_take_a_second_rate_limit_slot() -> None:
    limiter = InMemoryRateLimiter()
    limits = (RateLimit("sms", 1, 3600),)
    ch = FakeChannel(script=[TransientSendError("503")])
    first = send(req(), ch, at(10), limiter=limiter, limits=limits)
    assert first.status == "retry"
    assert send(req(), ch, first.retry_at, attempt=2, limiter=limiter,  # type: ignore[arg-type]
                limits=limits).status == "sent"


def test_throttled_retries_after_the_provider_hint() -> None:
    ch = FakeChannel(script=[ThrottledError("flow control", retry_after=3600)])
    r = send(req(urgent=True), ch, at(10))
    assert r.status == "retry" and r.error_kind == "throttled" and r.attempted
    assert r.retry_at is not None
    assert timedelta(hours=1) <= r.retry_at - at(10) <= timedelta(hours=1, minutes=1)
    no_hint = send(req(urgent=True), FakeChannel(script=[ThrottledError("slow down")]), at(10))
    assert no_hint.retry_at is not None
    assert timedelta(seconds=60) <= no_hint.retry_at - at(10) <= timedelta(seconds=66)


def test_transient_backs_off_then_fails_at_the_cap() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay_s=10, max_delay_s=3600)
    waits = []
    for attempt in (1, 2, 3):
        r = send(req(urgent=True), FakeChannel(script=[TransientSendError("503")]), at(10),
                 attempt=attempt, retry=policy)
        assert r.status == "retry" and r.error_kind == "transient"
        waits.append((r.retry_at - at(10)).total_seconds())  # type: ignore[operator]
    assert 5 <= waits[0] <= 10 and 10 <= waits[1] <= 20 and 20 <= waits[2] <= 40
    last = send(req(urgent=True), FakeChannel(script=[TransientSendError("503")]), at(10),
                attempt=4, retry=policy)
    assert last.status == "failed" and last.retry_at is None and last.error == "503"


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(base_delay_s=30, max_delay_s=600)
    rng = random.Random(1)
    samples = [policy.backoff_s(20, rng) for _ in range(200)]
    assert all(300 <= s <= 600 for s in samples)
    assert len({round(s) for s in samples}) > 50  # spread out, not one value


def test_permanent_fails_at_once() -> None:
    ch = FakeChannel(script=[PermanentSendError("bad number", code="isv.MOBILE_NUMBER_ILLEGAL")])
    r = send(req(urgent=True), ch, at(10))
    assert r.status == "failed" and r.error_kind == "permanent"
    assert r.error == "isv.MOBILE_NUMBER_ILLEGAL: bad number"


def test_throttling_has_its_own_larger_cap() -> None:
    policy = RetryPolicy(max_attempts=2, max_throttled_attempts=5)
    mid = send(req(urgent=True), FakeChannel(script=[ThrottledError("x")]), at(10), attempt=3,
               retry=policy)
    assert mid.status == "retry"
    end = send(req(urgent=True), FakeChannel(script=[ThrottledError("x")]), at(10), attempt=5,
               retry=policy)
    assert end.status == "failed"


def test_unexpected_adapter_errors_count_as_transient() -> None:
    r = send(req(urgent=True), FakeChannel(script=[RuntimeError("bug")]), at(10))
    assert r.status == "retry" and r.error_kind == "transient"


def test_render_failure_is_permanent_and_sends_nothing() -> None:
    from shared.notifications.policy import PolicyError

    def broken(_: NotificationRequest) -> RenderedMessage:
        raise PolicyError("template t: 'refund_fen' is undefined")

    ch = FakeChannel()
    r = decide_and_send(req(urgent=True), ch, now=at(10), attempt=1,
                        limiter=InMemoryRateLimiter(), quiet_hours=QuietHours(), render=broken)
    assert r.status == "failed" and r.error_kind == "render" and ch.calls == 0


def test_limiter_outage_waits_and_is_no_attempt_nor_an_unlimited_send() -> None:
    class Down:
        def acquire(self, *a: object) -> float | None:
            raise ConnectionError("redis down")

        def acquire_many(self, *a: object) -> list[float | None]:
            raise ConnectionError("redis down")

    ch = FakeChannel()
    policy = RetryPolicy(max_attempts=2, outage_wait_s=10)
    # However many times Redis was down before, the message waits again: never failed.
    for attempt in (1, 2, 50):
        r = decide_and_send(req(urgent=True), ch, now=at(10), attempt=attempt, limiter=Down(),
                            quiet_hours=QuietHours(), render=render, retry=policy)
        assert r.status == "deferred" and r.error_kind == "limiter" and ch.calls == 0
        assert not r.attempted
        assert r.retry_at is not None
        assert timedelta(seconds=10) <= r.retry_at - at(10) <= timedelta(seconds=20)


def test_transient_failures_are_retried_without_a_cap_when_none_is_set() -> None:
    policy = RetryPolicy(max_attempts=None, base_delay_s=10, max_delay_s=60)
    r = send(req(urgent=True), FakeChannel(script=[TransientSendError("503")]), at(10),
             attempt=40, retry=policy)
    assert r.status == "retry" and r.retry_at is not None
    assert r.retry_at - at(10) <= timedelta(seconds=60)


def test_throttling_is_retried_until_expiry_when_no_cap_is_set() -> None:
    policy = RetryPolicy(max_attempts=None, max_throttled_attempts=None)
    r = send(req(urgent=True), FakeChannel(script=[ThrottledError("x", retry_after=60)]),
             at(10), attempt=500, retry=policy)
    assert r.status == "retry" and r.retry_at is not None and r.retry_at > at(10)


def test_the_notifiers_default_settings_wait_out_throttling_and_outages() -> None:
    from services.notifier.main import retry_policy
    from shared.config import DeliverySettings

    unlimited = retry_policy(DeliverySettings())
    assert unlimited.max_attempts is None and unlimited.max_throttled_attempts is None
    capped = retry_policy(DeliverySettings(max_attempts=3))
    assert capped.max_attempts == 3 and capped.max_throttled_attempts == 30


def test_redelivery_of_a_sent_message_is_the_callers_job_but_keys_make_it_visible() -> None:
    # The actor checks the row's status before calling; here: a fake that counts per key
    ch = FakeChannel()
    send(req(urgent=True), ch, at(10))
    assert ch.sends_per_key() == {"a" * 32: 1}


# ---- in-memory limiter -----------------------------------------------------------------


def test_in_memory_limiter_windows() -> None:
    lim = InMemoryRateLimiter()
    hour, day = RateLimit("sms", 2, 3600), RateLimit("sms", 3, 86400)
    t = at(10)
    assert lim.acquire("s", "m1", (hour, day), t) is None
    assert lim.acquire("s", "m1", (hour, day), t) is None  # same member: idempotent
    assert lim.acquire("s", "m2", (hour, day), t + timedelta(minutes=1)) is None
    wait = lim.acquire("s", "m3", (hour, day), t + timedelta(minutes=2))
    assert wait == pytest.approx(3600 - 120)
    assert lim.count("s", 86400) == 2  # refused message took no slot in the day window
    assert lim.acquire("s", "m3", (hour, day), t + timedelta(hours=1)) is None
    wait = lim.acquire("s", "m4", (hour, day), t + timedelta(hours=1, minutes=2))
    assert wait == pytest.approx(86400 - 3600 - 120)  # now the day window is full


def test_maybe_delivered_is_failed_not_retried_unless_configured() -> None:
    unanswered = TransientSendError("ReadTimeout", code="no_answer", maybe_sent=True)
    r = send(req(urgent=True), FakeChannel(script=[unanswered]), at(10))
    assert r.status == "failed" and r.error_kind == "ambiguous" and r.attempted
    r = send(req(urgent=True), FakeChannel(script=[unanswered]), at(10),
             retry=RetryPolicy(retry_ambiguous=True))
    assert r.status == "retry"


def test_ops_escalations_have_their_own_limits() -> None:
    from dataclasses import replace

    from services.notifier.delivery import DEFAULT_RATE_LIMITS, decide_many

    limiter = InMemoryRateLimiter()
    phone = "13812345678"  # an ops phone that is also a shop's number

    def ask(party: str, i: int) -> tuple[NotificationRequest, int]:
        return replace(req(urgent=True, recipient=phone, key=f"{party}{i:031d}"),
                       party=party), 1

    def decide(party: str, n: int) -> list[object]:
        return decide_many([ask(party, i) for i in range(n)], now=at(10), limiter=limiter,
                           quiet_hours=QuietHours(), render=render, limits=DEFAULT_RATE_LIMITS)

    merchant = decide("merchant", 6)
    assert [isinstance(d, RenderedMessage) for d in merchant] == [True] * 5 + [False]
    # The merchants' 5 an hour are used up on this number; escalations still go out.
    ops = decide("ops", 20)
    assert all(isinstance(d, RenderedMessage) for d in ops)
