"""The notifier's work on notification rows: claim them, send them (or defer them), record
what happened. Exactly once per dedup key:

1. Claim in a transaction (rows `new`, `queued` or, from before 0002, `pending` become
   `sending` under this claim's token): a row already `sent` or `failed` is a redelivery
   and does nothing. A row found `sending` belongs to an earlier claim. If that claim
   stamped it handed over (or has no token: a notifier from before the stamps), it may
   or may not have reached the provider: it is recorded as failed ("unknown"), not sent
   again (never twice to the same person for the same reason, and ops see the failure).
   If not, it never left us and is claimed again.
2. Send outside any transaction (a slow provider must not hold database locks). Quiet
   hours, rendering and the rate limits are decided for the whole chunk first, with one
   round trip to Redis; then each message cleared to go is stamped handed over (its own
   short commit, and only while this claim still holds the row) and handed to its channel.
3. Record the result: sent, deferred (quiet hours, rate limit, retry later: the timer
   releases it at `send_after`), or failed (permanent, or out of attempts).

A message's ids are handled in chunks of `CHUNK` rows: one transaction claims a chunk,
its rows are sent, and the next transaction records their results and claims the next
chunk, with a fixed set of SQL texts whatever the batch size. A worker killed mid-chunk
leaves at most the one row it was handing over "unknown"; its other claimed rows go out
when the message is redelivered.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import DBAPIError

from services.notifier.channels.base import Channel
from services.notifier.delivery import (
    DeliveryResult,
    QuietHours,
    RetryPolicy,
    decide_many,
    send_now,
)
from services.notifier.ratelimit import RateLimit, RateLimiter
from shared.db.notifications import DONE, MadeBetween, NotificationStatus, record_values
from shared.db.session import DatabaseClock
from shared.errors import is_transient
from shared.notifications.masking import mask_text
from shared.notifications.policy import (
    NotificationPolicy,
    NotificationRequest,
    RenderedMessage,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Rows claimed per transaction; each chunk costs one commit besides the hand-over
# stamps (docs/benchmarks.md has the measurements that chose it).
CHUNK = 20

class NotificationRepository(Protocol):
    """The sender's storage, within one transaction (shared.db.notifications.NotificationStore
    on PostgreSQL; an in-memory fake in the unit tests)."""

    def now(self) -> datetime: ...
    def lock(self, ids: Sequence[int], made_between: MadeBetween | None = None
             ) -> list[Any]: ...
    def claim(self, ids: Sequence[int], token: str) -> None: ...
    def mark_unknown(self, ids: Sequence[int]) -> None: ...
    def record(self, results: Sequence[dict[str, Any]]) -> None: ...
    def release(self, rows: Sequence[tuple[int, str]], token: str) -> None: ...


class HandOverLine(Protocol):
    """A chunk's hand-overs; each call is committed when it returns."""

    def record_and_hand_over(self, results: Sequence[dict[str, Any]], ids: Sequence[int],
                             token: str, created: datetime | None = None) -> set[int]: ...


class NotificationStorage(Protocol):
    """`storage()`: a new transaction (commits when the block ends, rolls back if it
    raises); `storage.hand_overs()`: a hand-over line for one chunk."""

    def __call__(self) -> AbstractContextManager[NotificationRepository]: ...
    def hand_overs(self) -> AbstractContextManager[HandOverLine]: ...


@dataclass(frozen=True)
class SendOutcome:
    outcome: str  # sent | deferred | retried | failed | duplicate | early | missing
    channel: str | None = None


@dataclass(frozen=True)
class _Claimed:
    id: int
    row: Any  # the locked row, as read
    attempt: int
    status: str  # the status before the claim (to release the row as it was)
    token: str  # the claim's


@dataclass(frozen=True)
class _Ready:
    """A claimed row cleared to go: its request and the rendered message."""

    request: NotificationRequest
    message: RenderedMessage


@dataclass(frozen=True)
class _Result:
    id: int
    outcome: SendOutcome
    values: dict[str, Any] | None  # RECORD's parameters (None: nothing to record)


class NotificationSender:
    def __init__(
        self,
        storage: NotificationStorage,
        policy: NotificationPolicy,
        channels: Mapping[str, Channel],
        limiter: RateLimiter,
        quiet_hours: QuietHours,
        limits: Sequence[RateLimit],
        retry: RetryPolicy,
        clock: Callable[[], datetime] | None = None,
        valid_for: timedelta | None = None,
        db_retry_s: float = 300.0,
    ) -> None:
        self.storage = storage
        self.policy = policy
        self.channels = channels
        self.limiter = limiter
        self.quiet_hours = quiet_hours
        self.limits = limits
        self.retry = retry
        # None: the database's clock, read when a chunk is claimed (the timer releases
        # deferred rows by `send_after <= now()`, so quiet hours, deferrals and retries
        # are reckoned on that clock). Tests may pass a fixed one.
        self.clock = clock
        # A notification not sent within this long of being written fails as expired
        # (None: never expires); until then outages are waited out.
        self.valid_for = valid_for
        self.db_retry_s = db_retry_s

    def send(self, notification_id: int) -> SendOutcome:
        return self.send_many([notification_id])[0]

    def send_many(
        self,
        notification_ids: Sequence[int],
        on_outcome: Callable[[SendOutcome], None] | None = None,
        made_between: MadeBetween | None = None,
    ) -> list[SendOutcome]:
        """Claim, send and record the rows; one outcome per id, in the order given (an id
        given twice is a `duplicate` the second time, as a second `send` would make it).
        `made_between`: the span of the rows' creation times, when the message gave it.

        `on_outcome` is called for each outcome once it is committed, so a caller counting
        them (metrics) counts what the table says even if a later chunk raises."""

        def report(outcome: SendOutcome) -> None:
            if on_outcome is None:
                return
            try:
                on_outcome(outcome)
            except Exception:  # counting must never strand claimed rows in `sending`
                log.exception("on_outcome failed")

        ids = sorted(set(notification_ids))  # id order: every worker takes row locks alike
        outcomes: dict[int, SendOutcome] = {}
        results: list[_Result] = []  # settled, not yet recorded
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]

            # The previous chunk's results and this chunk's claim share one commit.
            def record_and_claim(store: NotificationRepository, chunk: list[int] = chunk,
                                 done: list[_Result] = results
                                 ) -> tuple[list[_Claimed], dict[int, SendOutcome],
                                            Callable[[], datetime]]:
                _record(store, done)
                settled: dict[int, SendOutcome] = {}
                return (_claim(store, chunk, settled, made_between), settled,
                        self._chunk_clock(store))

            claimed, settled, clock = self._retrying(record_and_claim)
            outcomes.update(settled)
            for r in results:
                report(r.outcome)
            for i in chunk:
                if i in outcomes:
                    report(outcomes[i])
            chunk_results, results = self._send_claimed(claimed, report, clock)
            outcomes.update((r.id, r.outcome) for r in chunk_results)
        if results:
            self._retrying(lambda store: _record(store, results))
            for r in results:
                report(r.outcome)

        out: list[SendOutcome] = []
        seen: set[int] = set()
        for i in notification_ids:
            outcome = outcomes[i]
            if i in seen and outcome.outcome != "missing":
                outcome = SendOutcome("duplicate", outcome.channel)
                report(outcome)
            seen.add(i)
            out.append(outcome)
        return out

    def _retrying(self, work: Callable[[NotificationRepository], _T]) -> _T:
        """Run `work` in a transaction; while PostgreSQL is away (restart, failover, a
        dropped connection) try again for up to `db_retry_s`. What a chunk holds (results
        of sends that happened, rows claimed) is recorded once it is back instead of being
        left `sending`, which would make every row of the chunk "unknown"."""
        def attempt() -> _T:
            with self.storage() as store:
                return work(store)

        return _while_database_away(attempt, self.db_retry_s)

    def _chunk_clock(self, store: NotificationRepository) -> Callable[[], datetime]:
        if self.clock is not None:
            return self.clock
        return DatabaseClock(store.now())

    def _send_claimed(self, claimed: list[_Claimed], report: Callable[[SendOutcome], None],
                      clock: Callable[[], datetime]) -> tuple[list[_Result], list[_Result]]:
        """Settle the chunk's rows: all their results, in order, and those of them not
        recorded yet (each hand-over's commit also records the results before it, so a
        worker killed mid-chunk leaves only the row it was sending "unknown")."""
        results: list[_Result] = []  # one per claimed row, in order, as they are settled
        unrecorded: list[_Result] = []
        line = _Line(self.storage, self.db_retry_s)
        try:
            for c, decision in zip(claimed, self._decide(claimed, clock), strict=True):
                if isinstance(decision, _Result):
                    results.append(decision)
                    unrecorded.append(decision)
                    continue
                taken = line.record_and_hand_over(unrecorded, c)
                for r in unrecorded:
                    report(r.outcome)
                unrecorded = []
                if taken:
                    result = self._send_one(c, decision.request, decision.message, clock)
                else:
                    # Another claim took the row over (this worker was thought dead): it
                    # sends and records it.
                    log.warning("notification %s was claimed again elsewhere: not sent here",
                                c.id)
                    result = _Result(c.id, SendOutcome("duplicate", str(c.row.channel)), None)
                results.append(result)
                unrecorded.append(result)
        except BaseException:
            # Interrupted (Dramatiq's Shutdown or TimeLimitExceeded, a signal): a row
            # stamped handed over stays `sending` (unknown, never repeated); the results we
            # have are recorded and the rows not handed over go back, so none is lost.
            untried = claimed[len(results):]
            left = unrecorded
            def record_and_release(store: NotificationRepository) -> None:
                _record(store, left)
                store.release([(c.id, c.status) for c in untried],
                              untried[0].token if untried else "")

            try:
                self._retrying(record_and_release)
                for r in left:
                    report(r.outcome)
            except Exception:
                log.exception("could not record an interrupted batch: %d rows stay "
                              "'sending'", len(claimed))
            raise
        finally:
            line.close()
        return results, unrecorded

    def _decide(self, claimed: list[_Claimed], clock: Callable[[], datetime]
                ) -> list[_Result | _Ready]:
        """Quiet hours, rendering and rate limits for the whole chunk (one limiter round
        trip): for each row in order, its result now or the message to send."""
        now = clock()
        requests = [self._expired(c, now) or self._request_of(c) for c in claimed]
        decisions = iter(decide_many(
            [(r, c.attempt) for c, r in zip(claimed, requests, strict=True)
             if not isinstance(r, _Result)],
            now=now, limiter=self.limiter, quiet_hours=self.quiet_hours,
            render=self.policy.render, limits=self.limits, retry=self.retry))
        out: list[_Result | _Ready] = []
        for c, request in zip(claimed, requests, strict=True):
            if isinstance(request, _Result):
                out.append(request)
                continue
            decision = next(decisions)
            out.append(self._result_of(c, decision, clock)
                       if isinstance(decision, DeliveryResult)
                       else _Ready(request, decision))
        return out

    def _expired(self, c: _Claimed, now: datetime) -> _Result | None:
        created = getattr(c.row, "created_at", None)
        if self.valid_for is None or created is None or now < created + self.valid_for:
            return None
        log.error("notification %s expired unsent (written %s)", c.id, created.isoformat())
        return _Result(c.id, SendOutcome("failed", str(c.row.channel)), _values(
            c, NotificationStatus.FAILED, c.attempt - 1,
            f"expired: not sent within {self.valid_for} of being written"))

    @staticmethod
    def _request_of(c: _Claimed) -> NotificationRequest | _Result:
        try:
            return NotificationRequest.from_row(c.row)
        except Exception as exc:  # a malformed row: nothing was sent, nothing can be
            log.exception("notification %s: unusable row", c.id)
            return _Result(c.id, SendOutcome("failed", str(c.row.channel)), _values(
                c, NotificationStatus.FAILED, c.attempt - 1,
                mask_text(f"render: bad row: {exc!r}")[:1000]))

    def _send_one(self, c: _Claimed, request: NotificationRequest, message: RenderedMessage,
                  clock: Callable[[], datetime]) -> _Result:
        channel = str(c.row.channel)
        try:
            result = send_now(request, message, self.channels[request.channel],
                              now=clock(), attempt=c.attempt, retry=self.retry)
        except Exception as exc:
            # A bug (delivery turns every provider error into a result). Whether the
            # provider was reached is unknown: failed for good, as when a worker dies
            # mid-send, and the rest of the batch still goes out.
            log.exception("notification %s: error during the send: recorded as failed "
                          "(unknown delivery), not sent twice", c.id)
            error = mask_text(f"unknown: {exc!r} during the send; not repeated")[:1000]
            return _Result(c.id, SendOutcome("failed", channel),
                           _values(c, NotificationStatus.FAILED, c.attempt, error))
        return self._result_of(c, result, clock)

    def _result_of(self, c: _Claimed, result: DeliveryResult, clock: Callable[[], datetime]
                   ) -> _Result:
        """What to record for a delivery result."""
        channel = str(c.row.channel)
        attempts = c.attempt if result.attempted else c.attempt - 1
        if result.status == "sent":
            return _Result(c.id, SendOutcome("sent", channel), _values(
                c, NotificationStatus.SENT, attempts, None, sent_at=clock(),
                provider_id=result.provider_id))
        reason = result.error or result.error_kind
        if result.status in ("deferred", "retry"):
            outcome = "retried" if result.status == "retry" else "deferred"
            return _Result(c.id, SendOutcome(outcome, channel), _values(
                c, NotificationStatus.DEFERRED, attempts, reason, send_after=result.retry_at))
        return _Result(c.id, SendOutcome("failed", channel),
                       _values(c, NotificationStatus.FAILED, attempts, reason))


class _Line:
    """A chunk's hand-over line, opened at the first hand-over and opened again after
    PostgreSQL went away (tried for up to `retry_s`, as `_retrying` does)."""

    def __init__(self, storage: NotificationStorage, retry_s: float) -> None:
        self.storage = storage
        self.retry_s = retry_s
        self._stack: ExitStack | None = None
        self._line: HandOverLine | None = None

    def record_and_hand_over(self, done: list[_Result], c: _Claimed) -> bool:
        """Record `done`, then stamp the row handed over, committed before the provider
        call; False if another claim has taken the row over."""
        values = [r.values for r in done if r.values is not None]

        def attempt() -> bool:
            if self._line is None:
                self._stack = ExitStack()
                self._line = self._stack.enter_context(self.storage.hand_overs())
            return c.id in self._line.record_and_hand_over(values, [c.id], c.token,
                                                           _created(c))

        # a failed statement leaves the line's connection unusable: a new one each try
        return _while_database_away(attempt, self.retry_s, on_error=self.close)

    def close(self) -> None:
        stack, self._stack, self._line = self._stack, None, None
        if stack is not None:
            try:
                stack.close()
            except Exception:  # the connection is dropped either way
                log.warning("closing a hand-over line failed", exc_info=True)


def _claim(store: NotificationRepository, ids: list[int], outcomes: dict[int, SendOutcome],
           made_between: MadeBetween | None = None) -> list[_Claimed]:
    """Lock the rows; settle those that must not be sent (into `outcomes`), claim the
    others under a new token and return them."""
    # Names the worker, for whoever looks at a row left `sending`.
    token = f"{socket.gethostname()[:24]}:{os.getpid()}:{uuid.uuid4().hex[:16]}"
    claimed: list[_Claimed] = []
    unknown: list[int] = []
    for row in store.lock(ids, made_between):
        if row.status in DONE:
            outcomes[row.id] = SendOutcome("duplicate", row.channel)
        elif row.status == NotificationStatus.SENDING and (
                row.handed_over_at is not None or row.claim_token is None):
            # Stamped: it may have reached the provider. No token: claimed by a version
            # before the stamps (migration 0020), which may be sending it still.
            log.error("notification %s was handed to a provider by a worker that died: "
                      "recorded as failed (unknown delivery), not sent twice", row.id)
            unknown.append(row.id)
            outcomes[row.id] = SendOutcome("failed", row.channel)
        elif row.status == NotificationStatus.SENDING:
            # Claimed but never handed over: its worker died (or is thought dead and will
            # not send it: the hand-over checks the token).
            log.warning("notification %s: claimed by a worker that never handed it over; "
                        "claimed again", row.id)
            claimed.append(_Claimed(row.id, row, row.attempts + 1, NotificationStatus.QUEUED,
                                    token))
        elif row.status == NotificationStatus.DEFERRED:
            # Only the timer releases a deferred row (at send_after); a stray message for
            # it is a duplicate.
            outcomes[row.id] = SendOutcome("early", row.channel)
        else:
            claimed.append(_Claimed(row.id, row, row.attempts + 1, row.status, token))
    taken = {c.id for c in claimed}
    for i in ids:
        if i not in taken:
            outcomes.setdefault(i, SendOutcome("missing"))
    store.mark_unknown(unknown)
    store.claim(sorted(taken), token)
    return claimed


def _record(store: NotificationRepository, results: list[_Result]) -> None:
    store.record([r.values for r in results if r.values is not None])


def _values(c: _Claimed, status: str, attempts: int, last_error: str | None,
            **columns: Any) -> dict[str, Any]:
    return record_values(c.id, c.token, status, attempts, last_error,
                         created_at=_created(c), **columns)


def _created(c: _Claimed) -> datetime | None:
    """The row's creation time (its partition), if the storage read one."""
    made = getattr(c.row, "created_at", None)
    return made if isinstance(made, datetime) else None


def _while_database_away(attempt: Callable[[], _T], retry_s: float, *,
                         on_error: Callable[[], None] = lambda: None) -> _T:
    """`attempt()`, tried again with backoff for up to `retry_s` while PostgreSQL is away
    (restart, failover, a dropped connection); any other error is raised at once."""
    give_up = time.monotonic() + retry_s
    delay = 0.2
    while True:
        try:
            return attempt()
        except DBAPIError as exc:
            on_error()
            if not is_transient(exc) or time.monotonic() + delay > give_up:
                raise
            log.warning("database unavailable (%s); trying again in %.1fs",
                        type(exc.orig).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
