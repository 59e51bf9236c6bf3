"""Inbound event validation: what is accepted, and each reason a message is rejected."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
        (json.dumps(event(shop_id="S\u0000")).encode(), RejectReason.invalid_text, "U+0000"),
        (b"{" + b'"a":' * 0 + b'"x": "' + b"y" * LIMIT + b'"}', RejectReason.oversized, "limit"),
        (b"[" * 100_000 + b"]" * 100_000, RejectReason.oversized, "limit"),
        (b"[" * 30_000 + b"]" * 30_000, RejectReason.too_deep, "levels deep"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(raw: bytes, reason: RejectReason,
                                             detail_part: str) -> None:
    result = parse_event(raw, LIMIT)
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

    from aftersales_cli.schemadoc import write_schemas

    fresh = {p.name: p.read_text() for p in write_schemas(tmp_path)}
    shipped_dir = Path(__file__).resolve().parents[2] / "schemas" / "v1"
    shipped = {p.name: p.read_text() for p in shipped_dir.glob("*.json")}
    assert shipped == fresh


NOW = datetime(2026, 11, 22, 2, 30, tzinfo=UTC)


def nested(depth: int) -> dict:
    inner: dict = {}
    for _ in range(depth):
        inner = {"x": inner}
    return inner


@pytest.mark.parametrize(
    ("doc", "reason", "detail_part"),
    [
        # Deep nesting: refused from the raw bytes, before json/pydantic recurse.
        (event(data={"kind": "exchange", "amount_fen": 1, "extra": nested(300)}),
         RejectReason.too_deep, "levels deep"),
        (event(trace=[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]), RejectReason.too_deep, "16"),
        # Integers beyond 64 bits and numbers beyond a double, anywhere.
        (event(data={"kind": "exchange", "amount_fen": 2**63}), RejectReason.out_of_range,
         "data.amount_fen"),
        (event(extra={"n": -(2**63) - 1}), RejectReason.out_of_range, "extra.n"),
        # Lax types: no coercion.
        (event(data={"kind": "exchange", "amount_fen": "100"}), RejectReason.schema,
         "valid integer"),
        (event(data={"kind": "exchange", "amount_fen": True}), RejectReason.schema,
         "valid integer"),
        (event(data={"kind": "exchange", "amount_fen": 100.0}), RejectReason.schema,
         "valid integer"),
        (event(type="merchant.inspected", data={"passed": 1}), RejectReason.schema,
         "valid boolean"),
        (event(type="merchant.inspected", data={"passed": "true"}), RejectReason.schema,
         "valid boolean"),
        (event(shop_id=1001), RejectReason.schema, "shop_id"),
        (event(schema_version=True), RejectReason.schema, "schema_version"),
        (event(occurred_at=1763776800), RejectReason.schema, "RFC 3339"),
        (event(occurred_at="1763776800"), RejectReason.schema, "RFC 3339"),
        (event(occurred_at="2026-11-22"), RejectReason.schema, "RFC 3339"),
        (event(occurred_at="2026-11-22T10:00:00+25:00"), RejectReason.schema, "date-time"),
        # Found by the fuzz test: Python takes +20:00, PostgreSQL does not.
        (event(occurred_at="2026-11-22T10:00:00+20:00"), RejectReason.schema, "14:00"),
        # Ids, keys, contacts: no control or format characters.
        (event(case_id="AS\u200b1"), RejectReason.schema, "U+200B"),
        (event(order_id="O\u202e1"), RejectReason.schema, "U+202E"),
        (event(event_id="e\n1"), RejectReason.schema, "U+000A"),
        (event(extra={"k\u0007": 1}), RejectReason.invalid_text, "key"),
        (event(data={"kind": "exchange", "amount_fen": 1,
                     "buyer": {"email": "a\u200d@example.com"}}), RejectReason.schema,
         "email"),
        # Implausible times, judged against when intake received the event.
        (event(occurred_at="1970-01-01T00:00:00Z"), RejectReason.implausible_time,
         "before intake received it"),
        (event(occurred_at="2026-11-22T11:00:00+08:00"), RejectReason.implausible_time,
         "after intake received it"),
        (event(type="deadline.changed", data={}, due_at="2999-01-01T00:00:00Z"),
         RejectReason.implausible_time, "due_at"),
    ],
)
def test_strict_input_classes_are_rejected_with_their_reason(
        doc: dict, reason: RejectReason, detail_part: str) -> None:
    result = parse_event(json.dumps(doc).encode(), LIMIT, now=NOW)
    assert isinstance(result, Rejection), result
    assert result.reason is reason, result
    assert detail_part in result.detail


@pytest.mark.parametrize("raw", [
    # A JavaScript producer cutting an emoji in half: a lone surrogate escape.
    b'{"event_id": "e1", "type": "case.opened", "reason": "\\ud83d"}',
    b'{"event_id": "e1\\udc00", "type": "case.opened"}',
    b'{"event_id": "e1", "\\ud800": 1}',
])
def test_lone_surrogates_are_rejected(raw: bytes) -> None:
    result = parse_event(raw, LIMIT)
    assert isinstance(result, Rejection) and result.reason is RejectReason.invalid_text
    assert "lone surrogate" in result.detail


def test_a_valid_event_in_the_window_is_accepted_and_storable_again() -> None:
    doc = event(occurred_at="2026-11-22T10:29:59.123456789+08:00",
                data={"kind": "exchange", "amount_fen": 10**12, "extra": nested(10),
                      "emoji": "😀", "big": 2**63 - 1})
    result = parse_event(json.dumps(doc).encode(), LIMIT, now=NOW)
    assert isinstance(result, Accepted), result
    again = parse_event(json.dumps(result.body).encode(), LIMIT)
    assert isinstance(again, Accepted) and again.body == result.body
    assert again.content_hash == result.content_hash


def test_the_same_event_spelled_differently_has_the_same_content_hash() -> None:
    a = parse_event(json.dumps(event()).encode(), LIMIT)
    b = parse_event(json.dumps(dict(reversed(list(event().items()))), indent=2).encode(),
                    LIMIT)
    c = parse_event(json.dumps(event(data={"kind": "exchange", "amount_fen": 12346,
                                           "buyer": {"phone": "13812345678"}})).encode(),
                    LIMIT)
    assert isinstance(a, Accepted) and isinstance(b, Accepted) and isinstance(c, Accepted)
    assert a.content_hash == b.content_hash != c.content_hash


def test_the_depth_scan_ignores_brackets_inside_strings() -> None:
    from shared.schemas.events import nesting_depth

    assert nesting_depth(b'{"a": "[[[[{{{{\\"[[[[", "b": [1, {"c": []}]}', 99) == 4
    assert nesting_depth(b"[" * 50, 10) == 11  # stops counting past the limit


def test_brackets_inside_strings_count_toward_no_depth() -> None:
    # More opening brackets than the depth limit, all but two of them inside a string:
    # the quick count cannot clear it, the scan does, and the event is accepted.
    doc = event(data={"kind": "exchange", "amount_fen": 1, "reason": "[[{{" * 10})
    assert isinstance(parse_event(json.dumps(doc).encode(), LIMIT), Accepted)
    deep = event(trace=[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]])  # 16 levels with the envelope
    assert isinstance(parse_event(json.dumps(deep).encode(), LIMIT), Accepted)


def _value_problem_in_full(value: object, path: str) -> object:
    """The value checks done the long way: every key and every leaf checked in full, with
    its path, and none of `_value_problem`'s quick checks (`_plainly_storable`): this
    walks containers and checks scalars itself."""
    from shared.schemas.events import INT64_MAX, INT64_MIN, _key_problem, _text_problem

    if isinstance(value, dict):
        for key, item in value.items():
            name = key[:40] if key[:40].isprintable() else repr(key[:40])
            where = f"{path}.{name}" if path else name
            problem = _key_problem(key, where) or _value_problem_in_full(item, where)
            if problem:
                return problem
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = _value_problem_in_full(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    if isinstance(value, str):
        return _text_problem(value, path)
    if isinstance(value, int) and not isinstance(value, bool) \
            and not INT64_MIN <= value <= INT64_MAX:
        return RejectReason.out_of_range, f"{path}: integer outside the signed 64-bit range"
    if isinstance(value, float) and not math.isfinite(value):
        return RejectReason.out_of_range, f"{path}: number too large for a double"
    return None


# Text with what the checks look for: U+0000, a lone surrogate, a zero-width space, a
# bidirectional mark, a line separator, a tab, Chinese, an emoji.
_TRICKY_TEXT = st.text(alphabet=st.sampled_from(
    ["a", "Z", "1", " ", "\x00", "\ud800", "\u200b", "\u202e", "\u2028", "\t", "退", "🙂"]),
    max_size=6)
_SCALARS = (st.none() | st.booleans() | _TRICKY_TEXT
            | st.integers(min_value=-(2**65), max_value=2**65)
            | st.floats(allow_nan=True, allow_infinity=True))
_DOCUMENTS = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(_TRICKY_TEXT, inner, max_size=4), max_leaves=20)


@given(_DOCUMENTS)
@settings(max_examples=400, deadline=None)
def test_the_quick_value_checks_agree_with_the_full_ones(doc: object) -> None:
    from shared.schemas.events import _value_problem

    assert _value_problem(doc, "") == _value_problem_in_full(doc, "")
