"""Recording helpers: they keep every label value inside its bounded set (malformed values
from a bad message fold into ``"invalid"``), so no id or personal data becomes a label."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shared.metrics.catalog import (
    _EVENT_TYPE,
    _IDENT,
    EVENT_OUTCOMES,
    GATEWAY_OUTCOMES,
    GATEWAY_PLATFORMS,
    GATEWAY_VERDICTS,
    INVALID_LABEL,
    NOTIFICATION_OUTCOMES,
    REJECT_REASONS,
    _counter,
    _histogram,
)


def _ident(value: str | None) -> str:
    if value and _IDENT.match(value):
        return value
    return INVALID_LABEL


def _check(value: str, allowed: frozenset[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {sorted(allowed)}, not {value!r}")
    return value


def record_event_received(type_: str | None, outcome: str, platform: str | None) -> None:
    """Count one inbound event. ``type_``/``platform`` straight from a (possibly bad)
    message are accepted: malformed values are folded into ``"invalid"``."""
    t = type_ if type_ and _EVENT_TYPE.match(type_) else INVALID_LABEL
    _counter("EVENTS_RECEIVED").labels(
        type=t, outcome=_check(outcome, EVENT_OUTCOMES, "outcome"), platform=_ident(platform)
    ).inc()


def record_event_rejected(reason: str) -> None:
    _counter("EVENTS_REJECTED").labels(reason=_check(reason, REJECT_REASONS, "reason")).inc()



def record_gateway_request(platform: str, outcome: str) -> None:
    _counter("GATEWAY_REQUESTS").labels(
        platform=_check(platform, GATEWAY_PLATFORMS, "platform"),
        outcome=_check(outcome, GATEWAY_OUTCOMES, "outcome"),
    ).inc()


def record_gateway_message(platform: str, verdict: str) -> None:
    _counter("GATEWAY_MESSAGES").labels(
        platform=_check(platform, GATEWAY_PLATFORMS, "platform"),
        verdict=_check(verdict, GATEWAY_VERDICTS, "verdict"),
    ).inc()


def record_notification(channel: str, outcome: str) -> None:
    _counter("NOTIFICATIONS").labels(
        channel=_ident(channel), outcome=_check(outcome, NOTIFICATION_OUTCOMES, "outcome")
    ).inc()


def record_buyer_rating(platform: str, kind: str, rating: int) -> None:
    """Count one buyer rating; `rating` is 1..5 (the schema's bounds), else "invalid"."""
    _counter("BUYER_RATINGS").labels(
        platform=_ident(platform), kind=_ident(kind),
        rating=str(rating) if rating in range(1, 6) else INVALID_LABEL,
    ).inc()


def record_sla_step(step: str, party: str, met: bool, platform: str, kind: str) -> None:
    """Count one ended step (a ``shared.domain.StepResult``) as met or missed."""
    _counter("SLA_STEPS").labels(
        step=_ident(step),
        party=_ident(party),
        result="met" if met else "missed",
        platform=_ident(platform),
        kind=_ident(kind),
    ).inc()



def record_case_progress(platform: str, kind: str, steps: Iterable[Any],
                         resolved_after_seconds: float | None = None) -> None:
    """SLA metrics for what one change of a case ended: each step met or missed, the
    merchant's first response time, and the time to resolution when the case closed."""
    for step in steps:
        record_sla_step(step.step, step.party, step.met, platform, kind)
        if step.step == "merchant_response":
            _histogram("TIME_TO_FIRST_RESPONSE").labels(
                kind=_ident(kind), platform=_ident(platform)).observe(step.seconds)
    if resolved_after_seconds is not None:
        _histogram("TIME_TO_RESOLUTION").labels(
            kind=_ident(kind), platform=_ident(platform)).observe(resolved_after_seconds)

