"""NotificationSender.send_many against the real PostgreSQL: a batch is claimed, sent and
recorded with a few commits, and "never twice" holds through redeliveries, interrupts
and a worker killed mid-batch."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select, update

from services.notifier.channels import FakeChannel, SendResult
from services.notifier.delivery import QuietHours, RetryPolicy
from services.notifier.errors import PermanentSendError, ThrottledError, TransientSendError
from services.notifier.ratelimit import InMemoryRateLimiter, RateLimit
from services.notifier.sender import CHUNK, NotificationSender, SendOutcome
from shared.db.models import NotificationRow
from shared.db.notifications import NotificationStatus as S
from shared.db.notifications import NotificationStore
from shared.db.session import Database, make_engine
from shared.domain.timeutil import CHINA_TZ, CHINA_TZ_NAME
from shared.notifications.policy import NotificationPolicy, NotificationRequest, RenderedMessage

pytestmark = pytest.mark.integration

DAYTIME = datetime(2026, 11, 23, 10, 0, tzinfo=CHINA_TZ)
NIGHT = datetime(2026, 11, 23, 23, 30, tzinfo=CHINA_TZ)
POLICY = NotificationPolicy.load(None)


class Interrupted(BaseException):
    """Stands for Dramatiq's Shutdown / TimeLimitExceeded, raised inside a send."""


def add(db: Database, n: int = 1, *, status: str = S.QUEUED, urgent: bool = True,
        **columns: Any) -> list[int]:
    rows = [{
        "dedup_key": uuid.uuid4().hex, "case_id": f"SM-{i}", "reason": "case.opened",
        "party": "merchant", "channel": "email", "recipient": "shop@example.com",
        "template": "case_opened.merchant", "params": {"case_id": f"SM-{i}"},
        "urgent": urgent, "status": status, **columns,
    } for i in range(n)]
    with db.transaction() as s:
        return list(s.execute(
            insert(NotificationRow).returning(NotificationRow.id, sort_by_parameter_order=True),
            rows,
        ).scalars())


def rows(db: Database, ids: list[int]) -> list[NotificationRow]:
    with db.transaction() as s:
        by_id = {r.id: r for r in s.execute(
            select(NotificationRow).where(NotificationRow.id.in_(ids))).scalars()}
    return [by_id[i] for i in ids]


def key(db: Database, notification_id: int) -> str:
    return rows(db, [notification_id])[0].dedup_key


def make_sender(db: Database, channel: Any, *, at: datetime = DAYTIME,
                quiet: str = "off", policy: Any = POLICY) -> NotificationSender:
    return NotificationSender(
        storage=NotificationStore.transactions(db), policy=policy,
        channels={"email": channel}, limiter=InMemoryRateLimiter(),
        quiet_hours=QuietHours.parse(quiet, CHINA_TZ_NAME), limits=(),
        retry=RetryPolicy(), clock=lambda: at,
    )


def tally(outcomes: list[SendOutcome]) -> Counter[tuple[str, str | None]]:
    return Counter((o.outcome, o.channel) for o in outcomes)


def test_a_mixed_batch(db: Database) -> None:
    (new,) = add(db, status=S.NEW)
    (queued,) = add(db, status=S.QUEUED)
    (sent,) = add(db, status=S.SENT, provider_id="earlier")
    (failed,) = add(db, status=S.FAILED, last_error="550 earlier")
    # A worker died holding these two; it had handed the first to a provider.
    (sending,) = add(db, status=S.SENDING, claim_token="dead", handed_over_at=DAYTIME)
    (claimed,) = add(db, status=S.SENDING, claim_token="dead")
    later = datetime.now(UTC) + timedelta(hours=1)
    (deferred,) = add(db, status=S.DEFERRED, send_after=later)
    missing = deferred + 1000
    channel = FakeChannel()
    reported: list[SendOutcome] = []

    ids = [sending, new, missing, deferred, sent, queued, failed, claimed, new]
    outcomes = make_sender(db, channel).send_many(ids, on_outcome=reported.append)

    assert [(o.outcome, o.channel) for o in outcomes] == [
        ("failed", "email"), ("sent", "email"), ("missing", None), ("early", "email"),
        ("duplicate", "email"), ("sent", "email"), ("duplicate", "email"), ("sent", "email"),
        ("duplicate", "email"),  # the same id twice in one message
    ]
    assert tally(reported) == tally(outcomes)
    assert channel.sends_per_key() == Counter(
        {key(db, new): 1, key(db, queued): 1, key(db, claimed): 1})

    r_new, r_queued, r_claimed, r_sent, r_failed, r_sending, r_deferred = rows(
        db, [new, queued, claimed, sent, failed, sending, deferred])
    for r in (r_new, r_queued, r_claimed):
        assert (r.status, r.attempts, r.last_error, r.sent_at) == ("sent", 1, None, DAYTIME)
        assert r.provider_id and r.provider_id.startswith("fake-")
    assert (r_sent.status, r_sent.provider_id) == ("sent", "earlier")
    assert (r_failed.status, r_failed.last_error) == ("failed", "550 earlier")
    assert r_sending.status == S.FAILED and "unknown" in (r_sending.last_error or "")
    assert (r_deferred.status, r_deferred.send_after) == ("deferred", later)

    # Delivered again: nothing more goes out.
    again = make_sender(db, channel).send_many(ids)
    assert {o.outcome for o in again} == {"duplicate", "missing", "early"}
    assert channel.calls == 3


def test_results_are_recorded(db: Database) -> None:
    before = datetime(2026, 11, 20, tzinfo=UTC)
    ok, transient, permanent = add(db, 3)
    (permanent_again,) = add(db, send_after=before, attempts=2)  # deferred once before
    (quiet,) = add(db, urgent=False)
    (throttled,) = add(db)
    channel = FakeChannel(script=[None, TransientSendError("connection reset"),
                                  PermanentSendError("550 <shop@example.com>: unknown", code="550"),
                                  PermanentSendError("554 rejected", code="554"),
                                  ThrottledError("slow down", retry_after=60)])
    sender = make_sender(db, channel, at=NIGHT, quiet="22:00-08:00")
    outcomes = sender.send_many([ok, transient, permanent, permanent_again, quiet, throttled])
    assert [o.outcome for o in outcomes] == [
        "sent", "retried", "failed", "failed", "deferred", "retried"]

    r = dict(zip(["ok", "transient", "permanent", "again", "quiet", "throttled"], rows(
        db, [ok, transient, permanent, permanent_again, quiet, throttled]), strict=True))
    assert (r["ok"].status, r["ok"].attempts, r["ok"].sent_at) == ("sent", 1, NIGHT)
    assert (r["transient"].status, r["transient"].attempts) == ("deferred", 1)
    assert r["transient"].send_after and r["transient"].send_after > NIGHT
    assert "connection reset" in (r["transient"].last_error or "")
    assert (r["permanent"].status, r["permanent"].attempts) == ("failed", 1)
    assert r["permanent"].send_after is None and r["permanent"].sent_at is None
    assert "shop@example.com" not in (r["permanent"].last_error or "")  # masked
    # A failure keeps what it does not set (the earlier send_after), as before.
    assert (r["again"].status, r["again"].attempts, r["again"].send_after) == (
        "failed", 3, before)
    assert (r["quiet"].status, r["quiet"].attempts, r["quiet"].last_error) == (
        "deferred", 0, "quiet_hours")
    assert r["quiet"].send_after == datetime(2026, 11, 24, 8, 0, tzinfo=CHINA_TZ)
    assert r["throttled"].status == S.DEFERRED and r["throttled"].attempts == 1
    assert r["throttled"].send_after is not None
    assert NIGHT + timedelta(seconds=60) <= r["throttled"].send_after <= NIGHT + timedelta(
        seconds=66)


class SqlLog:
    def __init__(self, db: Database) -> None:
        self.commits = 0
        self.statements: list[tuple[str, bool]] = []
        event.listen(db.sql_engine, "commit", self._commit)
        event.listen(db.sql_engine, "before_cursor_execute", self._execute)

    def _commit(self, conn: Any) -> None:
        self.commits += 1

    def _execute(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> None:
        self.statements.append((statement, executemany))


def test_a_batch_costs_one_commit_per_chunk_and_row_and_a_fixed_set_of_statements(
    db: Database,
) -> None:
    n = 2 * CHUNK + 5
    ids = add(db, n)
    channel = FakeChannel()
    sender = make_sender(db, channel)
    log = SqlLog(db)
    outcomes = sender.send_many(ids)
    assert [o.outcome for o in outcomes] == ["sent"] * n
    assert channel.calls == n and set(channel.sends_per_key().values()) == {1}
    # claim 1 | record 1 + claim 2 | record 2 + claim 3 | record 3; each row's hand-over
    # stamp (which also records the results before it) commits on its own line
    assert log.commits == 4
    stamps = [s for s, _ in log.statements if "handed_over_at=now()" in s.replace(" ", "")]
    assert len(stamps) == n
    big = {s for s, _ in log.statements}

    few = add(db, 7)
    small = SqlLog(db)
    assert [o.outcome for o in sender.send_many(few)] == ["sent"] * 7
    assert small.commits == 2  # as a single send: claim, record
    assert {s for s, _ in small.statements} == big  # same SQL texts whatever the size
    # claim, mark sending, record; on the line: no disk wait, hand over (alone, or with
    # the record of the row before), reset
    assert len(big) == 7, sorted(big)
    assert [r.status for r in rows(db, ids + few)] == ["sent"] * (n + 7)


def test_interrupted_mid_batch_records_what_it_knows(db: Database) -> None:
    ids = add(db, CHUNK + 5)
    channel = FakeChannel(script=[None, None, Interrupted()])
    reported: list[SendOutcome] = []
    with pytest.raises(Interrupted):
        make_sender(db, channel).send_many(ids, on_outcome=reported.append)
    assert [o.outcome for o in reported] == ["sent", "sent"]  # committed ones only
    statuses = [r.status for r in rows(db, ids)]
    assert statuses[:2] == ["sent", "sent"]
    assert statuses[2] == "sending"  # in flight: may or may not have gone out
    assert statuses[3:] == ["queued"] * (CHUNK + 2)  # never tried: handed back

    # Dramatiq redelivers the message.
    again = make_sender(db, channel).send_many(ids)
    assert [o.outcome for o in again] == ["duplicate"] * 2 + ["failed"] + ["sent"] * (CHUNK + 2)
    assert "unknown" in (rows(db, [ids[2]])[0].last_error or "")
    assert key(db, ids[2]) not in channel.sends_per_key()  # never sent again
    assert set(channel.sends_per_key().values()) == {1}


def _killed_mid_batch(database_url: str, ids: list[int], sent_file: str) -> None:
    """In a child process: send the batch and die (no cleanup at all) on the 3rd send."""

    class DyingChannel:
        name = "dying"

        def __init__(self) -> None:
            self.calls = 0

        def send(self, message: RenderedMessage, dedup_key: str) -> SendResult:
            self.calls += 1
            if self.calls == 3:
                os._exit(17)
            with open(sent_file, "a") as f:
                f.write(dedup_key + "\n")
            return SendResult("dying", dedup_key)

    db = Database(make_engine(database_url))
    make_sender(db, DyingChannel()).send_many(ids)
    os._exit(0)


def test_worker_killed_mid_batch_never_sends_twice(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    ids = add(db, CHUNK + 5)
    sent_file = tmp_path / "sent"
    child = multiprocessing.get_context("fork").Process(
        target=_killed_mid_batch, args=(database_url, ids, str(sent_file)))
    child.start()
    child.join(60)
    assert child.exitcode == 17
    sent_by_child = sent_file.read_text().split()
    assert sent_by_child == [key(db, i) for i in ids[:2]]
    left = rows(db, ids)
    # The two sends before were recorded with the next row's hand-over; the third row was
    # with the channel; the rest of the chunk was never handed over, the next chunk
    # never claimed.
    assert [r.status for r in left] == ["sent"] * 2 + ["sending"] * (CHUNK - 2) + ["queued"] * 5
    assert [r.handed_over_at is not None for r in left] == [True] * 3 + [False] * (CHUNK + 2)

    channel = FakeChannel()
    outcomes = make_sender(db, channel).send_many(ids)
    assert [o.outcome for o in outcomes] == (
        ["duplicate"] * 2 + ["failed"] + ["sent"] * (CHUNK + 2))
    after = rows(db, ids)
    assert [r.status for r in after] == ["sent"] * 2 + ["failed"] + ["sent"] * (CHUNK + 2)
    assert "unknown" in (after[2].last_error or "")
    assert set(channel.sends_per_key()) == {key(db, i) for i in ids[3:]}
    assert set(channel.sends_per_key().values()) == {1}
    assert not set(sent_by_child) & set(channel.sends_per_key())


class BuggyPolicy:
    """Renders like the real policy, except one key hits a bug (not a policy error)."""

    def __init__(self, bad_key: str) -> None:
        self.bad_key = bad_key

    def render(self, request: NotificationRequest) -> RenderedMessage:
        if request.dedup_key == self.bad_key:
            raise TypeError("boom")
        return POLICY.render(request)


def test_a_bug_on_one_row_does_not_stop_the_batch(db: Database) -> None:
    ids = add(db, 3)
    channel = FakeChannel()
    sender = make_sender(db, channel, policy=BuggyPolicy(key(db, ids[1])))
    outcomes = sender.send_many(ids)
    assert [o.outcome for o in outcomes] == ["sent", "failed", "sent"]
    bad = rows(db, [ids[1]])[0]
    assert bad.status == S.FAILED and "unknown: TypeError" in (bad.last_error or "")
    assert channel.calls == 2


def test_a_malformed_row_fails_without_a_send(db: Database) -> None:
    ids = add(db, 2)
    with db.transaction() as s:
        s.execute(update(NotificationRow).where(NotificationRow.id == ids[0])
                  .values(params=["not", "a", "mapping"]))
    channel = FakeChannel()
    assert [o.outcome for o in make_sender(db, channel).send_many(ids)] == ["failed", "sent"]
    bad = rows(db, [ids[0]])[0]
    assert (bad.status, bad.attempts) == ("failed", 0)
    assert (bad.last_error or "").startswith("render: bad row")
    assert channel.calls == 1


class CountingLimiter(InMemoryRateLimiter):
    def __init__(self) -> None:
        super().__init__()
        self.round_trips = 0

    def acquire_many(self, slots: Any, now: datetime) -> list[float | None]:
        self.round_trips += 1
        return super().acquire_many(slots, now)


def test_a_chunk_takes_its_rate_limit_slots_in_one_round_trip(db: Database) -> None:
    """One limiter call per chunk, not per notification, with the same answers: at most
    3 emails an hour to one address, so the 4th and 5th of one chunk are deferred."""
    ids = add(db, CHUNK + 5, recipient="same@example.com")
    limiter = CountingLimiter()
    sender = NotificationSender(
        storage=NotificationStore.transactions(db), policy=POLICY,
        channels={"email": FakeChannel()}, limiter=limiter,
        quiet_hours=QuietHours.parse("off", CHINA_TZ_NAME),
        limits=(RateLimit("email", 3, 3600),), retry=RetryPolicy(), clock=lambda: DAYTIME)
    outcomes = sender.send_many(ids)
    assert [o.outcome for o in outcomes] == ["sent"] * 3 + ["deferred"] * (CHUNK + 2)
    assert limiter.round_trips == 2  # two chunks

