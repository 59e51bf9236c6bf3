"""Composition root of the console: `aftersales run console`.

Uvicorn serves the Starlette app on `AFTERSALES_CONSOLE_HOST`:`AFTERSALES_CONSOLE_PORT`
(127.0.0.1:9110). Listening beyond loopback needs `AFTERSALES_CONSOLE_USER` and
`AFTERSALES_CONSOLE_PASSWORD` (HTTP Basic login; put TLS in front of it)."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from services.console.app import ConsoleConfig, build_app
from shared.bootstrap import build_database, build_domain
from shared.config import Settings
from shared.errors import ConfigError
from shared.logs import setup_logging

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from(settings: Settings) -> ConsoleConfig:
    console = settings.console
    password = console.password.get_secret_value() if console.password else None
    if not is_loopback(console.host) and not (console.user and password):
        raise ConfigError(
            f"AFTERSALES_CONSOLE_HOST={console.host} is beyond loopback: set "
            "AFTERSALES_CONSOLE_USER and AFTERSALES_CONSOLE_PASSWORD")
    return ConsoleConfig(db=build_database(settings, pool_size=4),
                         engine=build_domain(settings), amqp_url=settings.amqp_url,
                         user=console.user, password=password,
                         queue_type=settings.queue_type)


def run(settings: Settings) -> int:
    setup_logging("console", settings.log_level)
    app = build_app(config_from(settings))
    console = settings.console
    log.info("console on http://%s:%s/", console.host, console.port)
    uvicorn.run(app, host=console.host, port=console.port,
                log_level="warning", access_log=False)
    return 0
