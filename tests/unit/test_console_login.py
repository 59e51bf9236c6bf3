"""The console's login and form protection, through its ASGI app (no server, no database:
the pages used here read nothing)."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from services.console.app import ConsoleConfig, build_app
from services.console.main import config_from, is_loopback
from shared.config import ConsoleSettings, Settings
from shared.errors import ConfigError


def app(user: str | None = None, password: str | None = None) -> TestClient:
    config = ConsoleConfig(db=None, engine=None, amqp_url="amqp://x", user=user,  # type: ignore[arg-type]
                           password=password)
    return TestClient(build_app(config))


def test_beyond_loopback_the_console_does_not_start_without_a_login() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    with pytest.raises(ConfigError, match="AFTERSALES_CONSOLE_USER"):
        config_from(Settings(console=ConsoleSettings(host="0.0.0.0")))


def test_with_a_login_every_page_asks_for_it() -> None:
    client = app("ops", "s3cret")
    assert client.get("/cases").status_code == 401
    assert client.get("/cases").headers["www-authenticate"].startswith("Basic")
    assert client.get("/cases", auth=("ops", "wrong")).status_code == 401
    assert client.get("/cases", auth=("nobody", "s3cret")).status_code == 401
    page = client.get("/cases", auth=("ops", "s3cret"))
    assert page.status_code == 200 and ">ops<" in page.text  # shown as the one acting
    assert client.get("/healthz").status_code == 200  # for probes


def test_a_form_without_the_console_token_changes_nothing() -> None:
    client = app()
    refused = client.post("/held/rejected/replay", data={"all": "1", "confirm": "yes"})
    assert refused.status_code == 403
    refused = client.post("/cases/AS-1/action", data={"action": "pause", "reason": "x"})
    assert refused.status_code == 403
