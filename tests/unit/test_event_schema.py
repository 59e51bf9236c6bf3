"""Inbound event validation: what is accepted, and each reason a message is rejected."""

from __future__ import annotations

import json

import pytest

from shared.schemas.events import Accepted, Rejection, RejectReason, parse_event

LIMIT = 64 * 1024


def event(**overrides: object) -> dict:
    doc = {
        "event_id": "ev-1",
        "type": "case.opened",
        "occurred_at": "2026-11-22T10:00:00+08:00",
        "platform": "kuaishou",
        "shop_id": "S1001",
        "order_id": "O20261122001",
        "case_id": "AS20261122001",
        "data": {"kind": "exchange", "amount_fen": 12345,
                 "buyer": {"phone": "13812345678", "email": "b@example.com"}},
    }
    doc.update(overrides)
    return doc


def parse(doc: object) -> Accepted | Rejection:
    return parse_event(json.dumps(doc, ensure_ascii=False).encode(), LIMIT)


def test_a_valid_case_opened_is_accepted_with_its_data_normalised() -> None:
    result = parse(event())
    assert isinstance(result, Accepted)
    assert result.event.occurred_at.utcoffset().total_seconds() == 8 * 3600
    assert result.data["kind"] == "exchange"
    assert result.data["evidence"] == []
    assert result.body["data"]["amount_fen"] == 12345


def test_unknown_fields_are_kept_not_refused() -> None:
    result = parse(event(trace_id="t-1", data={"kind": "repair", "amount_fen": 1, "new": 2}))
    assert isinstance(result, Accepted)
    assert result.body["trace_id"] == "t-1"
    assert result.data["new"] == 2


@pytest.mark.parametrize(
    ("raw", "reason", "detail_part"),
    [
        (b"\xff\xfe{}", RejectReason.not_utf8, "UTF-8"),
        (b"{not json", RejectReason.invalid_json, "not JSON"),
        (b'{"a": NaN}', RejectReason.invalid_json, "NaN"),
        (b"[1, 2]", RejectReason.schema, "JSON object"),
        (json.dumps(event(type="case.exploded")).encode(), RejectReason.unknown_type,
         "case.exploded"),
        (json.dumps({k: v for k, v in event().items() if k != "case_id"}).encode(),
         RejectReason.schema, "case_id"),
        (json.dumps(event(occurred_at="2026-11-22T10:00:00")).encode(), RejectReason.schema,
         "occurred_at"),
        (json.dumps(event(data={"kind": "exchange"})).encode(), RejectReason.schema,
         "data.amount_fen"),
        (json.dumps(event(data={"kind": "teleport", "amount_fen": 1})).encode(),
         RejectReason.schema, "data.kind"),
        (json.dumps(event(data={"kind": "exchange", "amount_fen": -5})).encode(),
         RejectReason.schema, "amount_fen"),
        (json.dumps(event(type="deadline.changed", data={})).encode(), RejectReason.schema,
         "due_at"),
        (json.dumps(event(type="merchant.rejected", data={})).encode(), RejectReason.schema,
         "data.reason"),
        (json.dumps(event(shop_id="S\u0000")).encode(), RejectReason.schema, "U+0000"),
        (b"{" + b'"a":' * 0 + b'"x": "' + b"y" * LIMIT + b'"}', RejectReason.oversized, "limit"),
        (b"[" * 100_000 + b"]" * 100_000, RejectReason.invalid_json, "not JSON"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(raw: bytes, reason: RejectReason,
                                             detail_part: str) -> None:
    result = parse_event(raw, LIMIT * 4 if reason is RejectReason.invalid_json else LIMIT)
    assert isinstance(result, Rejection), result
    assert result.reason is reason
    assert detail_part in result.detail


def test_voucher_used_more_than_bought_is_refused() -> None:
    result = parse(event(data={"kind": "voucher_refund", "amount_fen": 300,
                               "voucher_total_count": 3, "voucher_used_count": 4}))
    assert isinstance(result, Rejection)
    assert "voucher_used_count" in result.detail


def test_published_json_schemas_match_the_code(tmp_path) -> None:
    """schemas/v1 is what integrators read: regenerate with `aftersales schemas`."""
    from pathlib import Path

    from services.schemadoc import write_schemas

    fresh = {p.name: p.read_text() for p in write_schemas(tmp_path)}
    shipped_dir = Path(__file__).resolve().parents[2] / "schemas" / "v1"
    shipped = {p.name: p.read_text() for p in shipped_dir.glob("*.json")}
    assert shipped == fresh
