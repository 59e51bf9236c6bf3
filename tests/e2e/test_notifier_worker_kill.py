"""A notifier worker SIGKILLed in the middle of a chunk, through the real processes (timer
and notifier) and an SMS provider's HTTP endpoint of our own: only the row whose request
had reached the provider becomes "unknown"; every other row is sent exactly once after
the supervisor starts a new worker and RabbitMQ hands it the message again."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from sqlalchemy import insert, select

from services.notifier.sender import CHUNK
from shared.db.models import NotificationRow
from shared.db.notifications import NotificationStatus
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import System
from tests.integration.notifier.notifier_fakes import FakeAliyun
from tests.resources import write_sms_codes

pytestmark = pytest.mark.e2e

KEY_ID, KEY_SECRET = "LTAIworkerkill", "worker-kill-secret-not-real"
ROWS = CHUNK + 5  # two chunks: the kill lands in the first
HELD = 4  # the provider holds the 4th request: 3 answered, 1 in flight when killed


class HoldingAliyun(FakeAliyun):
    """Answers like Aliyun, but holds the `held`-th request (counting every request that
    reached it) until `release` is set; `reached` lists the OutId (dedup key) of each
    request that arrived, answered or not."""

    def __init__(self, held: int) -> None:
        super().__init__({KEY_ID: KEY_SECRET})
        self.held = held
        self.reached: list[str] = []
        self.holding = threading.Event()
        self.release = threading.Event()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, Any]]:
        out_id = dict(parse_qsl(body.decode("utf-8"))).get("OutId", "")
        with self._lock:
            self.reached.append(out_id)
            hold = len(self.reached) == self.held
        if hold:
            self.holding.set()
            self.release.wait(60)
        return super().handle(method, path, headers, body)


@pytest.fixture
def notifier_on_slow_sms(database_url: str, amqp_url: str, tmp_path: Path
                         ) -> Iterator[tuple[System, HoldingAliyun]]:
    codes = write_sms_codes(tmp_path)
    with HoldingAliyun(HELD) as sms:
        wide = "100000"
        system = System({
            "AFTERSALES_DATABASE_URL": database_url,
            "AFTERSALES_AMQP_URL": amqp_url,
            "AFTERSALES_REDIS_PREFIX": f"aftersales-test:{tmp_path.name}:",
            "AFTERSALES_TIMER_POLL_SECONDS": "0.1",
            "AFTERSALES_LOG_LEVEL": "INFO",
            "AFTERSALES_QUIET_HOURS": "",
            "AFTERSALES_EMAIL_TRANSPORT": "log",
            "AFTERSALES_SMS_PROVIDER": "aliyun",
            "AFTERSALES_SMS_ENDPOINT": sms.url,
            "AFTERSALES_SMS_TEMPLATES": str(codes),
            "AFTERSALES_ALIYUN_ACCESS_KEY_ID": KEY_ID,
            "AFTERSALES_ALIYUN_ACCESS_KEY_SECRET": KEY_SECRET,
            "AFTERSALES_SMS_PER_PHONE_PER_HOUR": wide,
            "AFTERSALES_SMS_PER_PHONE_PER_DAY": wide,
            "AFTERSALES_WORKER_PROCESSES": "1",
            "AFTERSALES_WORKER_THREADS": "1",  # one chunk in flight at a time
        }, tmp_path)
        system.start("timer", "notifier")
        try:
            for service in ("timer", "notifier"):
                wait_for(lambda s=service: system.metrics_ready(s), timeout=60,
                         what=f"{service} to serve metrics")
            yield system, sms
        finally:
            sms.release.set()
            system.stop()


def add_sms(db: Database, n: int) -> list[int]:
    rows = [{
        "dedup_key": f"wk-{uuid.uuid4().hex}", "case_id": f"WK-{i}", "reason": "case.opened",
        "party": "merchant", "channel": "sms", "recipient": f"1380000{i:04d}",
        "template": "case_opened.merchant",
        "params": {"case_id": f"WK-{i}", "due_at": "2026-11-24T10:00:00+08:00",
                   "tz": "Asia/Shanghai"},
        "urgent": True, "status": NotificationStatus.NEW,
    } for i in range(n)]
    with db.transaction() as s:  # as intake writes them: the timer hands them over
        return list(s.execute(
            insert(NotificationRow).returning(NotificationRow.id, sort_by_parameter_order=True),
            rows).scalars())


def table(db: Database, ids: list[int]) -> dict[str, tuple[str, str | None]]:
    with db.transaction() as s:
        return {r.dedup_key: (r.status, r.last_error) for r in s.execute(
            select(NotificationRow).where(NotificationRow.id.in_(ids)))
            .scalars()}


def test_a_worker_killed_mid_chunk_leaves_only_the_row_with_the_provider_unknown(
    db: Database, amqp: Any, notifier_on_slow_sms: tuple[System, HoldingAliyun],
) -> None:
    system, sms = notifier_on_slow_sms
    ids = add_sms(db, ROWS)
    wait_for(sms.holding.is_set, timeout=60, what="the provider to hold a request")
    system.kill_worker("notifier", "as-notifier")  # mid-chunk, a request in flight
    sms.release.set()
    in_flight = sms.reached[HELD - 1]

    def settled() -> bool:
        return all(status in ("sent", "failed") for status, _ in table(db, ids).values())

    wait_for(settled, timeout=120, what="every notification settled after the restart")
    rows = table(db, ids)
    unknown = {key for key, (status, error) in rows.items()
               if status == NotificationStatus.FAILED and (error or "").startswith("unknown")}
    answered = Counter(r["OutId"] for r in sms.requests)  # requests the provider accepted
    print(f"worker kill: rows={len(ids)} reached={len(sms.reached)} unknown={len(unknown)} "
          f"sent={sum(s == 'sent' for s, _ in rows.values())}")
    assert unknown == {in_flight}
    assert {key for key, (status, _) in rows.items()
            if status == NotificationStatus.SENT} == set(rows) - {in_flight}
    # Once per notification at the provider: the one in flight (answered after its worker
    # died) included, and none of the others twice.
    assert answered == Counter(set(rows))
    assert Counter(sms.reached) == Counter(set(rows))
