"""The gateway's HTTP interface (Starlette): one endpoint per platform, health and metrics.

For every request: refuse what is too large before reading it whole, check that the
platform sent it (its documented signature), map each message (services/gateway/mapping.py),
publish everything with publisher confirms, and only then answer the platform's
success body. Anything else the platform retries; a retried message has the same event id,
so intake applies it once. The gateway keeps no state: copies scale it out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from anyio import to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from services.gateway import platforms
from services.gateway.forward import Forwarder, OutboundMessage
from services.gateway.mapping import (
    Ignored,
    Mapped,
    PlatformMapping,
    PlatformMessage,
    Unmapped,
    map_message,
)
from shared import metrics
from shared.amqp import EVENTS_EXCHANGE, REJECTED_QUEUE
from shared.config import GatewaySettings

log = logging.getLogger(__name__)

UNMAPPED = "unmapped_platform_message"
MALFORMED = "malformed_platform_message"


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Answer:
    """The platform's own words for success and failure."""

    ok: Callable[[], dict[str, Any]]
    fail: Callable[[str], dict[str, Any]]


ANSWERS: Mapping[str, Answer] = {
    # Douyin retries anything but {"code":0,"msg":"success"}.
    "douyin": Answer(lambda: {"code": 0, "msg": "success"},
                     lambda why: {"code": 1, "msg": why}),
    "kuaishou": Answer(lambda: {"result": 1}, lambda why: {"result": 0, "msg": why}),
    # TOP's pushed-request (SPI) reply.
    "taobao": Answer(lambda: {"response": {"flag": "success", "code": "0", "message": "ok"}},
                     lambda why: {"response": {"flag": "failure", "code": "1",
                                               "message": why}}),
}


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes, limit {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _count_request(platform: str, outcome: str) -> None:
    metrics.record_gateway_request(platform, outcome)


def build_app(settings: GatewaySettings, mappings: Mapping[str, PlatformMapping],
              forwarder: Forwarder,
              clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Starlette:
    enabled = set(settings.enabled_platforms())
    registry = metrics.build_registry("gateway")

    def secret(value: Any) -> str:
        return value.get_secret_value() if value is not None else ""

    def unpack(platform: str, headers: Mapping[str, str], params: Mapping[str, str],
               body: bytes) -> platforms.Unpacked | platforms.Refusal:
        mapping = mappings[platform]
        limit = settings.max_messages
        if platform == "douyin":
            refusal = platforms.douyin_verify(headers, body, settings.douyin_app_key or "",
                                              secret(settings.douyin_app_secret))
            return refusal or platforms.douyin_unpack(body, mapping, limit)
        if platform == "kuaishou":
            return platforms.kuaishou_unpack(body, secret(settings.kuaishou_msg_secret),
                                             settings.kuaishou_app_key or "", mapping)
        refusal = platforms.taobao_verify(params, body, settings.taobao_app_key or "",
                                          secret(settings.taobao_app_secret),
                                          clock().astimezone(mapping.timezone), mapping)
        return refusal or platforms.taobao_unpack(body, mapping, limit)

    def rejected(platform: str, raw: bytes, message_id: str, reason: str,
                 detail: str) -> OutboundMessage:
        headers = {"x-reject-reason": reason, "x-reject-detail": detail[:1000],
                   "x-platform": platform, "x-platform-message-id": message_id,
                   "x-original-exchange": "", "x-source": "gateway",
                   "x-rejected-at": int(time.time())}
        return ("", REJECTED_QUEUE, raw, f"{platform}-{message_id}", headers)

    def handle(platform: str, headers: Mapping[str, str], params: Mapping[str, str],
               body: bytes) -> tuple[int, dict[str, Any]]:
        """Check, map, publish: runs in a worker thread (hashing, decrypting, validating
        and the broker's round trip stay off the event loop)."""
        answer = ANSWERS[platform]
        received_at = clock()
        unpacked = unpack(platform, headers, params, body)
        if isinstance(unpacked, platforms.Refusal):
            _count_request(platform, unpacked.reason)
            log.info("%s: refused (%d %s): %s", platform, unpacked.status, unpacked.reason,
                     unpacked.detail)
            return unpacked.status, answer.fail(unpacked.detail)
        mapping = mappings[platform]
        outbound: list[OutboundMessage] = []
        verdicts: list[str] = []
        for raw, message_id, detail in unpacked.malformed:
            outbound.append(rejected(platform, raw, message_id, MALFORMED, detail))
            verdicts.append("malformed")
            log.info("%s: malformed message %s kept for ops: %s", platform, message_id, detail)
        for message in unpacked.messages:
            verdict = _map(mapping, message, received_at)
            if isinstance(verdict, Mapped):
                for event in verdict.events:
                    body_out = json.dumps(event.body, ensure_ascii=False).encode()
                    outbound.append((EVENTS_EXCHANGE, event.event.type, body_out,
                                     event.event.event_id,
                                     {"x-platform": platform,
                                      "x-platform-message-id": message.message_id}))
                verdicts.append("forwarded")
            elif isinstance(verdict, Unmapped):
                outbound.append(rejected(platform, message.raw, message.message_id, UNMAPPED,
                                         verdict.detail))
                verdicts.append("unmapped")
                log.info("%s: message %s kept for ops: %s", platform, message.message_id,
                         verdict.detail)
            else:
                verdicts.append("ignored")
        try:
            forwarder.forward(outbound)
        except Exception as exc:  # the broker is away: the platform will retry
            log.warning("%s: could not publish %d message(s): %s", platform, len(outbound),
                        exc)
            _count_request(platform, "broker_unavailable")
            return 503, answer.fail("temporarily unavailable")
        for verdict_name in verdicts:
            metrics.record_gateway_message(platform, verdict_name)
        _count_request(platform, "ok")
        return 200, answer.ok()

    async def messages(request: Request) -> Response:
        platform = request.path_params["platform"]
        if platform not in ANSWERS:
            return PlainTextResponse("unknown platform\n", status_code=404)
        answer = ANSWERS[platform]
        if platform not in enabled:
            _count_request(platform, "not_configured")
            return JSONResponse(answer.fail("platform not configured"), status_code=404)
        try:
            body = await read_body(request, settings.max_body_bytes)
        except BodyTooLarge as exc:
            _count_request(platform, "too_large")
            return JSONResponse(answer.fail(str(exc)), status_code=413)
        except ClientDisconnect:
            _count_request(platform, "bad_request")
            return Response(status_code=400)
        status, payload = await to_thread.run_sync(
            handle, platform, dict(request.headers), dict(request.query_params), body)
        return JSONResponse(payload, status_code=status)

    async def health(_request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def ready(_request: Request) -> Response:
        if await to_thread.run_sync(forwarder.ready):
            return PlainTextResponse("ready\n")
        return PlainTextResponse("broker unreachable\n", status_code=503)

    async def metrics_endpoint(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/platforms/{platform}/messages", messages, methods=["POST"]),
        Route("/healthz", health), Route("/health", health), Route("/livez", health),
        Route("/readyz", ready),
        Route("/metrics", metrics_endpoint),
    ])


def _map(mapping: PlatformMapping, message: PlatformMessage, received_at: datetime
         ) -> Mapped | Unmapped | Ignored:
    try:
        return map_message(mapping, message, received_at)
    except Exception as exc:  # a mapping bug must not cost the other messages of the batch
        log.exception("mapping %s message %s failed", mapping.platform, message.message_id)
        return Unmapped(message, f"mapping failed: {type(exc).__name__}")
