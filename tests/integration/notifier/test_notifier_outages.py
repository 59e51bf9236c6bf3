"""Outages the notifier must wait out, with real parts: a Redis server of our own stopped
for longer than the old retry budget, and the shared PostgreSQL restarted in the middle of
a chunk. Every notification reaches the SMTP server exactly once afterwards; nothing is
failed "unknown" that was never handed to a provider."""

from __future__ import annotations

import email
import glob
import logging
import shutil
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import create_engine, insert, select, text, update

from services.notifier.channels.smtp import SmtpEmailChannel
from services.notifier.delivery import QuietHours, RetryPolicy
from services.notifier.ratelimit import RateLimit, RedisRateLimiter
from services.notifier.sender import CHUNK, NotificationSender
from shared.db.models import NotificationRow
from shared.db.notifications import NotificationStatus as S
from shared.db.notifications import NotificationStore
from shared.db.session import Database
from shared.notifications.policy import NotificationPolicy
from tests.conftest import PG_ADMIN_URL, wait_for
from tests.integration.notifier.notifier_fakes import RecordingHandler, start_smtp
from tests.resources import free_port

pytestmark = pytest.mark.integration

POLICY = NotificationPolicy.load(None)
OLD_RETRY_BUDGET = 6  # attempts after which a limiter outage used to fail a notification


def add(db: Database, n: int, prefix: str) -> list[int]:
    rows = [{
        "dedup_key": uuid.uuid4().hex, "case_id": f"{prefix}-{i}", "reason": "case.opened",
        "party": "merchant", "channel": "email", "recipient": f"shop{i}@example.com",
        "template": "case_opened.merchant", "params": {"case_id": f"{prefix}-{i}"},
        "urgent": True, "status": S.QUEUED,
    } for i in range(n)]
    with db.transaction() as s:
        return list(s.execute(
            insert(NotificationRow).returning(NotificationRow.id, sort_by_parameter_order=True),
            rows).scalars())


def statuses(db: Database, ids: list[int]) -> Counter[tuple[str, int]]:
    with db.transaction() as s:
        return Counter((r.status, r.attempts) for r in s.execute(
            select(NotificationRow).where(NotificationRow.id.in_(ids))).scalars())


def release_deferred(db: Database, ids: list[int]) -> None:
    """What the timer does at `send_after`: hand deferred rows over again."""
    with db.transaction() as s:
        s.execute(update(NotificationRow).where(
            NotificationRow.id.in_(ids), NotificationRow.status == S.DEFERRED,
        ).values(status=S.QUEUED))


def mails_per_key(handler: RecordingHandler) -> Counter[str]:
    return Counter(str(email.message_from_bytes(m.content)["Message-ID"])
                   for m in handler.received)


@pytest.fixture
def smtp() -> Iterator[tuple[RecordingHandler, int]]:
    handler, port = RecordingHandler(), free_port()
    controller = start_smtp(handler, port)
    yield handler, port
    controller.stop()


class OwnRedis:
    """A redis-server of this test's own, on a free port (never the shared one)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_for(lambda: self._pings(client), timeout=30, what="our redis-server")

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_redis_outage_longer_than_the_retry_budget_is_waited_out(
    db: Database, smtp: tuple[RecordingHandler, int], own_redis: OwnRedis
) -> None:
    handler, port = smtp
    # No client-side retries: each pass meets the outage once (and the test stays short).
    client = redis.Redis(port=own_redis.port, socket_timeout=1, socket_connect_timeout=1,
                         retry=Retry(NoBackoff(), 0))
    sender = NotificationSender(
        storage=NotificationStore.transactions(db), policy=POLICY,
        channels={"email": SmtpEmailChannel("127.0.0.1", port, "aftersales@example.com",
                                            timeout=5)},
        limiter=RedisRateLimiter(client, prefix="outage-test:"),
        quiet_hours=QuietHours.parse("off"), limits=(RateLimit("email", 30, 3600),),
        retry=RetryPolicy(max_attempts=OLD_RETRY_BUDGET, outage_wait_s=0.01))
    ids = add(db, 25, "REDIS")
    own_redis.stop()
    # Handed over again and again while Redis is away: more passes than the budget.
    passes = OLD_RETRY_BUDGET + 3
    for _ in range(passes):
        outcomes = Counter(o.outcome for o in sender.send_many(ids))
        assert outcomes == {"deferred": len(ids)}
        release_deferred(db, ids)
    during = statuses(db, ids)
    sent_during = len(handler.received)
    own_redis.start()
    outcomes = Counter(o.outcome for o in sender.send_many(ids))
    after = statuses(db, ids)
    per_key = mails_per_key(handler)
    print(f"\n[fault report] redis outage: notifications={len(ids)}, passes_during={passes}, "
          f"sent_during={sent_during}, sent_after={len(handler.received)}, "
          f"distinct={len(per_key)}, statuses_after={dict(after)}")
    assert during == {("queued", 0): len(ids)}  # never an attempt, never failed
    assert sent_during == 0
    assert outcomes == {"sent": len(ids)}
    assert after == {("sent", 1): len(ids)}
    assert len(per_key) == len(ids) and set(per_key.values()) == {1}


def _pg_cluster() -> str:
    versions = sorted(glob.glob("/etc/postgresql/*/main"))
    assert versions, "no local PostgreSQL cluster to restart"
    return versions[-1].split("/")[3]


def _postgres_down() -> bool:
    sql_engine = create_engine(PG_ADMIN_URL, poolclass=None)
    try:
        with sql_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return False
    except Exception:
        return True
    finally:
        sql_engine.dispose()


class RestartingChannel:
    """The SMTP channel; at the `at`-th message it starts a PostgreSQL restart and waits
    until the server is down, so the rest of the chunk is sent while it is away and the
    next commit meets the restart."""

    def __init__(self, inner: SmtpEmailChannel, at: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.at = at
        self.calls = 0
        self.restart: threading.Thread | None = None

    def send(self, message: Any, key: str) -> Any:
        self.calls += 1
        result = self.inner.send(message, key)
        if self.calls == self.at:
            version = _pg_cluster()
            self.restart = threading.Thread(target=lambda: subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                check=True, timeout=120, capture_output=True))
            self.restart.start()
            wait_for(_postgres_down, timeout=60, interval=0.02, what="PostgreSQL going down")
        return result


@pytest.mark.timeout(300)
def test_a_postgresql_restart_during_a_chunk_marks_nothing_unknown(
    db: Database, smtp: tuple[RecordingHandler, int], caplog: pytest.LogCaptureFixture
) -> None:
    handler, port = smtp
    channel = RestartingChannel(
        SmtpEmailChannel("127.0.0.1", port, "aftersales@example.com", timeout=5),
        at=CHUNK + 3)  # in the second chunk
    sender = NotificationSender(
        storage=NotificationStore.transactions(db), policy=POLICY,
        channels={"email": channel},
        limiter=RedisRateLimiter(redis.Redis(socket_timeout=5), prefix=f"pg-{uuid.uuid4()}:"),
        quiet_hours=QuietHours.parse("off"), limits=(), retry=RetryPolicy())
    ids = add(db, 3 * CHUNK, "PGBLIP")
    with caplog.at_level(logging.WARNING, logger="services.notifier.sender"):
        first = Counter(o.outcome for o in sender.send_many(ids))
    assert channel.restart is not None
    channel.restart.join(120)
    waited = sum("database unavailable" in r.getMessage() for r in caplog.records)
    # A redelivery of the same message (as after a worker's retry) changes nothing.
    again = Counter(o.outcome for o in sender.send_many(ids))
    with db.transaction() as s:
        unknown = s.execute(select(NotificationRow.id).where(
            NotificationRow.id.in_(ids),
            NotificationRow.last_error.like("unknown%"))).scalars().all()
    per_key = mails_per_key(handler)
    print(f"\n[fault report] postgresql restart mid-chunk: notifications={len(ids)}, "
          f"restart_at_send={channel.at}, db_retries={waited}, sent={len(handler.received)}, "
          f"distinct={len(per_key)}, unknown={len(unknown)}, first={dict(first)}")
    assert waited >= 1, "the restart did not hit the notifier's commit: the test proved nothing"
    assert first == {"sent": len(ids)}
    assert again == {"duplicate": len(ids)}
    assert unknown == []
    assert statuses(db, ids) == {("sent", 1): len(ids)}
    assert len(per_key) == len(ids) and set(per_key.values()) == {1}
