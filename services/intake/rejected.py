"""The copy of a rejected message: its body unchanged, its headers only where they are safe.

Headers are data, not routing. `CC` and `BCC` would make RabbitMQ route the copy to the
queues they name; RabbitMQ's own routing and dead-letter headers (`x-death`,
`x-first-death-*`, ...) describe the original's path, not the copy's. Values pika can
decode but cannot encode again (a Java producer's `double` or `float`, decimals whose
exponent does not fit, unsigned 64-bit integers, ...) are turned into their text, so no
header can make publishing the copy fail and wedge the consumer on redelivery.
"""

from __future__ import annotations

import decimal
import struct
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pika
from pika import data as amqp_data

from shared.schemas.events import Rejection

# Compared in lower case: RabbitMQ reads `CC`/`BCC` exactly, but a copy must not be one
# spelling away from being routed.
ROUTING_HEADERS = frozenset({"cc", "bcc"})
_BROKER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count",
                    "x-reject-", "x-original-", "x-rejected-at", "x-dropped-headers")
MAX_HEADERS = 64
MAX_KEY_BYTES = 128  # AMQP field names are short strings (255 bytes at most)
MAX_VALUE_CHARS = 1000
MAX_NESTING = 4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


_pika_decode_value = amqp_data.decode_value
# pika decodes nested tables recursively: a header nested some hundreds of levels deep
# raised RecursionError inside the connection (dropped, redelivered, forever).
MAX_DECODE_NESTING = 16
_decoding = threading.local()


def _decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika 1.x decodes AMQP `double` and `float` field values into integers (0.5 becomes
    0; 1e300 becomes an integer that no longer fits the 64 bits it must be encoded in
    again): decode them as floats. A `timestamp` beyond what a datetime holds, or tables
    nested too deep, made pika's decoder raise inside the connection: the connection
    dropped, the message came back, forever. Keep such a timestamp as its number, and
    tables deeper than MAX_DECODE_NESTING as a placeholder. Everything else as pika does."""
    kind = encoded[offset:offset + 1]
    if kind == b"d":
        return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
    if kind == b"f":
        return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
    if kind in (b"F", b"A"):  # a table or an array: length-prefixed, so it can be skipped
        if getattr(_decoding, "depth", 0) >= MAX_DECODE_NESTING:
            length = struct.unpack_from(">I", encoded, offset + 1)[0]
            return "(nested too deep)", offset + 5 + length
        _decoding.depth = getattr(_decoding, "depth", 0) + 1
        try:
            return _pika_decode_value(encoded, offset)
        finally:
            _decoding.depth -= 1
    if kind == b"T":
        seconds = struct.unpack_from(">Q", encoded, offset + 1)[0]
        try:
            return datetime.fromtimestamp(seconds, UTC), offset + 9
        except (OverflowError, OSError, ValueError):
            return seconds, offset + 9
    return _pika_decode_value(encoded, offset)


def decode_floats_as_floats() -> None:
    """Install the fix above for this process (idempotent)."""
    amqp_data.decode_value = _decode_value


def safe_headers(headers: Mapping[Any, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The headers a rejected copy may carry, and the names of those left out."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in (headers or {}).items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        lowered = name.lower()
        if (lowered in ROUTING_HEADERS or lowered.startswith(_BROKER_PREFIXES)
                or len(name.encode("utf-8", "replace")) > MAX_KEY_BYTES
                or len(kept) >= MAX_HEADERS):
            dropped.append(name[:64])
            continue
        converted = _encodable(value, 0)
        if converted is _DROP or not _encodes(converted):
            dropped.append(name[:64])
            continue
        kept[name] = converted
    return kept, dropped


class _Drop:
    pass


_DROP = _Drop()


def _encodable(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, (float, decimal.Decimal)):
        return str(value)  # pika cannot encode a float; a decimal's exponent may not fit
    if isinstance(value, str):
        return value[:MAX_VALUE_CHARS].encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, bytes):
        return value[:MAX_VALUE_CHARS]
    if isinstance(value, datetime):
        return value if 0 <= value.timestamp() < 2**63 else str(value)
    if depth >= MAX_NESTING:
        return _DROP
    if isinstance(value, Mapping):
        return _nested_table(value, depth)
    if isinstance(value, (list, tuple)):
        items = [_encodable(v, depth + 1) for v in value[:MAX_HEADERS]]
        return [v for v in items if v is not _DROP]
    return str(value)[:MAX_VALUE_CHARS]


def _nested_table(value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for key, item in list(value.items())[:MAX_HEADERS]:
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if len(name.encode("utf-8", "replace")) > MAX_KEY_BYTES:
            continue
        converted = _encodable(item, depth + 1)
        if converted is not _DROP:
            table[name] = converted
    return table


def _encodes(value: Any) -> bool:
    try:
        amqp_data.encode_table([], {"v": value})
    except Exception:  # whatever pika's encoder refuses (struct.error, AMQPError, ...)
        return False
    return True


def rejected_copy_properties(properties: pika.BasicProperties, rejection: Rejection,
                             exchange: str, routing_key: str) -> pika.BasicProperties:
    """Properties of the copy in `aftersales.events.rejected`: the reason in headers, the
    original's useful properties and safe headers."""
    headers, dropped = safe_headers(properties.headers)
    headers.update({
        "x-reject-reason": rejection.reason.value,
        "x-reject-detail": _text(rejection.detail),
        "x-original-exchange": _text(exchange),
        "x-original-routing-key": _text(routing_key),
        "x-rejected-at": int(time.time()),
    })
    if dropped:
        headers["x-dropped-headers"] = ",".join(dropped)[:MAX_VALUE_CHARS]
    return pika.BasicProperties(
        content_type=_short(properties.content_type),
        content_encoding=_short(properties.content_encoding),
        message_id=_short(properties.message_id),
        timestamp=properties.timestamp if isinstance(properties.timestamp, int)
        and 0 <= properties.timestamp < 2**63 else None,
        delivery_mode=2,
        headers=headers,
    )


def minimal_properties(rejection: Rejection, exchange: str, routing_key: str
                       ) -> pika.BasicProperties:
    """The reason alone: used if the copy with the original's headers still could not be
    published."""
    return pika.BasicProperties(delivery_mode=2, headers={
        "x-reject-reason": rejection.reason.value,
        "x-reject-detail": _text(rejection.detail),
        "x-original-exchange": _text(exchange),
        "x-original-routing-key": _text(routing_key),
        "x-rejected-at": int(time.time()),
    })


def _text(value: Any) -> str:
    return str(value)[:MAX_VALUE_CHARS].encode("utf-8", "replace").decode("utf-8")


def _short(value: Any) -> str | None:
    """A property that is an AMQP short string (255 bytes at most)."""
    if not isinstance(value, str) or len(value.encode("utf-8", "replace")) > 255:
        return None
    return value.encode("utf-8", "replace").decode("utf-8")
