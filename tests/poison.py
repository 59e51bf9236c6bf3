"""Bad inbound messages by input class, for the intake tests, the fuzz test and the fault
suite's poison flood.

Structure-aware: a valid envelope with one field mutated into an edge value of its type
(strings: empty, huge, U+0000, lone surrogates, zero-width and bidi marks, control
characters, other JSON types; integers: 64-bit edges and beyond, strings, booleans,
floats; times: epoch numbers, naive, impossible, implausibly old or far ahead), extra
fields nested too deep or carrying big integers, plus raw byte noise (random bytes,
truncated or bit-flipped JSON). Headers too: the routing headers CC/BCC and values pika
decodes but cannot encode again (a Java producer's `double`).

Every message is built around `now` (the time intake will receive it) so its expected
verdict does not depend on when the suite runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pika
from pika import data as amqp_data

from shared.amqp import EVENTS_EXCHANGE, declare_topology

KINDS = ("refund_only", "return_refund", "exchange", "repair", "onsite_repair",
         "voucher_refund")


@dataclass(frozen=True)
class Message:
    body: bytes
    headers: dict[str, Any] | None = None
    what: str = ""  # the input class, for failure messages
    event_id: str | None = None  # set for messages built around a valid envelope
    case_id: str | None = None


@dataclass
class Ids:
    """Unique ids per run, so no two generated messages share an event or a case."""

    prefix: str
    n: int = 0

    def next(self, what: str) -> str:
        # A digest suffix: a flipped bit in the counter cannot turn one id into another.
        self.n += 1
        digest = hashlib.sha1(f"{self.prefix}{self.n}".encode()).hexdigest()[:8]
        return f"{self.prefix}-{what}-{self.n}-{digest}"


def opened(ids: Ids, now: datetime, **data: Any) -> dict[str, Any]:
    """A valid case.opened for a new case of its own."""
    return {
        "event_id": ids.next("e"), "type": "case.opened",
        "occurred_at": (now - timedelta(minutes=1)).isoformat(), "platform": "kuaishou",
        "shop_id": "S1", "order_id": ids.next("o"), "case_id": ids.next("c"),
        "data": {"kind": "exchange", "amount_fen": 12900, "reason": "尺码不合适",
                 "buyer": {"phone": "13800000000"}, "merchant": {"email": "s@example.com"},
                 **data},
    }


def follow_up(first: dict[str, Any], ids: Ids, type_: str = "merchant.approved",
              **extra: Any) -> dict[str, Any]:
    return {**first, "event_id": ids.next("e"), "type": type_, "data": {}, **extra}


def nested(depth: int) -> Any:
    inner: Any = 1
    for _ in range(depth):
        inner = {"x": inner}
    return inner


def encode(doc: Any) -> bytes:
    """JSON as a careless producer writes it: lone surrogates as \\u escapes."""
    return json.dumps(doc, ensure_ascii=True).encode()


# ---- edge values per type ------------------------------------------------------------------

STRING_EDGES: list[tuple[str, Any]] = [
    ("empty", ""), ("blank", "   "), ("huge", "x" * 300), ("nul", "a\u0000b"),
    ("lone_high_surrogate", "\ud83d"), ("lone_low_surrogate", "a\ude00"),
    ("zero_width", "a\u200bb"), ("bidi_override", "\u202eabc"), ("newline", "a\nb"),
    ("bell", "a\u0007"), ("number", 123), ("bool", True), ("null", None), ("list", ["a"]),
    ("object", {"a": 1}), ("emoji", "😀"), ("cjk", "售后"),
]
INT_EDGES: list[tuple[str, Any]] = [
    ("zero", 0), ("negative", -1), ("int64_max", 2**63 - 1), ("int64_max_plus_1", 2**63),
    ("int64_min_minus_1", -(2**63) - 1), ("huge", 10**30), ("string", "100"), ("true", True),
    ("float", 100.0), ("null", None), ("list", [1]),
]
BOOL_EDGES: list[tuple[str, Any]] = [
    ("one", 1), ("string", "true"), ("null", None), ("zero", 0),
]


def time_edges(now: datetime) -> list[tuple[str, Any]]:
    return [
        ("epoch_number", int(now.timestamp())), ("epoch_string", str(int(now.timestamp()))),
        ("epoch_ms", int(now.timestamp() * 1000)), ("naive", now.replace(tzinfo=None).isoformat()),
        ("date_only", now.date().isoformat()), ("impossible", "2026-02-30T10:00:00+08:00"),
        ("offset_25h", "2026-11-22T10:00:00+25:00"), ("year_1970", "1970-01-01T00:00:00Z"),
        ("year_2999", "2999-12-31T23:59:59Z"), ("year_0", "0000-01-01T00:00:00Z"),
        ("ten_minutes_ahead", (now + timedelta(minutes=10)).isoformat()),
        ("two_years_ago", (now - timedelta(days=730)).isoformat()),
        ("a_minute_ago", (now - timedelta(minutes=1)).isoformat()),
        ("nanoseconds", (now - timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%S.123456789Z")),
        ("garbage", "yesterday"), ("null", None),
    ]


# (path in the envelope, kind of value)
FIELDS: list[tuple[tuple[str, ...], str]] = [
    (("event_id",), "str"), (("type",), "str"), (("occurred_at",), "time"),
    (("platform",), "str"), (("shop_id",), "str"), (("order_id",), "str"),
    (("case_id",), "str"), (("due_at",), "time"), (("schema_version",), "int"),
    (("data", "kind"), "str"), (("data", "amount_fen"), "int"), (("data", "reason"), "str"),
    (("data", "buyer", "phone"), "str"), (("data", "buyer", "email"), "str"),
    (("data", "voucher_total_count"), "int"), (("data", "evidence"), "str"),
    (("data", "extra"), "str"), (("data", "extra"), "int"), (("trace_id",), "str"),
]
EXTRA_EDGES: list[tuple[str, Any]] = [
    ("deep_300", nested(300)), ("deep_17", nested(17)), ("deep_10", nested(10)),
    ("big_int_list", [1, 2, 2**64]), ("nan_like", "NaN"),
]
KEY_EDGES = ["\u0000", "\ud800", "k\u0007", "k\u200b", "", "😀", "\u202ekey"]


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = doc
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def mutated(rng: random.Random, ids: Ids, now: datetime) -> Message:
    """A valid envelope with one field set to an edge value of its type."""
    doc = opened(ids, now)
    roll = rng.random()
    if roll < 0.08:
        name, value = rng.choice(EXTRA_EDGES)
        doc["data"]["extra"] = value
        what = f"data.extra={name}"
    elif roll < 0.13:
        key = rng.choice(KEY_EDGES)
        doc[rng.choice(["data", "meta"])] = {**doc["data"], key: 1}
        what = f"key={key!r}"
    else:
        path, kind = rng.choice(FIELDS)
        edges = {"str": STRING_EDGES, "int": INT_EDGES, "bool": BOOL_EDGES,
                 "time": time_edges(now)}[kind]
        name, value = rng.choice(edges)
        if path == ("event_id",) and isinstance(value, str):
            value = f"{doc['event_id']}{value}"  # keep it unique: no accidental duplicate
        if path == ("case_id",) and isinstance(value, str):
            value = f"{doc['case_id']}{value}"
        if path == ("data", "evidence"):
            value = [value]
        if path == ("due_at",):
            doc["type"] = "deadline.changed"  # due_at matters there; a new case: parked
        _set(doc, path, value)
        what = f"{'.'.join(path)}={name}"
    event_id = doc["event_id"] if isinstance(doc.get("event_id"), str) else None
    case_id = doc["case_id"] if isinstance(doc.get("case_id"), str) else None
    return Message(encode(doc), what=what, event_id=event_id, case_id=case_id)


def noise(rng: random.Random, ids: Ids, now: datetime) -> Message:
    """Raw byte noise: random bytes, truncated JSON, a flipped bit, other JSON values."""
    valid = encode(opened(ids, now))
    roll = rng.random()
    if roll < 0.3:
        return Message(rng.randbytes(rng.randrange(1, 120)), what="random_bytes")
    if roll < 0.55:
        return Message(valid[: rng.randrange(1, len(valid))], what="truncated")
    if roll < 0.8:
        flipped = bytearray(valid)
        pos = rng.randrange(len(flipped))
        flipped[pos] ^= 1 << rng.randrange(8)
        return Message(bytes(flipped), what=f"bit_flip@{pos}")
    return Message(rng.choice([b"[]", b"null", b"1e400", b'"x"', b"{}", b"[" * 5000,
                               b'{"a": Infinity}', b"\xef\xbb\xbf{}", b""]), what="other_json")


def weird_headers(rng: random.Random) -> dict[str, Any]:
    """Headers a careless or foreign producer sends."""
    choice = rng.randrange(7)
    if choice == 0:  # routing headers: a copy carrying them would be routed elsewhere
        return {"CC": ["aftersales.events.intake"], "BCC": ["aftersales.events.intake"]}
    if choice == 1:  # a Java client's double
        return {"score": 0.5, "x-retry": 3}
    if choice == 2:
        return {"nested": {"weight": 1.25, "list": [0.1, "a", 2**40]}}
    if choice == 3:
        return {"price": Decimal("12.34"), "when": datetime(2026, 11, 22, 10, 0)}
    if choice == 4:
        return {"blob": b"\xff\x00\xfe", "trace": "abc", "at": RawTimestamp(2**63 - 1)}
    if choice == 5:
        return {"deep": DeepTable(2000), "trace": "abc"}
    return {"x-death": [{"count": 1, "queue": "elsewhere"}], "cc": ["aftersales.events.intake"]}


def poison_flood(count: int, seed: int, now: datetime, prefix: str) -> list[Message]:
    """`count` bad or odd messages: mostly mutated envelopes, some byte noise, a few
    oversized, some with odd headers."""
    rng = random.Random(seed)
    ids = Ids(prefix)
    out = []
    for i in range(count):
        msg = noise(rng, ids, now) if rng.random() < 0.2 else mutated(rng, ids, now)
        if i % 97 == 0:
            msg = Message(b'{"pad": "' + b"x" * (70 * 1024) + b'"}', what="oversized")
        if rng.random() < 0.1:
            msg = Message(msg.body, weird_headers(rng), msg.what + "+headers", msg.event_id,
                          msg.case_id)
        out.append(msg)
    return out


# ---- publishing as a foreign client would ------------------------------------------------

_pika_encode_value = amqp_data.encode_value


class RawTimestamp(int):
    """An AMQP timestamp header given as its 64-bit number (any value another client may
    send, also one beyond what a datetime holds)."""


class DeepTable(int):
    """A header table nested this many levels deep ({"a": {"a": ...}})."""


def _nested_table_bytes(depth: int) -> bytes:
    inner = struct.pack(">I", 0)
    for _ in range(depth):
        entry = b"\x01aF" + inner
        inner = struct.pack(">I", len(entry)) + entry
    return b"F" + inner


def _encode_value_with_doubles(pieces: list[bytes], value: Any) -> int:
    """pika cannot encode a float header; a Java client sends it as an AMQP double."""
    if isinstance(value, float):
        pieces.append(struct.pack(">cd", b"d", value))
        return 9
    if isinstance(value, DeepTable):
        raw = _nested_table_bytes(int(value))
        pieces.append(raw)
        return len(raw)
    if isinstance(value, RawTimestamp):
        pieces.append(struct.pack(">cQ", b"T", int(value)))
        return 9
    return _pika_encode_value(pieces, value)


@contextlib.contextmanager
def doubles_allowed() -> Iterator[None]:
    amqp_data.encode_value = _encode_value_with_doubles  # type: ignore[assignment]
    try:
        yield
    finally:
        amqp_data.encode_value = _pika_encode_value


def publish_messages(amqp_url: str, messages: list[Message], routing_key: str = "poison"
                     ) -> int:
    """Publish to `aftersales.events`, persistent and confirmed, headers as given."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        declare_topology(channel)
        channel.confirm_delivery()
        with doubles_allowed():
            for msg in messages:
                channel.basic_publish(
                    EVENTS_EXCHANGE, routing_key, msg.body,
                    pika.BasicProperties(delivery_mode=2, headers=msg.headers), mandatory=True)
        return len(messages)
    finally:
        if connection.is_open:
            connection.close()


def rejected_flood(count: int, seed: int, now: datetime, prefix: str,
                   within: timedelta = timedelta(minutes=15)) -> list[Message]:
    """Messages of `poison_flood` that intake rejects whenever it receives them within
    `within` of `now` (for suites where intake may be down for a while): the verdict is
    the same at both ends of that span."""
    from shared.schemas.events import Rejection, parse_event

    def verdict(msg: Message, at: datetime) -> str | None:
        parsed = parse_event(msg.body, now=at)
        return parsed.reason.value if isinstance(parsed, Rejection) else None

    return [msg for msg in poison_flood(count, seed, now, prefix)
            if verdict(msg, now) is not None and verdict(msg, now) == verdict(msg, now + within)]
