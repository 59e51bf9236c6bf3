"""Delivery policy: whether to send a notification now, and what to do when sending fails.

`decide_and_send` is everything needed between "claimed the row" and "record the
result" for one notification; the notifier's sender uses its two halves for a chunk of
rows: `decide_many` (steps 1 to 3, with one round trip to the rate limiter for the whole
chunk) and `send_now` (step 4) for each message cleared to go:

1. quiet hours: a non-urgent message in the recipient's quiet hours (default 22:00-08:00
   Asia/Shanghai) is deferred to the end of them - deferred, never dropped;
2. render the message (a template/parameter problem fails it for good);
3. per-recipient rate limits: over the limit -> deferred until a slot frees;
4. send through the channel; classify a failure:
   throttled -> retry after the provider's hint (or a default),
   transient -> exponential backoff with jitter, at most `max_attempts` attempts
   (except a request that left us unanswered: it may have been delivered -> failed,
   "ambiguous", unless RetryPolicy.retry_ambiguous),
   permanent -> failed now, with the error recorded.

Exactly once: the caller records the dedup key (the notifications row) before calling,
stamps the row handed over just before the call, and records the result after. If the
process dies during `channel.send`, the outcome is unknown; the sender must then NOT send
again blindly (the row is `sending` and stamped): it marks it failed/unknown, so a person
never gets the same message twice. The dedup key sent
as Message-ID / OutId / SessionContext lets ops check the provider's records.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from services.notifier.channels.base import Channel
from services.notifier.errors import (
    PermanentSendError,
    SendError,
    ThrottledError,
    TransientSendError,
)
from services.notifier.ratelimit import (
    InMemoryRateLimiter,
    RateLimit,
    RateLimiter,
    scope_of,
    subject_for,
)
from shared.config import RateLimitSettings
from shared.domain.timeutil import CHINA_TZ_NAME
from shared.notifications.masking import mask_address, mask_text
from shared.notifications.policy import NotificationRequest, PolicyError, RenderedMessage

log = logging.getLogger("aftersales.notifier.delivery")

Status = Literal["sent", "deferred", "retry", "failed"]

__all__ = [
    "DEFAULT_RATE_LIMITS",
    "DeliveryResult",
    "InMemoryRateLimiter",
    "QuietHours",
    "RateLimit",
    "RateLimiter",
    "RetryPolicy",
    "decide_and_send",
    "decide_many",
    "rate_limits",
    "send_now",
]

def rate_limits(group: RateLimitSettings) -> tuple[RateLimit, ...]:
    """The limits the settings give: per address (merchants, buyers) and, looser, for
    escalations to ops (a flood of escalations is a signal ops must get, yet a loop must
    not page a phone without end)."""
    return (
        RateLimit("sms", group.sms_per_phone_per_hour, 3600),
        RateLimit("sms", group.sms_per_phone_per_day, 86400),
        RateLimit("email", group.email_per_address_per_hour, 3600),
        RateLimit("sms", group.ops_sms_per_phone_per_hour, 3600, scope="ops"),
        RateLimit("sms", group.ops_sms_per_phone_per_day, 86400, scope="ops"),
        RateLimit("email", group.ops_email_per_address_per_hour, 3600, scope="ops"),
    )


# The settings' defaults (model_construct: no environment read at import).
DEFAULT_RATE_LIMITS: tuple[RateLimit, ...] = rate_limits(RateLimitSettings.model_construct())


@dataclass(frozen=True)
class QuietHours:
    """Local hours in which non-urgent messages wait. start == end disables them."""

    start: time = time(22, 0)
    end: time = time(8, 0)
    tz: str = CHINA_TZ_NAME  # used when the recipient's zone is unknown

    @classmethod
    def parse(cls, spec: str, tz: str = CHINA_TZ_NAME) -> QuietHours:
        """"22:00-08:00" (the AFTERSALES_QUIET_HOURS form); "" or "off" disables."""
        s = spec.strip().lower()
        if s in ("", "off", "none"):
            return cls(time(0, 0), time(0, 0), tz)
        try:
            a, b = s.split("-")
            start, end = time.fromisoformat(a.strip()), time.fromisoformat(b.strip())
        except ValueError:
            raise ValueError(f"quiet hours must look like 22:00-08:00, not {spec!r}") from None
        ZoneInfo(tz)  # fail at start on an unknown zone, not at 22:00
        return cls(start, end, tz)

    @property
    def enabled(self) -> bool:
        return self.start != self.end

    def defer_until(self, now: datetime, tz: str | None = None) -> datetime | None:
        """None if `now` is outside quiet hours, else the instant they end (in now's zone)."""
        if not self.enabled:
            return None
        zone = ZoneInfo(tz or self.tz)
        local = now.astimezone(zone)
        t = local.time().replace(tzinfo=None)
        if self.start < self.end:  # e.g. 12:00-14:00, within one day
            quiet = self.start <= t < self.end
            end_day = local.date()
        else:  # across midnight, e.g. 22:00-08:00
            quiet = t >= self.start or t < self.end
            end_day = local.date() + timedelta(days=1) if t >= self.start else local.date()
        if not quiet:
            return None
        end = datetime.combine(end_day, self.end, tzinfo=zone)
        return end.astimezone(now.tzinfo)


@dataclass(frozen=True)
class RetryPolicy:
    # Transient failures (a provider down, 5xx, a connection refused): attempts in all,
    # then failed. None: retried with backoff until the notification expires (the
    # notifier's AFTERSALES_NOTIFY_VALID_SECONDS): an outage is waited out.
    max_attempts: int | None = 6
    # The rate limiter (Redis) unreachable: not an attempt, nothing was sent; the message
    # waits this long (plus up to as much jitter) and is tried again.
    outage_wait_s: float = 10.0
    base_delay_s: float = 30.0
    max_delay_s: float = 3600.0
    throttle_default_s: float = 60.0  # when the provider throttles without a hint
    # Throttling is the provider saying "later", not a fault; allow many more attempts,
    # but not forever (a number on a permanent blacklist-like limit must end somewhere).
    # None: retried until the notification expires (the notifier's setting when
    # AFTERSALES_NOTIFY_MAX_ATTEMPTS is unset: only a refusal or the expiry fails one).
    max_throttled_attempts: int | None = 30
    # A request that left us without an answer may have been delivered. "Never twice to the
    # same person" wins by default: such a message is failed (error_kind "ambiguous") and
    # recorded for ops, not retried. True = retry it (at-least-once) instead.
    retry_ambiguous: bool = False

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential (base * 2^(attempt-1)), capped, with "equal jitter": half fixed, half
        random, so retries of many messages spread out but never come back immediately."""
        r = rng or random
        d = min(self.max_delay_s, self.base_delay_s * (2 ** max(0, attempt - 1)))
        return d / 2 + r.uniform(0, d / 2)

    def throttle_wait_s(self, hint: float | None, rng: random.Random | None = None) -> float:
        r = rng or random
        wait = hint if hint is not None and hint > 0 else self.throttle_default_s
        # Up to 10% (max 60 s) extra so messages throttled together do not return together.
        return wait + r.uniform(0, min(wait * 0.1, 60.0))


@dataclass(frozen=True)
class DeliveryResult:
    status: Status
    retry_at: datetime | None = None  # deferred / retry: when to try again (send_after)
    error: str | None = None
    # quiet_hours | rate_limited | throttled | transient | permanent | render | limiter
    # | bug (an unexpected error before the send)
    error_kind: str | None = None
    provider_id: str | None = None
    # True when this counts as an attempt (the caller increments the row's attempts):
    # the provider was called. Deferrals (also while the limiter is down) are not.
    attempted: bool = False


def decide_and_send(
    request: NotificationRequest,
    channel: Channel,
    *,
    now: datetime,
    attempt: int,
    limiter: RateLimiter,
    quiet_hours: QuietHours,
    render: Callable[[NotificationRequest], RenderedMessage],
    limits: Sequence[RateLimit] = DEFAULT_RATE_LIMITS,
    retry: RetryPolicy = RetryPolicy(),
    rng: random.Random | None = None,
) -> DeliveryResult:
    """Send one notification now, or say when to try again.

    `attempt`: 1 for the first call that may reach the provider, +1 after each call that
    did (DeliveryResult.attempted). `now`: timezone-aware.
    """
    decided = decide_many([(request, attempt)], now=now, limiter=limiter,
                          quiet_hours=quiet_hours, render=render, limits=limits,
                          retry=retry, rng=rng)[0]
    if isinstance(decided, DeliveryResult):
        return decided
    return send_now(request, decided, channel, now=now, attempt=attempt, retry=retry, rng=rng)


def decide_many(
    asks: Sequence[tuple[NotificationRequest, int]],
    *,
    now: datetime,
    limiter: RateLimiter,
    quiet_hours: QuietHours,
    render: Callable[[NotificationRequest], RenderedMessage],
    limits: Sequence[RateLimit] = DEFAULT_RATE_LIMITS,
    retry: RetryPolicy = RetryPolicy(),
    rng: random.Random | None = None,
) -> list[DeliveryResult | RenderedMessage]:
    """Steps 1 to 3 for a chunk of (request, attempt): for each, either its result now
    (deferred, failed, retry) or the rendered message to send now with `send_now`.

    The rate limits of the whole chunk take one round trip to the limiter (one call each
    was a fifth of the notifier's CPU). The answers are those of one call each, in the
    chunk's order: every acquisition is atomic and sees the ones before it."""
    out: list[DeliveryResult | RenderedMessage] = []
    limited: list[int] = []  # positions in `out` whose rate-limit slot must be taken
    slots: list[tuple[str, str, Sequence[RateLimit]]] = []
    for request, _attempt in asks:
        try:
            decided = _quiet_or_render(request, now, quiet_hours, render)
        except Exception as exc:  # a bug for this message: nothing was sent, nor will be
            log.exception("unexpected error before sending %s", _LogContext(request))
            decided = DeliveryResult(
                "failed", error=mask_text(f"unknown: {exc!r} before the send; not repeated"),
                error_kind="bug")
        scope = scope_of(request.party)
        mine = [lim for lim in limits if lim.channel == request.channel and lim.scope == scope]
        if mine and not isinstance(decided, DeliveryResult):
            limited.append(len(out))
            slots.append((subject_for(request.channel, request.recipient, scope),
                          request.dedup_key, mine))
        out.append(decided)
    if not slots:
        return out
    try:
        waits: list[float | None] = list(limiter.acquire_many(slots, now))
    except Exception as exc:
        # Redis down: nothing was sent and no attempt was made; wait for it rather than
        # send unlimited. Only the notification's expiry (the sender) ends the wait.
        r = rng or random
        for position in limited:
            request, _attempt = asks[position]
            at = now + timedelta(seconds=retry.outage_wait_s * (1 + r.random()))
            log.warning("limiter unavailable, waiting until %s %s: %s", at.isoformat(),
                        _LogContext(request), mask_text(str(exc)))
            out[position] = DeliveryResult(
                "deferred", retry_at=at, error=mask_text(f"rate limiter: {exc}")[:1000],
                error_kind="limiter")
        return out
    for position, wait in zip(limited, waits, strict=True):
        if wait is not None:
            until = now + timedelta(seconds=wait)
            log.info("deferred (rate limit) until %s %s", until.isoformat(),
                     _LogContext(asks[position][0]))
            out[position] = DeliveryResult("deferred", retry_at=until, error_kind="rate_limited")
    return out


def send_now(
    request: NotificationRequest,
    message: RenderedMessage,
    channel: Channel,
    *,
    now: datetime,
    attempt: int,
    retry: RetryPolicy = RetryPolicy(),
    rng: random.Random | None = None,
) -> DeliveryResult:
    """Step 4: hand a message that `decide_many` cleared to its channel; classify a failure."""
    try:
        result = channel.send(message, request.dedup_key)
    except SendError as exc:
        return _retry_or_fail(exc, attempt, now, retry, rng, _LogContext(request))
    except Exception as exc:
        # An adapter bug or an unexpected library error: treat as transient (capped), so
        # it shows up as retries and then a recorded failure instead of a stuck message.
        log.exception("unexpected error from %s channel %s", channel.name, _LogContext(request))
        return _retry_or_fail(
            TransientSendError(f"{type(exc).__name__}: {exc}"), attempt, now, retry, rng,
            _LogContext(request)
        )
    log.info("sent via %s id=%s %s", result.provider, result.provider_id, _LogContext(request))
    return DeliveryResult("sent", provider_id=result.provider_id, attempted=True)


class _LogContext:
    """A notification's log context, built only if a log line is written (masking the
    address for every message sent cost CPU even with INFO off)."""

    __slots__ = ("request",)

    def __init__(self, request: NotificationRequest) -> None:
        self.request = request

    def __str__(self) -> str:
        r = self.request
        return f"key={r.dedup_key} case={r.case_id} reason={r.reason} " \
               f"channel={r.channel} to={mask_address(r.recipient, r.channel)}"


def _quiet_or_render(
    request: NotificationRequest, now: datetime, quiet_hours: QuietHours,
    render: Callable[[NotificationRequest], RenderedMessage],
) -> DeliveryResult | RenderedMessage:
    """Steps 1 and 2: deferred for quiet hours, failed for good if it cannot be rendered,
    else the message."""
    if not request.urgent:
        until = quiet_hours.defer_until(now, request.tz)
        if until is not None:
            log.info("deferred (quiet hours) until %s %s", until.isoformat(), _LogContext(request))
            return DeliveryResult("deferred", retry_at=until, error_kind="quiet_hours")
    try:
        return render(request)
    except (PolicyError, KeyError, ValueError) as exc:
        error = mask_text(f"render: {exc}")
        log.error("failed (render) %s: %s", _LogContext(request), error)
        return DeliveryResult("failed", error=error, error_kind="render")


def _retry_or_fail(
    exc: SendError,
    attempt: int,
    now: datetime,
    retry: RetryPolicy,
    rng: random.Random | None,
    ctx: _LogContext,
    kind: str | None = None,
) -> DeliveryResult:
    kind = kind or exc.kind
    # Servers quote the address back ("550 <a@b.c>: unknown user"): mask before it is
    # logged or stored.
    error = mask_text(str(exc))
    if isinstance(exc, PermanentSendError):
        log.error("failed (permanent) %s: %s", ctx, error)
        return DeliveryResult("failed", error=error, error_kind=kind, attempted=True)
    if isinstance(exc, ThrottledError):
        if retry.max_throttled_attempts is not None and attempt >= retry.max_throttled_attempts:
            log.error("failed (throttled %d times) %s: %s", attempt, ctx, error)
            return DeliveryResult("failed", error=error, error_kind=kind, attempted=True)
        at = now + timedelta(seconds=retry.throttle_wait_s(exc.retry_after, rng))
        log.warning("throttled, retry at %s %s: %s", at.isoformat(), ctx, error)
        return DeliveryResult("retry", retry_at=at, error=error, error_kind=kind, attempted=True)
    if isinstance(exc, TransientSendError) and exc.maybe_sent and not retry.retry_ambiguous:
        log.error("failed (may have been delivered; not retried) %s: %s", ctx, error)
        return DeliveryResult("failed", error=error, error_kind="ambiguous", attempted=True)
    if retry.max_attempts is not None and attempt >= retry.max_attempts:
        log.error("failed after %d attempts %s: %s", attempt, ctx, error)
        return DeliveryResult("failed", error=error, error_kind=kind, attempted=True)
    at = now + timedelta(seconds=retry.backoff_s(attempt, rng))
    log.warning("transient failure, retry at %s (attempt %d) %s: %s", at.isoformat(), attempt,
                ctx, error)
    return DeliveryResult("retry", retry_at=at, error=error, error_kind=kind, attempted=True)
