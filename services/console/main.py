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
    password = settings.console_password.get_secret_value() if settings.console_password \
        else None
    if not is_loopback(settings.console_host) and not (settings.console_user and password):
        raise ConfigError(
            f"AFTERSALES_CONSOLE_HOST={settings.console_host} is beyond loopback: set "
            "AFTERSALES_CONSOLE_USER and AFTERSALES_CONSOLE_PASSWORD")
    return ConsoleConfig(db=build_database(settings, pool_size=4),
                         engine=build_domain(settings), amqp_url=settings.amqp_url,
                         user=settings.console_user, password=password,
                         queue_type=settings.queue_type)


def run(settings: Settings) -> int:
    setup_logging("console", settings.log_level)
    app = build_app(config_from(settings))
    log.info("console on http://%s:%s/", settings.console_host, settings.console_port)
    uvicorn.run(app, host=settings.console_host, port=settings.console_port,
                log_level="warning", access_log=False)
    return 0
