"""An SMS provider outage, waited out by the real notifier process (issue 15).

The notifier (and the timer that hands it notifications and releases them at their
`send_after`) run as processes against an HTTP server speaking Aliyun's SendSms that is
first not there at all (connection refused), then answers 503 ServiceUnavailable, for
more attempts than the old retry budget, then comes back. Cases are opened through intake
during the outage, so their notifications come due in it. Counted at the provider: every
notification is accepted exactly once after the outage and none is failed, except the one
the provider refuses for good (an illegal number), which fails alone.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from sqlalchemy import select

from shared.db.models import NotificationRow
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import System, free_port, publish_events
from tests.integration.notifier.notifier_fakes import FakeAliyun
from tests.resources import write_sms_codes

pytestmark = pytest.mark.e2e

KEY_ID, KEY_SECRET = "LTAItest-outage", "test-secret-not-real"
# Attempts after which a transient failure used to fail a notification (RetryPolicy's
# default); the outage must outlast it for every notification.
OLD_RETRY_BUDGET = 6
REFUSED_PHONE = "13900009999"  # the provider refuses it for good (isv.MOBILE_NUMBER_ILLEGAL)


class OutageAliyun(FakeAliyun):
    """FakeAliyun that answers 503 ServiceUnavailable while `unavailable`, and counts what
    it was asked per notification (OutId carries the notification's dedup key)."""

    def __init__(self, port: int) -> None:
        super().__init__({KEY_ID: KEY_SECRET},
                         {REFUSED_PHONE: (200, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")},
                         port=port)
        self.unavailable = True
        self.answered_503: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, Any]]:
        params = dict(parse_qsl(urlsplit(path).query))
        params.update(parse_qsl(body.decode("utf-8")))
        key = params.get("OutId", "")
        if self.unavailable:
            with self._lock:
                self.answered_503[key] += 1
            return 503, {"RequestId": str(uuid.uuid4()), "Code": "ServiceUnavailable",
                         "Message": "The request has failed due to a temporary failure of "
                                    "the server."}
        before = len(self.rejections)
        status, answer = super().handle(method, path, headers, body)
        if len(self.rejections) > before:
            with self._lock:
                self.refused[key] += 1
        return status, answer

    def accepted(self) -> Counter[str]:
        with self._lock:
            return Counter(r["OutId"] for r in self.requests)


@pytest.fixture
def outage(database_url: str, amqp_url: str, tmp_path: Path
           ) -> Iterator[tuple[System, int]]:
    """intake, timer and notifier; the notifier's SMS endpoint is a port nobody listens
    on yet. Retries are seconds apart (the settings' base and cap made small)."""
    codes = write_sms_codes(tmp_path)
    port = free_port()
    wide = "100000"
    system = System({
        "AFTERSALES_DATABASE_URL": database_url,
        "AFTERSALES_AMQP_URL": amqp_url,
        "AFTERSALES_REDIS_PREFIX": f"aftersales-test:{tmp_path.name}:",
        "AFTERSALES_TIMER_POLL_SECONDS": "0.1",
        "AFTERSALES_OUTBOX_POLL_SECONDS": "0.1",
        "AFTERSALES_LOG_LEVEL": "INFO",
        "AFTERSALES_QUIET_HOURS": "",
        "AFTERSALES_EMAIL_TRANSPORT": "log",
        "AFTERSALES_SMS_PROVIDER": "aliyun",
        "AFTERSALES_SMS_ENDPOINT": f"http://127.0.0.1:{port}/",
        "AFTERSALES_SMS_TEMPLATES": str(codes),
        "AFTERSALES_ALIYUN_ACCESS_KEY_ID": KEY_ID,
        "AFTERSALES_ALIYUN_ACCESS_KEY_SECRET": KEY_SECRET,
        "AFTERSALES_SMS_TIMEOUT": "5",
        "AFTERSALES_NOTIFY_RETRY_BASE_SECONDS": "0.2",
        "AFTERSALES_NOTIFY_RETRY_MAX_SECONDS": "1",
        "AFTERSALES_SMS_PER_PHONE_PER_HOUR": wide,
        "AFTERSALES_SMS_PER_PHONE_PER_DAY": wide,
        "AFTERSALES_EMAIL_PER_ADDRESS_PER_HOUR": wide,
    }, tmp_path)
    system.start("intake", "timer", "notifier")
    try:
        for service in ("intake", "timer", "notifier"):
            wait_for(lambda s=service: system.metrics_ready(s), timeout=60,
                     what=f"{service} to serve metrics")
        yield system, port
    finally:
        system.stop()


def opened(case_id: str, phone: str) -> dict[str, Any]:
    return {
        "event_id": f"{case_id}-opened", "type": "case.opened",
        "occurred_at": datetime.now(UTC).isoformat(), "platform": "kuaishou",
        "shop_id": "S-OUT", "order_id": f"O-{case_id}", "case_id": case_id,
        "data": {"kind": "refund_only", "amount_fen": 5900, "reason": "未收到货",
                 "buyer": {"phone": "13800000000", "email": "buyer@example.com"},
                 "merchant": {"phone": phone, "email": "shop@example.com"}},
    }


def rows(db: Database, case_ids: list[str]) -> list[NotificationRow]:
    with db.transaction() as s:
        return list(s.execute(select(NotificationRow).where(
            NotificationRow.case_id.in_(case_ids)).order_by(NotificationRow.id)).scalars())


def sms_rows(db: Database, case_ids: list[str]) -> list[NotificationRow]:
    return [r for r in rows(db, case_ids) if r.channel == "sms"]


@pytest.mark.timeout(300)
def test_a_provider_outage_longer_than_the_retry_budget_is_waited_out(
    outage: tuple[System, int], db: Database, amqp_url: str
) -> None:
    system, port = outage
    run = uuid.uuid4().hex[:6]
    first = [f"OUT-{run}-{i}" for i in range(6)]
    second = [f"OUT-{run}-{i}" for i in range(6, 10)]
    refused_case = f"OUT-{run}-refused"
    cases = first + second + [refused_case]

    def explain() -> str:
        return "\n".join(f"{r.case_id} {r.channel} {r.status} attempts={r.attempts} "
                         f"error={r.last_error}" for r in rows(db, cases)) \
            + "\n--- notifier log (end) ---\n" + system.log("notifier")[-3000:]

    def every_sms_has(n: int, expected: int) -> bool:
        found = sms_rows(db, cases)
        given_up = [r.case_id for r in found if r.status in ("sent", "failed")]
        assert not given_up, f"settled during the outage: {given_up}\n{explain()}"
        return len(found) == expected and all(r.attempts >= n for r in found)

    # 1. Nobody listens on the provider's port: connection refused.
    publish_events(amqp_url, [opened(c, f"139{i:08d}") for i, c in enumerate(first)]
                   + [opened(refused_case, REFUSED_PHONE)])
    wait_for(lambda: every_sms_has(3, len(first) + 1), timeout=60, explain=explain,
             what="every SMS refused a connection three times")
    refused_phase = sms_rows(db, cases)

    # 2. The provider answers, but 503 ServiceUnavailable; more cases open meanwhile.
    with OutageAliyun(port) as provider:
        publish_events(amqp_url, [opened(c, f"139{i:08d}") for i, c in enumerate(second, 6)])
        wait_for(lambda: every_sms_has(OLD_RETRY_BUDGET + 1, len(cases)), timeout=90,
                 explain=explain, what="every SMS tried more often than the old budget")
        during = sms_rows(db, cases)
        answered_503 = dict(provider.answered_503)

        # 3. The provider is back.
        provider.unavailable = False
        wait_for(lambda: all(r.status in ("sent", "failed") for r in rows(db, cases))
                 and len(rows(db, cases)) == 3 * len(cases),
                 timeout=60, explain=explain, what="every notification settled")
        after = rows(db, cases)
        accepted = provider.accepted()
        refused = dict(provider.refused)

    sms_after = [r for r in after if r.channel == "sms"]
    key_of = {r.case_id: r.dedup_key for r in sms_after}
    statuses = Counter((r.channel, r.status) for r in after)
    print(f"\n[fault report] provider outage: cases={len(cases)}, "
          f"sms={len(sms_after)}, attempts_before_comeback="
          f"{sorted(r.attempts for r in during)}, answered_503={sum(answered_503.values())}, "
          f"accepted={sum(accepted.values())}, distinct_accepted={len(accepted)}, "
          f"refused={refused}, statuses={dict(statuses)}")

    # The outage hit every notification: refused connections, then 503 answers.
    assert all("ConnectError" in (r.last_error or "") for r in refused_phase)
    assert not any(r.status in ("sent", "failed") for r in during)  # waiting, in a retry
    assert all(answered_503.get(r.dedup_key, 0) >= 1 for r in during)
    # Waited out: each accepted exactly once afterwards, none failed but the refused one.
    good = [key_of[c] for c in first + second]
    assert accepted == {key: 1 for key in good}
    assert all(r.status == "sent" for r in sms_after if r.case_id != refused_case)
    assert all(r.attempts > OLD_RETRY_BUDGET for r in sms_after)
    refused_row = next(r for r in sms_after if r.case_id == refused_case)
    assert refused_row.status == "failed"
    assert "MOBILE_NUMBER_ILLEGAL" in (refused_row.last_error or "")
    assert REFUSED_PHONE not in (refused_row.last_error or "")  # masked
    assert refused == {key_of[refused_case]: 1}  # refused once, never asked again
    # The emails (the log transport) were never held up by the SMS provider.
    assert statuses[("email", "sent")] == 2 * len(cases)
    assert statuses[("sms", "failed")] == 1 and statuses[("sms", "sent")] == len(cases) - 1
