"""The platform gateway as a real process, over real HTTP, with the real broker and intake,
timer, resolver and notifier: messages built from the platforms' documented fields."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pika
import pytest
from sqlalchemy import func, select

from services.ops.caseview import case_document
from shared.amqp import INTAKE_QUEUE
from shared.db.models import CaseEventRow, CaseRow
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import DecisionTap, Gateway, System, rejected_messages
from tests.platform_messages import (
    china_text,
    douyin_body,
    douyin_data,
    douyin_headers,
    douyin_message,
    kuaishou_body,
    kuaishou_info,
    taobao_message,
    taobao_query,
    unix,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(system.env, tmp_path_factory.mktemp("gateway"))
    gw.start()
    try:
        yield gw
    finally:
        if gw.proc is not None:
            gw.kill(signal.SIGTERM)


def now() -> datetime:
    return datetime.now(UTC)


def case(db: Database, case_id: str) -> dict[str, Any]:
    return case_document(db, case_id) or {}


def case_state(db: Database, case_id: str) -> tuple[str | None, str | None]:
    doc = case(db, case_id).get("case") or {}
    return doc.get("step"), doc.get("resolution")


def unix_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def explain_case(db: Database, system: System, gateway: Gateway, case_id: str) -> str:
    """What a person would look at when a case does not move: the case as `case show`
    sees it and the last lines of each service's log."""
    tails = {name: "\n".join(system.log(name).splitlines()[-15:])
             for name in ("intake", "timer", "resolver")}
    tails["gateway"] = "\n".join(gateway.log().splitlines()[-15:])
    logs = "\n".join(f"--- {name}\n{tail}" for name, tail in tails.items())
    connection = pika.BlockingConnection(pika.URLParameters(system.env["AFTERSALES_AMQP_URL"]))
    try:
        waiting = connection.channel().queue_declare(INTAKE_QUEUE, passive=True)
        queue = f"{INTAKE_QUEUE}: {waiting.method.message_count} ready, " \
                f"{waiting.method.consumer_count} consumers"
    finally:
        connection.close()
    return (f"case {case_id}: {json.dumps(case(db, case_id), default=str, indent=1)}\n"
            f"{queue}\n{logs}")


def events_seen(db: Database, case_id: str) -> list[tuple[str, str]]:
    return [(e["event_id"], e["outcome"]) for e in case(db, case_id).get("timeline", [])
            if e["what"] == "event"]


def send_douyin(gateway: Gateway, *messages: dict[str, Any]) -> httpx.Response:
    body = douyin_body(*messages)
    return gateway.deliver("douyin", body, douyin_headers(body))


DOUYIN_OK = {"code": 0, "msg": "success"}


# ---- Douyin -------------------------------------------------------------------------------------

def test_douyin_journey_open_move_deadline_approve_refund(gateway: Gateway, db: Database) -> None:
    opened_at = now() - timedelta(minutes=5)
    new_due = (now() + timedelta(hours=3)).replace(microsecond=0)
    answer = send_douyin(gateway, douyin_message("200", "dy-j1-200", douyin_data(
        81001, status=6, type_=2, amount=4990, apply_time=unix(opened_at))))
    assert answer.status_code == 200 and answer.json() == DOUYIN_OK
    wait_for(lambda: case_state(db, "douyin-81001")[0] == "merchant_response", timeout=30,
             what="the Douyin case to open")

    assert send_douyin(gateway, douyin_message("209", "dy-j1-209", {
        "aftersale_id": 81001, "aftersale_status": 6, "aftersale_type": 2,
        "p_id": 4900000000000081001, "s_id": 1, "shop_id": 1234567,
        "status_deadline": unix(new_due)})).json() == DOUYIN_OK
    wait_for(lambda: case(db, "douyin-81001")["case"]["step_due_at"] == new_due.isoformat(),
             timeout=30, what="the deadline to move to the platform's status_deadline")

    assert send_douyin(gateway, douyin_message("201", "dy-j1-201", douyin_data(
        81001, status=12, type_=2, agree_time=unix(now()),
        latest_record="商家同意退款"))).json() == DOUYIN_OK
    wait_for(lambda: case_state(db, "douyin-81001")[0] == "refund_pending", timeout=30,
             what="the merchant's approval")
    assert send_douyin(gateway, douyin_message("206", "dy-j1-206", douyin_data(
        81001, status=12, type_=2, success_time=unix(now())))).json() == DOUYIN_OK
    wait_for(lambda: case_state(db, "douyin-81001") == ("closed", "refunded"), timeout=30,
             what="the refund to close the case")
    doc = case(db, "douyin-81001")
    assert [e["event_id"] for e in doc["timeline"] if e["what"] == "event"] == [
        "douyin-dy-j1-200", "douyin-dy-j1-209", "douyin-dy-j1-201", "douyin-dy-j1-206"]
    assert not [e for e in doc["timeline"] if e["what"] == "decision"]


def test_douyin_platform_auto_close_while_our_timer_is_about_to_fire(
        gateway: Gateway, db: Database, amqp_url: str) -> None:
    """Two return cases waiting for the buyer's return, both due in a few seconds by the
    platform's 209. For one the platform's 207 (its own auto-close) arrives first: no
    decision of ours follows. The other gets our auto-close, then the platform's 207: it is
    recorded, not applied, and our decision is not repeated."""
    cases = {"platform_first": 82001, "ours_first": 82002}
    with DecisionTap(amqp_url) as tap:
        for name, aftersale_id in cases.items():
            assert send_douyin(
                gateway,
                douyin_message("200", f"dy-{name}-200", douyin_data(
                    aftersale_id, status=6, type_=0, apply_time=unix(now()))),
                douyin_message("202", f"dy-{name}-202", douyin_data(
                    aftersale_id, status=7, type_=0, latest_record="商家同意退货")),
            ).json() == DOUYIN_OK
        for aftersale_id in cases.values():
            wait_for(lambda a=aftersale_id: case_state(db, f"douyin-{a}")[0]
                     == "buyer_return_shipping", timeout=30, what="the return to be agreed")
        due = now() + timedelta(seconds=10)
        assert send_douyin(gateway, *[douyin_message("209", f"dy-{name}-209", {
            "aftersale_id": a, "aftersale_status": 7, "aftersale_type": 0, "p_id": a,
            "shop_id": 1234567, "status_deadline": unix(due) + 1})
            for name, a in cases.items()]).json() == DOUYIN_OK
        platform_first = "douyin-82001"
        moved_to = datetime.fromtimestamp(unix(due) + 1, UTC).isoformat()
        wait_for(lambda: all(case(db, f"douyin-{a}")["case"]["step_due_at"] == moved_to
                             for a in cases.values()),
                 timeout=30, what="both deadlines moved a few seconds ahead")
        assert {(d["purpose"], d["due_at"]) for d in case(db, platform_first)[
            "pending_deadlines"]} >= {("deadline", moved_to)}
        # The platform's timer wins for the first case, before ours comes due.
        closed = douyin_data(82001, status=28, type_=0, close_time=unix(now()),
                             latest_record="买家超时未退货，系统自动关闭售后")
        assert send_douyin(gateway, douyin_message("207", "dy-platform_first-207", closed)
                           ).json() == DOUYIN_OK
        wait_for(lambda: case_state(db, platform_first) == ("closed", "closed_by_platform"),
                 timeout=30, what="the platform's close to be applied")
        assert case(db, platform_first)["pending_deadlines"] == []  # ours is cancelled
        assert now() < due, "the platform's close must arrive before our deadline (slow host?)"

        ours = wait_for(lambda: [d for d in tap.snapshot() if d["case_id"] == "douyin-82002"],
                        timeout=60, what="our auto-close of the second case")
        assert [d["type"] for d in ours] == ["decision.auto_closed"]
        # The platform's own close of that case arrives after ours, and says so: its close
        # time, in whole seconds, plainly after our deadline (at the deadline's own second
        # it would count as in time, and rebuild the case over our decision).
        after_ours = unix(due) + 3
        wait_for(lambda: unix(now()) >= after_ours, timeout=30,
                 what="the platform's close time to have come")
        late = douyin_data(82002, status=28, type_=0, close_time=after_ours,
                           latest_record="买家超时未退货，系统自动关闭售后")
        assert send_douyin(gateway, douyin_message("207", "dy-ours_first-207", late)
                           ).json() == DOUYIN_OK
        wait_for(lambda: ("douyin-dy-ours_first-207", "out_of_state")
                 in events_seen(db, "douyin-82002"), timeout=30,
                 what="the platform's late close to be recorded")
        everything = tap.catch_up()
    assert [d["type"] for d in everything if d["case_id"] == "douyin-82002"] == [
        "decision.auto_closed"]  # not repeated, not contradicted
    assert [d for d in everything if d["case_id"] == platform_first] == []
    ours_doc = case(db, "douyin-82002")
    assert ours_doc["case"]["resolution"] == "auto_closed"
    kinds = [(e["what"], e["type"]) for e in ours_doc["timeline"]]
    assert ("decision", "decision.auto_closed") in kinds and ("event", "buyer.cancelled") in kinds


def test_douyin_duplicates_by_msg_id_have_the_effect_of_once(gateway: Gateway,
                                                             db: Database) -> None:
    batch = [douyin_message("200", "dy-dup-200", douyin_data(83001, status=6, type_=1)),
             douyin_message("204", "dy-dup-204", douyin_data(83001, status=27, type_=1))]
    for _ in range(3):  # the platform retries the whole batch
        assert send_douyin(gateway, *batch).json() == DOUYIN_OK
    wait_for(lambda: len(events_seen(db, "douyin-83001")) >= 2, timeout=30,
             what="the batch to be taken")
    # a marker after the retries: once it is in, every retry has been through intake
    assert send_douyin(gateway, douyin_message("200", "dy-dup-marker", douyin_data(
        83002, status=6, type_=1))).json() == DOUYIN_OK
    wait_for(lambda: case_state(db, "douyin-83002")[0] is not None, timeout=30,
             what="the marker case")
    assert events_seen(db, "douyin-83001") == [("douyin-dy-dup-200", "applied"),
                                               ("douyin-dy-dup-204", "applied")]
    assert case_state(db, "douyin-83001")[0] == "buyer_after_rejection"


def test_douyin_wrong_signature_is_401_and_publishes_nothing(gateway: Gateway, db: Database,
                                                             amqp_url: str) -> None:
    rejected_messages(amqp_url)  # start from an empty rejected queue
    body = douyin_body(douyin_message("200", "dy-forged", douyin_data(84001, status=6)))
    forged = [douyin_headers(body, secret="not-the-secret"), douyin_headers(body, key="other"),
              {"app-id": "7012345678901234567"}]
    for headers in forged:
        answer = gateway.post("douyin", body, headers)
        assert answer.status_code == 401 and answer.json()["code"] != 0
    assert send_douyin(gateway, douyin_message("200", "dy-after-forged", douyin_data(
        84002, status=6))).json() == DOUYIN_OK
    wait_for(lambda: case_state(db, "douyin-84002")[0] is not None, timeout=30,
             what="the genuine message after the forged ones")
    assert case(db, "douyin-84001") == {}
    assert rejected_messages(amqp_url) == []


def test_douyin_unmapped_and_malformed_messages_are_kept_for_ops(
        gateway: Gateway, db: Database, amqp_url: str) -> None:
    rejected_messages(amqp_url)
    answer = send_douyin(
        gateway,
        douyin_message("226", "dy-reship", douyin_data(85001, status=6, type_=7)),
        {"tag": "200", "msg_id": "dy-broken", "data": "{not json"},
        douyin_message("200", "dy-fine", douyin_data(85002, status=6)),
    )
    assert answer.json() == DOUYIN_OK  # the platform need not resend the good one
    kept = wait_for(lambda: rejected_messages(amqp_url), timeout=30, what="kept messages")
    by_id = {h["x-platform-message-id"]: (json.loads(b), h) for b, h in kept}
    assert set(by_id) == {"dy-reship", "dy-broken"}
    assert by_id["dy-reship"][1]["x-reject-reason"] == "unmapped_platform_message"
    assert by_id["dy-reship"][0]["tag"] == "226"  # unchanged, as the platform sent it
    assert by_id["dy-broken"][1]["x-reject-reason"] == "malformed_platform_message"
    wait_for(lambda: case_state(db, "douyin-85002")[0] == "merchant_response", timeout=30,
             what="the good message of the batch")


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400), (b'{"tag": "200"}', 400), (b"\xff\xfe\x00", 400),
    (b"[" * 50_000 + b"]" * 50_000, 400), (b"x" * (3 * 1024 * 1024), 413),
])
def test_bad_input_gets_a_verdict_and_the_gateway_lives_on(gateway: Gateway, body: bytes,
                                                           status: int) -> None:
    answer = gateway.post("douyin", body, douyin_headers(body))
    assert answer.status_code == status
    assert answer.json()["msg"]
    assert gateway.healthy()


def test_bad_input_to_kuaishou_and_taobao_gets_a_verdict(gateway: Gateway) -> None:
    for body in (b"", b"%%%", b"QUJDRA==", b"\x00" * 100, kuaishou_body(
            "kwaishop_aftersales_addRefund", "x", {"refundId": [1]}, app_key="intruder")):
        answer = gateway.post("kuaishou", body)
        assert answer.status_code == 401 and answer.json()["result"] == 0
    stamp = now()
    for body, status in ((b"{not json", 400), (b"42", 400), (b'"text"', 400),
                         (b"[" * 50_000, 400)):
        answer = gateway.post("taobao", body, params=taobao_query(body, stamp))
        assert answer.status_code == status, body[:20]
        assert answer.json()["response"]["flag"] == "failure"
    body = b"[]"
    assert gateway.post("taobao", body, params={"app_key": "12345678"}).status_code == 401
    assert gateway.healthy()


def test_health_and_readiness(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).text == "ok\n"
    assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
    assert httpx.post(f"{gateway.url}/platforms/pinduoduo/messages", content=b"[]",
                      timeout=5).status_code == 404


def test_metrics_count_per_platform_and_verdict_without_ids(gateway: Gateway) -> None:
    send_douyin(gateway, douyin_message("213", "dy-ignored", {"aftersale_id": 1}))
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'aftersales_gateway_requests_total{outcome="ok",platform="douyin"}' in text
    assert 'aftersales_gateway_messages_total{platform="douyin",verdict="ignored"}' in text
    assert "81001" not in text and "dy-" not in text


def test_douyin_arbitration_pauses_the_clock_and_its_result_decides(gateway: Gateway,
                                                                    db: Database) -> None:
    ids = {"aftersale_id": 86001, "aftersale_status": 27, "aftersale_type": 1,
           "p_id": 4900000000000086001, "s_id": 1, "shop_id": 1234567, "arbitrate_id": "A1"}
    assert send_douyin(
        gateway,
        douyin_message("200", "dy-arb-200", douyin_data(86001, status=6, type_=1)),
        douyin_message("204", "dy-arb-204", douyin_data(86001, status=27, type_=1)),
        douyin_message("212", "dy-arb-212", {**ids, "arbitrate_status": 1}),
    ).json() == DOUYIN_OK
    wait_for(lambda: case_state(db, "douyin-86001")[0] == "intervention", timeout=30,
             what="the arbitration to pause the case")
    assert case(db, "douyin-86001")["pending_deadlines"] == []  # the clock is paused
    assert send_douyin(
        gateway,
        douyin_message("213", "dy-arb-213", {**ids, "arbitrate_status": 4}),
        douyin_message("216", "dy-arb-216", {**ids, "arbitrate_status": 2,
                                             "arbitrate_conclusion": 1}),
    ).json() == DOUYIN_OK
    # the buyer is upheld after a refused refund: the refund goes ahead
    wait_for(lambda: case_state(db, "douyin-86001")[0] == "refund_pending", timeout=30,
             what="the arbitration result")


# ---- Kuaishou -----------------------------------------------------------------------------------

def test_kuaishou_journey(gateway: Gateway, system: System, db: Database) -> None:
    end = (now() + timedelta(hours=5)).replace(microsecond=0)
    created = now() - timedelta(minutes=5)
    steps = [
        ("kwaishop_aftersales_addRefund", "ks-j-1", kuaishou_info(
            91001, status=10, handling_way=10, end_time=end, createTime=unix_ms(created),
            updateTime=unix_ms(created)), "merchant_response"),
        # each update a minute after the one before, as the platform's updateTime says
        ("kwaishop_aftersales_updateRefund", "ks-j-2", kuaishou_info(
            91001, status=50, handling_way=10, createTime=unix_ms(created),
            updateTime=unix_ms(created + timedelta(minutes=1))), "refund_pending"),
        ("kwaishop_aftersales_updateRefund", "ks-j-3", kuaishou_info(
            91001, status=60, handling_way=10, createTime=unix_ms(created),
            updateTime=unix_ms(created + timedelta(minutes=2))), "closed"),
    ]
    for event, event_id, info, step in steps:
        answer = gateway.deliver("kuaishou", kuaishou_body(event, event_id, info))
        assert answer.status_code == 200 and answer.json() == {"result": 1}
        wait_for(lambda s=step: case_state(db, "kuaishou-91001")[0] == s, timeout=30,
                 what=f"the Kuaishou case to reach {step}",
                 explain=lambda: explain_case(db, system, gateway, "kuaishou-91001"))
        if step == "merchant_response":  # the platform's endTime is the deadline
            assert case(db, "kuaishou-91001")["case"]["step_due_at"] == end.isoformat()
    assert case_state(db, "kuaishou-91001") == ("closed", "refunded")
    forged = kuaishou_body(*steps[0][:3], app_key="someone-else")
    assert gateway.post("kuaishou", forged).status_code == 401


def test_kuaishou_platform_deadline_is_the_one_our_timer_fires(
        gateway: Gateway, db: Database, amqp_url: str) -> None:
    end = now() + timedelta(seconds=3)
    with DecisionTap(amqp_url) as tap:
        answer = gateway.deliver("kuaishou", kuaishou_body(
            "kwaishop_aftersales_addRefund", "ks-late-1",
            kuaishou_info(91002, status=11, handling_way=3, end_time=end)))
        assert answer.json() == {"result": 1}
        got = wait_for(lambda: [d for d in tap.snapshot() if d["case_id"] == "kuaishou-91002"],
                       timeout=60, what="our decision at the platform's endTime")
    assert [d["type"] for d in got] == ["decision.auto_approved"]
    assert got[0]["due_at"] == datetime.fromtimestamp(
        int(end.timestamp() * 1000) / 1000, UTC).isoformat()
    assert datetime.fromisoformat(got[0]["decided_at"]) >= datetime.fromisoformat(
        got[0]["due_at"])


# ---- Taobao -------------------------------------------------------------------------------------

def test_taobao_journey_with_the_deadline_from_refund_remind_timeout(
        gateway: Gateway, db: Database) -> None:
    wait_agree = (now() + timedelta(days=2)).replace(microsecond=0)
    wait_return = (now() + timedelta(days=7)).replace(microsecond=0)
    flow = [
        ("taobao_refund_RefundCreated", {"status": "WAIT_SELLER_AGREE", "has_good_return": True,
                                         "refund_remind_timeout": {
                                             "remind_type": 1, "exist_timeout": True,
                                             "timeout": china_text(wait_agree)}},
         "merchant_response", wait_agree),
        ("taobao_refund_RefundSellerAgreeAgreement",
         {"status": "WAIT_BUYER_RETURN_GOODS", "has_good_return": True,
          "refund_remind_timeout": {"remind_type": 2, "exist_timeout": True,
                                    "timeout": china_text(wait_return)}},
         "buyer_return_shipping", wait_return),
        ("taobao_refund_RefundBuyerReturnGoods", None, "return_in_transit", None),
        ("taobao_refund_RefundSuccess", {"status": "SUCCESS", "has_good_return": True},
         "closed", None),
    ]
    for number, (topic, refund, step, due) in enumerate(flow, start=1):
        extra = {"company_name": "中通快递", "sid": "ZT123"} if refund is None else {}
        message = taobao_message(topic, 95000 + number, 95001, modified=now(), refund=refund,
                                 has_good_return=True, **extra)
        body = json.dumps(message, ensure_ascii=False).encode()
        answer = gateway.deliver("taobao", body, params=taobao_query(body, now()))
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"]["flag"] == "success"
        wait_for(lambda s=step: case_state(db, "taobao-95001")[0] == s, timeout=30,
                 what=f"the Taobao case to reach {step}")
        if due is not None:  # China time, no zone, read as Asia/Shanghai
            assert case(db, "taobao-95001")["case"]["step_due_at"] == due.isoformat()
    assert case_state(db, "taobao-95001") == ("closed", "refunded")
    body = json.dumps(taobao_message("taobao_refund_RefundClosed", 95100, 95001,
                                     modified=now())).encode()
    assert gateway.post("taobao", body, params=taobao_query(body, now(), secret="x")
                        ).status_code == 401


# ---- the fault: killed mid-batch ----------------------------------------------------------

def _send_partially(port: int, body: bytes, headers: dict[str, str]) -> socket.socket:
    """Start a request and send only half its body, as a platform cut off mid-batch."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall((f"POST /platforms/douyin/messages HTTP/1.1\r\nHost: x\r\n{head}"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:len(body) // 2])
    return sock


def test_gateway_killed_mid_batch_the_platforms_retry_takes_each_message_once(
        gateway: Gateway, system: System, db: Database) -> None:
    """SIGKILL the gateway in the middle of batches: once mid-upload, then at random moments
    after it took the request (mapping, publishing, or just after the broker took the batch
    but before the platform heard back). The platform retries each batch until it gets its
    success body. In effect every message is taken once: one case and one applied event per
    message; what the broker took before a kill comes again and intake drops it as a
    duplicate."""
    rng = random.Random(20)
    rounds, per_batch = 5, 300
    report = {"answered_before_the_kill": 0, "retries": 0}
    duplicates_before = _intake_duplicates(system)
    all_ids: list[int] = []
    for round_ in range(rounds):
        ids = [96000 + round_ * 1000 + i for i in range(per_batch)]
        all_ids += ids
        body = douyin_body(*[douyin_message("200", f"dy-kill-{a}", douyin_data(
            a, status=6, type_=1, apply_time=unix(now()))) for a in ids])
        headers = douyin_headers(body)
        if round_ == 0:
            sock = _send_partially(gateway.port, body, headers)
            gateway.kill()
            sock.close()
        else:
            done: list[int] = []
            sender = threading.Thread(target=_post_status,
                                      args=(gateway, body, headers, done), daemon=True)
            sender.start()
            wait_for(lambda: _request_started(gateway), timeout=10, interval=0.002,
                     what="the gateway to take the request")
            time.sleep(rng.uniform(0, 0.08))  # the fault's moment, not a wait for a condition
            gateway.kill()
            sender.join(30)
            if done == [200]:
                report["answered_before_the_kill"] += 1
        gateway.start()
        if round_ == 0 or done != [200]:
            report["retries"] += 1
            answer = gateway.deliver("douyin", body, headers)  # the platform's retry
            assert answer.status_code == 200 and answer.json() == DOUYIN_OK
    # a marker after every retry: once intake has it, it has had everything before it
    assert send_douyin(gateway, douyin_message("200", "dy-kill-marker", douyin_data(
        96999, status=6))).json() == DOUYIN_OK
    wait_for(lambda: case_state(db, "douyin-96999")[0] is not None, timeout=120,
             what="the marker after the retries")
    assert _cases_opened(db, all_ids) == len(all_ids)
    with db.transaction() as s:
        rows = s.execute(
            select(CaseEventRow.event_id, CaseEventRow.outcome, func.count())
            .where(CaseEventRow.event_id.like("douyin-dy-kill-%"))
            .group_by(CaseEventRow.event_id, CaseEventRow.outcome)).all()
    assert sorted(r[0] for r in rows if r[0] != "douyin-dy-kill-marker") == sorted(
        f"douyin-dy-kill-{a}" for a in all_ids)
    assert {(outcome, n) for _id, outcome, n in rows} == {("applied", 1)}
    report["duplicates_dropped_by_intake"] = _intake_duplicates(system) - duplicates_before
    print(f"[fault report] gateway killed mid-batch: {rounds} rounds of {per_batch} messages, "
          f"{report}; every message taken once")


def test_copies_of_the_gateway_take_the_same_batch_once(
        gateway: Gateway, system: System, db: Database,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stateless: a second copy takes requests too, and the platform's retry landing on the
    other copy at the same time is deduplicated by the message ids."""
    other = Gateway(system.env, tmp_path_factory.mktemp("gateway-copy"))
    other.start()
    try:
        ids = [97000 + i for i in range(50)]
        body = douyin_body(*[douyin_message("200", f"dy-copy-{a}", douyin_data(a, status=6))
                             for a in ids])
        answers: list[int] = []
        senders = [threading.Thread(target=_post_status, args=(g, body, douyin_headers(body),
                                                              answers))
                   for g in (gateway, other)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        assert answers == [200, 200]
        wait_for(lambda: _cases_opened(db, ids) == len(ids), timeout=60,
                 what="every case of the batch")
        assert send_douyin(other, douyin_message("200", "dy-copy-marker", douyin_data(
            97999, status=6))).json() == DOUYIN_OK
        wait_for(lambda: case_state(db, "douyin-97999")[0] is not None, timeout=60,
                 what="the marker after both copies' batches")
        with db.transaction() as s:
            counts = s.execute(
                select(CaseEventRow.outcome, func.count())
                .where(CaseEventRow.event_id.like("douyin-dy-copy-%"))
                .where(CaseEventRow.event_id != "douyin-dy-copy-marker")
                .group_by(CaseEventRow.outcome)).all()
        assert dict(counts) == {"applied": len(ids)}
    finally:
        other.kill(signal.SIGTERM)


def _post_status(gateway: Gateway, body: bytes, headers: dict[str, str],
                 out: list[int]) -> None:
    try:
        out.append(gateway.deliver("douyin", body, headers).status_code)
    except httpx.HTTPError:
        out.append(0)


def _request_started(gateway: Gateway) -> bool:
    """The gateway process has an established connection from us (the request is in)."""
    assert gateway.proc is not None
    out = subprocess.run(["ss", "-Htn", "state", "established", f"sport = :{gateway.port}"],
                         capture_output=True, text=True, check=False).stdout
    return bool(out.strip())


def _intake_duplicates(system: System) -> float:
    total = 0.0
    for line in system.metrics("intake").splitlines():
        if (line.startswith("aftersales_events_received_total{")
                and 'outcome="duplicate"' in line and 'platform="douyin"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _cases_opened(db: Database, ids: list[int]) -> int:
    names = [f"douyin-{a}" for a in ids]
    with db.transaction() as s:
        return int(s.execute(select(func.count()).select_from(CaseRow)
                             .where(CaseRow.case_id.in_(names))).scalar_one())
