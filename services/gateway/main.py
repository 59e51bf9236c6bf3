"""Composition root of the gateway: `aftersales run gateway`."""

from __future__ import annotations

import logging

import uvicorn

from services.gateway.app import build_app
from services.gateway.forward import Forwarder
from services.gateway.mapping import MappingError, load_mappings
from shared.config import Settings
from shared.errors import ConfigError
from shared.logs import setup_logging

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    setup_logging("gateway", settings.log_level)
    gateway = settings.gateway
    try:
        mappings = load_mappings(gateway.mappings)
    except MappingError as exc:
        raise ConfigError(f"AFTERSALES_GATEWAY_MAPPINGS: {exc}") from None
    forwarder = Forwarder(settings.amqp_url, settings.queue_type)
    app = build_app(gateway, mappings, forwarder)
    enabled = gateway.enabled_platforms()
    log.info("gateway on http://%s:%d (platforms: %s)", gateway.bind,
             gateway.port, ", ".join(enabled) or "none")
    if not enabled:
        # `aftersales run all` starts the gateway too; without keys it only answers 404.
        log.warning("no platform keys set (AFTERSALES_DOUYIN_APP_KEY/_APP_SECRET, ...): "
                    "every platform endpoint answers 404 until they are")
    try:
        # One process: the gateway keeps no state, so more copies (behind the ingress) are
        # how it scales. SIGTERM lets requests in flight finish first.
        uvicorn.run(app, host=gateway.bind, port=gateway.port,
                    log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                    limit_concurrency=gateway.max_concurrency,
                    server_header=False)
    finally:
        forwarder.close()
    return 0
