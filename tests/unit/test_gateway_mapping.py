"""The gateway's pure parts: each platform's check and unpacking, and the mapping files."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.gateway import platforms
from services.gateway.mapping import (
    MAPPINGS_DIR,
    Ignored,
    Mapped,
    MappingError,
    Unmapped,
    load_mapping,
    load_mappings,
    map_message,
)
from tests.platform_messages import (
    CHINA_TZ,
    DOUYIN_KEY,
    DOUYIN_SECRET,
    KUAISHOU_KEY,
    KUAISHOU_SECRET,
    TAOBAO_KEY,
    TAOBAO_SECRET,
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

MAPPINGS = load_mappings()
NOW = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)  # 10:00 in China


def douyin(*messages: dict) -> list:
    body = douyin_body(*messages)
    unpacked = platforms.douyin_unpack(body, MAPPINGS["douyin"], 100)
    assert isinstance(unpacked, platforms.Unpacked)
    return [map_message(MAPPINGS["douyin"], m, NOW) for m in unpacked.messages]


def events_of(verdict: object) -> list[dict]:
    assert isinstance(verdict, Mapped), verdict
    return [e.body for e in verdict.events]


# ---- Douyin ---------------------------------------------------------------------------------

def test_douyin_signature_is_md5_of_key_body_secret() -> None:
    body = douyin_body(douyin_message("200", "m1", douyin_data(1, status=6)))
    assert platforms.douyin_verify(douyin_headers(body), body, DOUYIN_KEY, DOUYIN_SECRET) is None
    for headers in (douyin_headers(body, secret="other"), douyin_headers(body, key="other"),
                    douyin_headers(body + b" "), {}):
        refusal = platforms.douyin_verify(headers, body, DOUYIN_KEY, DOUYIN_SECRET)
        assert refusal is not None and refusal.status == 401


def test_douyin_200_opens_a_case_in_china_time() -> None:
    applied = datetime(2026, 11, 22, 9, 30, tzinfo=CHINA_TZ)
    [verdict] = douyin(douyin_message("200", "7301", douyin_data(
        9001, status=6, type_=0, amount=12900, apply_time=unix(applied))))
    [event] = events_of(verdict)
    assert event["event_id"] == "douyin-7301" and event["type"] == "case.opened"
    assert event["case_id"] == "douyin-9001" and event["platform"] == "douyin"
    assert event["order_id"] == "4900000000000009001" and event["shop_id"] == "1234567"
    assert event["data"]["kind"] == "return_refund" and event["data"]["amount_fen"] == 12900
    assert event["occurred_at"] == "2026-11-22T09:30:00+08:00"


def test_douyin_201_actor_is_the_platform_when_its_timer_acted() -> None:
    merchant, platform = douyin(
        douyin_message("201", "a", douyin_data(1, status=12, latest_record="商家同意退款")),
        douyin_message("201", "b", douyin_data(2, status=12, latest_record="超时自动同意退款")),
    )
    assert events_of(merchant)[0]["data"]["actor"] == "merchant"
    assert events_of(platform)[0]["data"]["actor"] == "platform"
    assert events_of(platform)[0]["type"] == "merchant.approved"


def test_douyin_201_after_a_return_is_receipt_then_approval() -> None:
    [verdict] = douyin(douyin_message("201", "m9", douyin_data(3, status=12, type_=0)))
    assert [(e["event_id"], e["type"]) for e in events_of(verdict)] == [
        ("douyin-m9", "merchant.received"), ("douyin-m9-2", "merchant.approved")]


def test_douyin_209_moves_the_deadline_of_the_step_its_status_names() -> None:
    due = datetime(2026, 11, 24, 18, 0, tzinfo=CHINA_TZ)
    [verdict] = douyin(douyin_message("209", "d1", {
        "aftersale_id": 5, "aftersale_status": 7, "aftersale_type": 0, "p_id": 11, "s_id": 12,
        "shop_id": 13, "status_deadline": unix(due)}))
    [event] = events_of(verdict)
    assert event["type"] == "deadline.changed" and event["data"]["step"] == "buyer_return_shipping"
    assert event["due_at"] == "2026-11-24T18:00:00+08:00"
    [unknown] = douyin(douyin_message("209", "d2", {
        "aftersale_id": 5, "aftersale_status": 99, "aftersale_type": 0, "p_id": 11,
        "shop_id": 13, "status_deadline": unix(due)}))
    assert isinstance(unknown, Unmapped) and "99" in unknown.detail


def test_douyin_arbitration() -> None:
    ids = {"aftersale_id": 6, "aftersale_status": 6, "aftersale_type": 1, "p_id": 1,
           "s_id": 2, "shop_id": 3, "arbitrate_id": "ARB1"}
    applied, evidence, upheld, refused, odd = douyin(
        douyin_message("212", "x1", {**ids, "arbitrate_status": 1}),
        douyin_message("213", "x2", {**ids, "arbitrate_status": 4}),
        douyin_message("216", "x3", {**ids, "arbitrate_status": 2, "arbitrate_conclusion": 1}),
        douyin_message("216", "x4", {**ids, "arbitrate_status": 3, "arbitrate_conclusion": 2}),
        douyin_message("216", "x5", {**ids, "arbitrate_status": 255}),
    )
    assert events_of(applied)[0]["type"] == "intervention.requested"
    assert isinstance(evidence, Ignored)
    assert events_of(upheld)[0]["data"]["outcome"] == "buyer"
    assert events_of(refused)[0]["data"]["outcome"] == "merchant"
    assert isinstance(odd, Unmapped)


def test_douyin_unsupported_messages_are_unmapped_not_dropped() -> None:
    price_protection, unknown_tag = douyin(
        douyin_message("200", "u1", douyin_data(7, status=6, type_=6)),
        douyin_message("226", "u2", douyin_data(8, status=6, type_=7)),
    )
    assert isinstance(price_protection, Unmapped) and "type '6'" in price_protection.detail
    assert isinstance(unknown_tag, Unmapped) and "226" in unknown_tag.detail


@pytest.mark.parametrize("body", [b"", b"{", b"[1", b'{"tag": "200"}', b"NaN", b"1",
                                  b"\xff\xfe", b"[" * 100_000])
def test_douyin_bad_bodies_are_refused_with_a_reason(body: bytes) -> None:
    refusal = platforms.douyin_unpack(body, MAPPINGS["douyin"], 100)
    assert isinstance(refusal, platforms.Refusal) and refusal.status == 400 and refusal.detail


def test_douyin_bad_elements_are_kept_apart_from_good_ones() -> None:
    good = douyin_message("200", "g1", douyin_data(1, status=6))
    body = json.dumps([good, 5, {"tag": "200", "msg_id": "b1", "data": {"not": "a string"}},
                       {"tag": "200", "msg_id": "b2", "data": "[1]"},
                       {"tag": "200", "data": "{}"},
                       douyin_message("200", "b3", {"aftersale_id": {"x": 1}})]).encode()
    unpacked = platforms.douyin_unpack(body, MAPPINGS["douyin"], 100)
    assert isinstance(unpacked, platforms.Unpacked)
    assert [m.message_id for m in unpacked.messages] == ["g1", "b3"]
    assert len(unpacked.malformed) == 4
    wrong_type = map_message(MAPPINGS["douyin"], unpacked.messages[1], NOW)
    assert isinstance(wrong_type, Unmapped) and "case id" in wrong_type.detail


def test_douyin_too_many_messages_is_refused() -> None:
    body = douyin_body(*[douyin_message("200", str(i), douyin_data(i, status=6))
                         for i in range(5)])
    assert isinstance(platforms.douyin_unpack(body, MAPPINGS["douyin"], 4), platforms.Refusal)


# ---- Kuaishou -------------------------------------------------------------------------------

def kuaishou(body: bytes) -> platforms.Unpacked | platforms.Refusal:
    return platforms.kuaishou_unpack(body, KUAISHOU_SECRET, KUAISHOU_KEY, MAPPINGS["kuaishou"])


def test_kuaishou_message_decrypts_and_maps_with_its_deadline_in_ms() -> None:
    end = datetime(2026, 11, 23, 10, 0, tzinfo=CHINA_TZ)
    unpacked = kuaishou(kuaishou_body("kwaishop_aftersales_addRefund", "ev1",
                                      kuaishou_info(501, status=10, end_time=end)))
    assert isinstance(unpacked, platforms.Unpacked)
    [event] = events_of(map_message(MAPPINGS["kuaishou"], unpacked.messages[0], NOW))
    assert event["event_id"] == "kuaishou-ev1" and event["case_id"] == "kuaishou-501"
    assert event["data"]["kind"] == "refund_only" and event["data"]["amount_fen"] == 2990
    assert event["due_at"] == "2026-11-23T10:00:00+08:00"
    assert event["shop_id"] == "88001"


def test_kuaishou_update_maps_by_status_and_negotiation() -> None:
    rejected = kuaishou(kuaishou_body("kwaishop_aftersales_updateRefund", "ev2",
                                      kuaishou_info(501, status=10, negotiateStatus=3)))
    refunded = kuaishou(kuaishou_body("kwaishop_aftersales_updateRefund", "ev3",
                                      kuaishou_info(501, status=60)))
    failed = kuaishou(kuaishou_body("kwaishop_aftersales_updateRefund", "ev4",
                                    kuaishou_info(501, status=70)))
    types = []
    for unpacked in (rejected, refunded):
        assert isinstance(unpacked, platforms.Unpacked)
        types += [e["type"] for e in events_of(
            map_message(MAPPINGS["kuaishou"], unpacked.messages[0], NOW))]
    assert types == ["merchant.rejected", "refund.completed"]
    assert isinstance(failed, platforms.Unpacked)
    assert isinstance(map_message(MAPPINGS["kuaishou"], failed.messages[0], NOW), Unmapped)


def test_kuaishou_wrong_key_or_app_is_refused() -> None:
    info = kuaishou_info(1, status=10)
    other_secret = base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()
    for body in (kuaishou_body("kwaishop_aftersales_addRefund", "e", info,
                               app_key="someone-else"),
                 kuaishou_body("kwaishop_aftersales_addRefund", "e", info,
                               secret=other_secret),
                 b"not base64 !!", b"", b"QUJD"):
        refusal = kuaishou(body)
        assert isinstance(refusal, platforms.Refusal) and refusal.status == 401, body


# ---- Taobao ---------------------------------------------------------------------------------

def test_taobao_sign_and_timestamp_window() -> None:
    body = json.dumps(taobao_message("taobao_refund_RefundCreated", 1, 70, modified=NOW)).encode()
    mapping = MAPPINGS["taobao"]
    assert platforms.taobao_verify(taobao_query(body, NOW), body, TAOBAO_KEY, TAOBAO_SECRET,
                                   NOW, mapping) is None
    for params, now in ((taobao_query(body, NOW, secret="x"), NOW),
                        (taobao_query(body + b" ", NOW), NOW),
                        (taobao_query(body, NOW - timedelta(minutes=16)), NOW),
                        ({}, NOW)):
        assert isinstance(platforms.taobao_verify(params, body, TAOBAO_KEY, TAOBAO_SECRET, now,
                                                  mapping), platforms.Refusal)


def test_taobao_deadline_comes_from_refund_remind_timeout_in_china_time() -> None:
    message = taobao_message("taobao_refund_RefundCreated", 11, 70, modified=NOW,
                             refund={"status": "WAIT_SELLER_AGREE", "has_good_return": True,
                                     "refund_remind_timeout": {
                                         "remind_type": 1, "exist_timeout": True,
                                         "timeout": "2026-11-24 10:00:00"}})
    unpacked = platforms.taobao_unpack(json.dumps(message).encode(), MAPPINGS["taobao"], 10)
    assert isinstance(unpacked, platforms.Unpacked)
    [event] = events_of(map_message(MAPPINGS["taobao"], unpacked.messages[0], NOW))
    assert event["due_at"] == "2026-11-24T10:00:00+08:00"
    assert event["data"]["kind"] == "return_refund" and event["data"]["amount_fen"] == 12900
    assert event["occurred_at"] == "2026-11-22T10:00:00+08:00"
    assert event["event_id"] == "taobao-11" and event["case_id"] == "taobao-70"


# ---- the mapping files ------------------------------------------------------------------------

def test_shipped_mappings_load_and_name_only_real_events_kinds_and_steps() -> None:
    assert set(MAPPINGS) == {"douyin", "kuaishou", "taobao"}
    assert MAPPINGS["douyin"].steps["6"] == "merchant_response"


@pytest.mark.parametrize("change, complaint", [
    ('events = ["case.opened"]', "unknown event types"),
    ('"0" = "return_refund"', "unknown kinds"),
    ('"6" = "merchant_response"', "unknown steps"),
])
def test_a_wrong_mapping_file_is_refused_naming_the_problem(tmp_path: Path, change: str,
                                                             complaint: str) -> None:
    text = (MAPPINGS_DIR / "douyin.toml").read_text(encoding="utf-8")
    assert change in text
    broken = change.replace("case.opened", "case.openned").replace(
        "return_refund", "return_refnud").replace("merchant_response", "merchant_reply")
    path = tmp_path / "douyin.toml"
    path.write_text(text.replace(change, broken, 1), encoding="utf-8")
    with pytest.raises(MappingError, match=complaint):
        load_mapping(path)


def test_a_message_of_several_events_gives_its_deadline_to_the_step_it_ends_in() -> None:
    end = datetime(2026, 11, 29, 10, 0, tzinfo=CHINA_TZ)
    unpacked = kuaishou(kuaishou_body("kwaishop_aftersales_updateRefund", "ev9",
                                      kuaishou_info(502, status=50, handling_way=1,
                                                    end_time=end)))
    assert isinstance(unpacked, platforms.Unpacked)
    received, approved = events_of(map_message(MAPPINGS["kuaishou"], unpacked.messages[0], NOW))
    assert (received["type"], approved["type"]) == ("merchant.received", "merchant.approved")
    assert "due_at" not in received and approved["due_at"] == "2026-11-29T10:00:00+08:00"
    assert approved["event_id"] == "kuaishou-ev9-2"


def test_a_message_without_its_own_time_field_takes_update_time_deterministically() -> None:
    data = douyin_data(4, status=7, type_=0)
    data["update_time"] = "2026-11-22T09:45:00+08:00"
    body = douyin_body(douyin_message("202", "t1", data))
    unpacked = platforms.douyin_unpack(body, MAPPINGS["douyin"], 100)
    assert isinstance(unpacked, platforms.Unpacked)
    first, retry = (map_message(MAPPINGS["douyin"], unpacked.messages[0], at)
                    for at in (NOW, NOW + timedelta(minutes=5)))
    assert events_of(first)[0]["occurred_at"] == "2026-11-22T09:45:00+08:00"
    assert events_of(first) == events_of(retry)  # a retry is the same event, not a conflict
    del data["update_time"]  # no time at all: when the gateway received it
    [timeless] = douyin(douyin_message("202", "t3", data))
    assert events_of(timeless)[0]["occurred_at"] == "2026-11-22T10:00:00+08:00"
    local = douyin_data(5, status=7, type_=0, update_time="2026-11-22 09:45:00")
    assert events_of(douyin(douyin_message("202", "t2", local))[0])[0][
        "occurred_at"] == "2026-11-22T09:45:00+08:00"
