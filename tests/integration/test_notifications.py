"""Notifications from a real decision to a real SMTP server and a provider's HTTP API:
the right person, in Chinese, once; throttling retried, permanent errors recorded,
quiet hours deferred then sent."""

from __future__ import annotations

import email
import email.header
import email.policy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from services.intake.processor import IntakeProcessor
from services.notifier.actors import made_between
from services.notifier.channels.aliyun import AliyunSmsChannel
from services.notifier.channels.smtp import SmtpEmailChannel
from services.notifier.delivery import QuietHours, RetryPolicy
from services.notifier.ratelimit import InMemoryRateLimiter, RateLimit
from services.notifier.sender import NotificationSender
from services.resolver.resolve import Resolver
from services.timer.loop import Timer
from shared.db.models import DeadlineRow, NotificationRow
from shared.db.notifications import NotificationStatus, NotificationStore
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.domain.timeutil import CHINA_TZ, CHINA_TZ_NAME
from shared.notifications.policy import NotificationPolicy
from shared.publisher import RecordingPublisher
from tests.conftest import FIXED_DATE_LIMITS
from tests.integration.notifier.notifier_fakes import (
    FakeAliyun,
    RecordingHandler,
    start_smtp,
)
from tests.resources import free_port, write_sms_codes

pytestmark = pytest.mark.integration

DAYTIME = datetime(2026, 11, 23, 10, 0, tzinfo=CHINA_TZ)
KEY_ID, KEY_SECRET = "LTAItest-notify", "test-secret-not-real"
MERCHANT_EMAIL, BUYER_PHONE = "shop@example.com", "13800000000"


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def sms_codes(tmp_path: Path) -> Path:
    """Template codes as a provider account would have them registered."""
    return write_sms_codes(tmp_path)


@pytest.fixture
def policy(sms_codes: Path) -> NotificationPolicy:
    return NotificationPolicy.load(None, sms_codes=sms_codes)


@pytest.fixture
def smtp() -> Iterator[tuple[RecordingHandler, int]]:
    handler, port = RecordingHandler(), free_port()
    controller = start_smtp(handler, port)
    yield handler, port
    controller.stop()


@pytest.fixture
def aliyun() -> Iterator[FakeAliyun]:
    with FakeAliyun({KEY_ID: KEY_SECRET}) as server:
        yield server


@pytest.fixture
def decided_case(db: Database, policy: NotificationPolicy) -> str:
    """An exchange whose merchant missed the 48 h: auto-approved by the real resolver."""
    engine = Engine(RuleBook.load(None), WorkCalendar(None))
    ops = {"emails": [], "phones": []}
    opened_at = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    intake = IntakeProcessor(db, engine, policy, ops, 64 * 1024, limits=FIXED_DATE_LIMITS)
    intake.process([json.dumps({
        "event_id": "n-e1", "type": "case.opened", "occurred_at": opened_at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": "O1", "case_id": "AS-N1",
        "data": {"kind": "exchange", "amount_fen": 12900, "reason": "尺码不合适",
                 "buyer": {"phone": BUYER_PHONE}, "merchant": {"email": MERCHANT_EMAIL}},
    }).encode()])
    with db.transaction() as s:
        deadline_id = s.execute(select(DeadlineRow.id).where(
            DeadlineRow.purpose == "deadline", DeadlineRow.status == "pending")).scalar_one()
    batch = Resolver(db, engine, policy, ops).fire_many([deadline_id])
    assert [r.outcome for r in batch.resolutions] == ["fired"]
    assert [d.type for d in batch.stored.decisions] == ["decision.auto_approved"]
    return "AS-N1"


def make_sender(db: Database, policy: NotificationPolicy, smtp_port: int, aliyun: FakeAliyun,
                clock: Clock) -> NotificationSender:
    return NotificationSender(
        storage=NotificationStore.transactions(db), policy=policy,
        channels={
            "email": SmtpEmailChannel("127.0.0.1", smtp_port, "aftersales@example.com",
                                      timeout=5),
            "sms": AliyunSmsChannel(KEY_ID, KEY_SECRET, "售后服务", endpoint=aliyun.url,
                                    timeout=5),
        },
        limiter=InMemoryRateLimiter(),
        quiet_hours=QuietHours.parse("22:00-08:00", CHINA_TZ_NAME),
        limits=(RateLimit("sms", 5, 3600),),
        retry=RetryPolicy(),
        clock=clock,
    )


def notification(db: Database, reason: str, channel: str) -> NotificationRow:
    with db.transaction() as s:
        return s.execute(select(NotificationRow).where(
            NotificationRow.reason == reason, NotificationRow.channel == channel)).scalar_one()


def decode(value: str) -> str:
    return str(email.header.make_header(email.header.decode_header(value)))


def test_a_decision_reaches_the_merchant_by_email_in_chinese(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    handler, port = smtp
    sender = make_sender(db, policy, port, aliyun, Clock(DAYTIME))
    row = notification(db, "decision.auto_approved", "email")
    assert sender.send(row.id).outcome == "sent"
    assert len(handler.received) == 1
    mail = handler.received[0]
    assert mail.rcpt_tos == [MERCHANT_EMAIL]
    message = email.message_from_bytes(mail.content, policy=email.policy.default)
    subject = decode(message["Subject"])
    body = message.get_body(preferencelist=("plain",)).get_content()
    assert decided_case in subject or decided_case in body
    assert "自动" in subject + body  # 系统已自动同意…
    assert row.dedup_key in message["Message-ID"]
    assert notification(db, "decision.auto_approved", "email").status == NotificationStatus.SENT


def test_the_buyer_sms_reaches_the_provider_with_a_valid_signature(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    sender = make_sender(db, policy, smtp[1], aliyun, Clock(DAYTIME))
    row = notification(db, "decision.auto_approved", "sms")
    assert sender.send(row.id).outcome == "sent"
    # FakeAliyun recomputes the HMAC-SHA1 signature as Aliyun does and refuses a bad one.
    assert aliyun.rejections == []
    assert len(aliyun.requests) == 1
    request = aliyun.requests[0]
    assert request["PhoneNumbers"] == BUYER_PHONE
    assert request["OutId"] == row.dedup_key
    assert request["TemplateCode"].startswith("SMS_")
    assert decided_case in json.loads(request["TemplateParam"]).values()


def test_the_same_notification_redelivered_five_times_is_sent_once(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    handler, port = smtp
    sender = make_sender(db, policy, port, aliyun, Clock(DAYTIME))
    row = notification(db, "decision.auto_approved", "email")
    outcomes = [sender.send(row.id).outcome for _ in range(6)]
    assert outcomes == ["sent"] + ["duplicate"] * 5
    assert len(handler.received) == 1


def test_throttled_then_ok_is_retried_and_sent_once(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    clock = Clock(DAYTIME)
    sender = make_sender(db, policy, smtp[1], aliyun, clock)
    row = notification(db, "decision.auto_approved", "sms")
    aliyun.behaviour[BUYER_PHONE] = (200, "isv.BUSINESS_LIMIT_CONTROL", "触发分钟级流控")
    assert sender.send(row.id).outcome == "retried"
    deferred = notification(db, "decision.auto_approved", "sms")
    assert deferred.status == NotificationStatus.DEFERRED and deferred.send_after is not None
    assert deferred.send_after > DAYTIME  # honours the provider: not straight back

    # Time passes; the timer releases the row and hands it to the notifier again.
    del aliyun.behaviour[BUYER_PHONE]
    with db.transaction() as s:
        s.execute(update(NotificationRow).where(NotificationRow.id == row.id)
                  .values(send_after=datetime.now(UTC) - timedelta(seconds=1)))
    publisher = RecordingPublisher()
    Timer(db, publisher, batch=10, redispatch_after=60, max_rate=100).tick()
    # With the case's new notifications, in one message that also says when its rows
    # were written: the notifier looks for them in those months' partitions only.
    _ids, written = next(args for _q, _a, args in publisher.actor_calls if row.id in args[0])
    span = made_between((written,))
    assert span is not None and span[0] <= deferred.created_at <= span[1]
    clock.at = deferred.send_after + timedelta(seconds=1)
    elsewhere = (span[0] - timedelta(days=40), span[0] - timedelta(days=39))
    assert [o.outcome for o in sender.send_many([row.id], made_between=elsewhere)
            ] == ["missing"]  # (a span that is wrong finds nothing, changes nothing)
    assert [o.outcome for o in sender.send_many([row.id], made_between=span)] == ["sent"]
    assert aliyun.rejections == ["isv.BUSINESS_LIMIT_CONTROL"]
    assert len(aliyun.requests) == 1  # accepted once
    assert notification(db, "decision.auto_approved", "sms").attempts == 2


def test_a_permanent_error_is_recorded_as_failed(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    sender = make_sender(db, policy, smtp[1], aliyun, Clock(DAYTIME))
    row = notification(db, "decision.auto_approved", "sms")
    aliyun.behaviour[BUYER_PHONE] = (200, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
    assert sender.send(row.id).outcome == "failed"
    failed = notification(db, "decision.auto_approved", "sms")
    assert failed.status == NotificationStatus.FAILED
    assert failed.last_error and "MOBILE_NUMBER_ILLEGAL" in failed.last_error
    assert BUYER_PHONE not in failed.last_error  # masked
    assert sender.send(row.id).outcome == "duplicate"  # never retried
    assert len(aliyun.rejections) == 1


def test_quiet_hours_defer_then_send(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    handler, port = smtp
    clock = Clock(datetime(2026, 11, 23, 23, 30, tzinfo=CHINA_TZ))
    sender = make_sender(db, policy, port, aliyun, clock)
    with db.transaction() as s:
        row = s.execute(select(NotificationRow).where(
            NotificationRow.urgent.is_(False), NotificationRow.channel == "email")
            .limit(1)).scalar_one()
    assert sender.send(row.id).outcome == "deferred"
    deferred = notification(db, row.reason, "email")
    assert deferred.send_after == datetime(2026, 11, 24, 8, 0, tzinfo=CHINA_TZ)
    assert deferred.attempts == 0
    assert handler.received == []
    with db.transaction() as s:
        s.execute(update(NotificationRow).where(NotificationRow.id == row.id)
                  .values(status=NotificationStatus.QUEUED))  # what the timer does at send_after
    clock.at = datetime(2026, 11, 24, 8, 1, tzinfo=CHINA_TZ)
    assert sender.send(row.id).outcome == "sent"
    assert len(handler.received) == 1


def test_a_worker_dying_mid_send_never_sends_twice(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    handler, port = smtp
    sender = make_sender(db, policy, port, aliyun, Clock(DAYTIME))
    row = notification(db, "decision.auto_approved", "email")
    with db.transaction() as s:  # a worker handed it to the provider, then was killed
        s.execute(update(NotificationRow).where(NotificationRow.id == row.id)
                  .values(status=NotificationStatus.SENDING, claim_token="dead",
                          handed_over_at=DAYTIME))
    assert sender.send(row.id).outcome == "failed"
    after: Any = notification(db, "decision.auto_approved", "email")
    assert after.status == NotificationStatus.FAILED and "unknown" in after.last_error
    assert handler.received == []


def test_a_worker_dying_before_the_hand_over_leaves_the_row_to_be_sent_once(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    handler, port = smtp
    sender = make_sender(db, policy, port, aliyun, Clock(DAYTIME))
    row = notification(db, "decision.auto_approved", "email")
    with db.transaction() as s:  # a worker claimed it, then was killed before sending
        s.execute(update(NotificationRow).where(NotificationRow.id == row.id)
                  .values(status=NotificationStatus.SENDING, claim_token="dead"))
    assert sender.send(row.id).outcome == "sent"
    assert sender.send(row.id).outcome == "duplicate"
    assert notification(db, "decision.auto_approved", "email").status == NotificationStatus.SENT
    assert len(handler.received) == 1


def test_a_message_of_notifications_goes_out_in_one_batch_over_one_connection(
    db: Database, decided_case: str, policy: NotificationPolicy,
    smtp: tuple[RecordingHandler, int], aliyun: FakeAliyun,
) -> None:
    handler, port = smtp
    sender = make_sender(db, policy, port, aliyun, Clock(DAYTIME))
    with db.transaction() as s:
        rows = list(s.execute(select(NotificationRow).order_by(NotificationRow.id)).scalars())
    emails = [r for r in rows if r.channel == "email"]
    assert len(emails) == 2  # case opened, case decided: two mails to the shop (+ an SMS)
    ids = [r.id for r in rows]
    assert {o.outcome for o in sender.send_many(ids)} == {"sent"}
    got = [email.message_from_bytes(m.content)["X-Aftersales-Key"] for m in handler.received]
    assert sorted(got) == sorted(r.dedup_key for r in emails)
    assert handler.connections() == 1
    # The same message again (a redelivery): nothing more goes out.
    assert {o.outcome for o in sender.send_many(ids)} == {"duplicate"}
    assert len(handler.received) == len(emails)
