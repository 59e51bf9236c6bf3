"""Who gets what, dedup keys, and the zh-CN texts."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from notifier_stubs import StubNotice

from shared.notifications.policy import (
    CHANNELS,
    NotificationPolicy,
    NotificationRequest,
    OpsContacts,
    PolicyError,
    dedup_key,
    local_time,
    yuan,
)

REASONS_REQUIRED = {
    "case.opened",
    "merchant.rejected",
    "reminder.due_soon",
    "decision.auto_approved",
    "decision.auto_closed",
    "decision.auto_refunded",
    "decision.auto_confirmed",
    "decision.escalated",
    "case.closed",
    "intervention.requested",
    "sla.breached",
}


def who(reqs: list[NotificationRequest]) -> set[tuple[str, str, str]]:
    return {(r.party, r.channel, r.recipient) for r in reqs}


def test_policy_covers_every_reason_the_engine_emits(policy: NotificationPolicy) -> None:
    assert REASONS_REQUIRED <= policy.reasons


def test_auto_approved_tells_merchant_and_buyer_on_both_channels(policy, contacts, ops) -> None:
    reqs = policy.expand(
        StubNotice("decision.auto_approved", params={"refund_fen": 1234}), contacts, ops
    )
    assert who(reqs) == {
        ("merchant", "sms", "13987654321"),
        ("merchant", "email", "shop@example.com"),
        ("buyer", "sms", "13812345678"),
        ("buyer", "email", "buyer@example.com"),
    }
    assert {r.template for r in reqs} == {"auto_approved.merchant", "auto_approved.buyer"}
    assert all(r.case_id == "AS20261122001" and not r.urgent for r in reqs)


def test_concerned_party_is_the_notice_party(policy, contacts, ops) -> None:
    to_merchant = policy.expand(StubNotice("reminder.due_soon", party="merchant"), contacts, ops)
    to_buyer = policy.expand(
        StubNotice("reminder.due_soon", party="buyer", step="buyer_ship_back"), contacts, ops
    )
    assert {r.party for r in to_merchant} == {"merchant"}
    assert {r.template for r in to_merchant} == {"reminder_due_soon.merchant"}
    assert {r.party for r in to_buyer} == {"buyer"}
    # the domain's "platform" party is watched by ops
    to_platform = policy.expand(StubNotice("reminder.due_soon", party="platform"), contacts, ops)
    assert who(to_platform) == {
        ("ops", "sms", "13700000001"),
        ("ops", "email", "ops1@example.com"),
        ("ops", "email", "ops2@example.com"),
    }
    assert policy.expand(StubNotice("reminder.due_soon", party=None), contacts, ops) == []


def test_ops_come_from_settings_and_escalation_is_urgent(policy, contacts, ops) -> None:
    reqs = policy.expand(StubNotice("decision.escalated", urgent=False), contacts, ops)
    ops_reqs = [r for r in reqs if r.party == "ops"]
    assert {r.recipient for r in ops_reqs} == {"ops1@example.com", "ops2@example.com",
                                                "13700000001"}
    assert all(r.urgent for r in ops_reqs)  # the policy forces it: ops are paged at night
    assert all(not r.urgent for r in reqs if r.party == "merchant")  # as the notice says


def test_missing_address_skips_that_channel_only(policy, ops) -> None:
    reqs = policy.expand(
        StubNotice("decision.auto_approved"), {"buyer": {"phone": "13812345678"}}, ops
    )
    assert who(reqs) == {("buyer", "sms", "13812345678")}
    assert policy.expand(StubNotice("decision.auto_approved"), None, None) == []


def test_unknown_reason_gives_nothing(policy, contacts, ops) -> None:
    assert policy.expand(StubNotice("something.new"), contacts, ops) == []


def test_dict_notices_are_accepted(policy, contacts, ops) -> None:
    as_obj = policy.expand(StubNotice("merchant.rejected", party="buyer"), contacts, ops)
    as_dict = policy.expand(
        {
            "reason": "merchant.rejected",
            "case_id": "AS20261122001",
            "step": "merchant_response",
            "party": "buyer",
            "due_at": "2026-11-24T10:00:00+08:00",
            "urgent": False,
            "params": {},
        },
        contacts,
        ops,
    )
    assert [r.dedup_key for r in as_obj] == [r.dedup_key for r in as_dict]


# ---- dedup keys ------------------------------------------------------------------------


def test_dedup_keys_are_stable_across_runs(policy, contacts, ops) -> None:
    n = StubNotice("decision.auto_approved", params={"refund_fen": 1})
    a = [r.dedup_key for r in policy.expand(n, contacts, ops)]
    b = [r.dedup_key for r in policy.expand(n, contacts, ops)]
    assert a == b
    # a fixed value: the key must not change between releases (it is a unique DB key)
    assert dedup_key("AS1", "decision.auto_approved", None, "13812345678", "sms") == (
        dedup_key("AS1", "decision.auto_approved", "", "+86 138-1234-5678", "sms")
    )
    assert len(dedup_key("AS1", "r", None, "a@b.c", "email")) == 32


def test_dedup_keys_distinct_per_recipient_channel_and_deadline(policy, contacts, ops) -> None:
    n = StubNotice("decision.auto_approved")
    keys = [r.dedup_key for r in policy.expand(n, contacts, ops)]
    assert len(keys) == len(set(keys)) == 4
    assert n.due_at is not None
    later = replace(n, due_at=n.due_at + timedelta(hours=1))
    keys_later = {r.dedup_key for r in policy.expand(later, contacts, ops)}
    assert not keys_later & set(keys)
    other_case = replace(n, case_id="AS2")
    assert not {r.dedup_key for r in policy.expand(other_case, contacts, ops)} & set(keys)
    other_reason = replace(n, reason="decision.auto_refunded")
    assert not {r.dedup_key for r in policy.expand(other_reason, contacts, ops)} & set(keys)


def test_dedup_key_ignores_how_the_instant_is_written() -> None:
    utc = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    cst = utc.astimezone(timezone(timedelta(hours=8)))
    assert dedup_key("A", "r", utc, "x@y.cn", "email") == dedup_key("A", "r", cst, "x@y.cn",
                                                                        "email")
    assert dedup_key("A", "r", utc, "X@Y.cn", "email") == dedup_key("A", "r", utc.isoformat(),
                                                                        "x@y.cn", "email")


def test_the_same_person_reached_twice_gets_one_message(policy, ops) -> None:
    # merchant and buyer share an address (a tiny shop testing its own store)
    same = {"buyer": {"email": "me@example.com"}, "merchant": {"email": "me@example.com"}}
    reqs = policy.expand(StubNotice("decision.auto_approved"), same, ops)
    assert len([r for r in reqs if r.channel == "email"]) == 1


# ---- requests round-trip through the database row --------------------------------------


def test_request_is_json_safe_and_round_trips(policy, contacts, ops) -> None:
    n = StubNotice("repair.scheduled", party="buyer",
                   params={"visit_at": datetime(2026, 11, 25, 6, 30, tzinfo=UTC)})
    (req, *_) = policy.expand(n, contacts, ops)
    d = json.loads(json.dumps(req.to_dict()))
    assert NotificationRequest.from_dict(d) == req

    class Row:  # what the lead's NotificationRow exposes
        dedup_key = req.dedup_key
        case_id = req.case_id
        reason = req.reason
        party = req.party
        channel = req.channel
        recipient = req.recipient
        template = req.template
        params = json.loads(json.dumps(dict(req.params)))
        urgent = req.urgent

    again = NotificationRequest.from_row(Row())
    assert policy.render(again) == policy.render(req)
    assert again.step == req.step and again.due_at == req.due_at and again.tz == req.tz


# ---- rendering ---------------------------------------------------------------------------


# what the engine puts on the notice of a refund-only auto-approval
AUTO_APPROVED_REFUND = {"refund_fen": 1234, "kind": "refund_only", "action": "auto_approve",
                        "missed_step": "merchant_response", "missed_party": "merchant",
                        "next_step": "refund_pending", "next_party": "platform",
                        "next_due_at": "2026-12-03T02:00:00+00:00"}


def test_buyer_sms_for_auto_approval_reads_right(policy, contacts, ops) -> None:
    reqs = policy.expand(
        StubNotice("decision.auto_approved", params=AUTO_APPROVED_REFUND), contacts, ops
    )
    sms = next(r for r in reqs if r.party == "buyer" and r.channel == "sms")
    m = policy.render(sms)
    assert m.body == ("您的售后单AS20261122001（仅退款）：商家未在11月24日 10:00前处理售后申请，"
                      "系统已自动同意退款申请，退款¥12.34。"
                      "下一步：平台需在12月3日 10:00前完成退款。")
    # Tencent's positional order
    assert list(m.template_param) == ["case_id", "kind", "why", "what", "next"]


def test_auto_approving_an_exchange_is_not_a_refund(policy, contacts, ops) -> None:
    params = {**AUTO_APPROVED_REFUND, "kind": "exchange", "next_step": "buyer_return_shipping",
              "next_party": "buyer"}
    reqs = policy.expand(StubNotice("decision.auto_approved", params=params), contacts, ops)
    for req in reqs:
        text = "".join(policy.render(req).body.split())
        assert "退款" not in text and "自动同意换货申请" in text
        assert "买家需在12月3日10:00前寄回商品并填写运单号" in text


def test_buyer_email_for_auto_approval(policy, contacts, ops) -> None:
    reqs = policy.expand(
        StubNotice("decision.auto_approved", params=AUTO_APPROVED_REFUND), contacts, ops
    )
    mail = next(r for r in reqs if r.party == "buyer" and r.channel == "email")
    m = policy.render(mail)
    assert m.subject == "您的售后单 AS20261122001 已由系统自动处理"
    assert "商家未在 11月24日 10:00 前处理售后申请，系统已自动同意退款申请，退款 ¥12.34。" in m.body
    assert "请勿直接回复" in m.body


def test_reminder_shows_local_deadline_step_and_action(policy, contacts, ops) -> None:
    n = StubNotice("reminder.due_soon", params={"action_on_timeout": "auto_approve",
                                                "kind": "exchange"})
    sms = next(r for r in policy.expand(n, contacts, ops) if r.channel == "sms")
    m = policy.render(sms)
    # 02:00 UTC is 10:00 in Shanghai
    assert m.body == ("售后单AS20261122001（换货）需在11月24日 10:00前处理售后申请，"
                      "逾期系统将自动同意换货申请，请尽快处理。")


def test_local_times_follow_the_recipient_zone(policy, ops) -> None:
    contacts = {"buyer": {"email": "b@example.com", "tz": "Europe/Berlin"}}
    n = StubNotice("merchant.rejected", party="buyer")
    (req,) = policy.expand(n, contacts, ops)
    assert req.tz == "Europe/Berlin"
    assert "11月24日 03:00" in policy.render(req).body


@pytest.mark.parametrize("fen,text", [(1234, "12.34"), (5, "0.05"), (100, "1.00"),
                                      (0, "0.00"), (-250, "-2.50"), (None, "—")])
def test_yuan_filter(fen: int | None, text: str) -> None:
    assert yuan(fen) == text


def test_local_time_filter() -> None:
    assert local_time("2026-11-24T02:00:00Z") == "11月24日 10:00"
    assert local_time(None) == "—"
    with pytest.raises(PolicyError):
        local_time("2026-11-24T02:00:00")  # naive: refuse to guess a zone


def _every_request(policy: NotificationPolicy, params: dict) -> list[NotificationRequest]:
    contacts = {p: {"phone": "13812345678", "email": f"{p}@example.com"}
                for p in ("buyer", "merchant")}
    ops = OpsContacts(("ops@example.com",), ("13700000001",))
    out = []
    for reason in sorted(policy.reasons):
        for party in ("merchant", "buyer", "platform"):
            out += policy.expand(StubNotice(reason, party=party, params=params), contacts, ops)
    return out


@pytest.mark.parametrize(
    "params",
    [
        {},  # a bare notice must still render: templates guard optional parameters
        {"refund_fen": 1234, "amount_fen": 5000, "kind": "exchange", "reason": "尺码不合适",
         "action": "auto_close", "carrier": "顺丰", "tracking_no": "SF123",
         "visit_at": "2026-11-25T06:30:00Z", "resolution": "refunded", "outcome": "refunded",
         "reject_reason": "商品已使用", "party_to_act": "merchant"},
    ],
)
def test_every_template_renders(policy: NotificationPolicy, params: dict) -> None:
    reqs = _every_request(policy, params)
    assert {r.channel for r in reqs} == set(CHANNELS)
    for r in reqs:
        m = policy.render(r)
        if r.channel == "email":
            assert m.subject and "\n" not in m.subject, r.template
            assert "AS20261122001" in m.subject + m.body, r.template
            assert "{{" not in m.body and "None" not in m.body, r.template
        else:
            assert m.template_param, r.template
            assert "${" not in m.body and "None" not in m.body, r.template
            assert all(v for v in m.template_param.values()), r.template


def test_missing_template_parameter_is_a_policy_error(policy, contacts, ops) -> None:
    (req, *_) = policy.expand(StubNotice("case.opened"), contacts, ops)
    broken = replace(req, template="no_such_template")
    with pytest.raises(PolicyError):
        policy.render(broken)


def test_policy_refuses_rules_without_templates(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(
        '[[reasons."x.y"]]\nparty = "buyer"\nchannels = ["email"]\ntemplate = "nope"\n',
        encoding="utf-8",
    )
    with pytest.raises(PolicyError, match="nope"):
        NotificationPolicy.load(tmp_path)  # templates fall back to the shipped ones


def test_sms_codes_come_from_a_settings_file(tmp_path: Path) -> None:
    shipped = NotificationPolicy.load()
    assert "auto_approved.buyer" in shipped.missing_sms_codes("aliyun")
    codes = tmp_path / "codes.toml"
    codes.write_text('["auto_approved.buyer"]\naliyun = "SMS_465912345"\n', encoding="utf-8")
    p = NotificationPolicy.load(sms_codes=codes)
    assert p.sms_template("auto_approved.buyer").codes["aliyun"] == "SMS_465912345"
    assert "auto_approved.buyer" not in p.missing_sms_codes("aliyun")
    codes.write_text('["typo.buyer"]\naliyun = "SMS_1"\n', encoding="utf-8")
    with pytest.raises(PolicyError, match="typo"):
        NotificationPolicy.load(sms_codes=codes)
