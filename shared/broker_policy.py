"""The broker policy that keeps unrouted decisions: `aftersales.decisions`' alternate exchange.

An alternate exchange given as an exchange *argument* is part of the exchange's identity:
every declaration must repeat it, so an upstream consumer declaring the exchange as the
contract documents it (durable topic, no arguments) got 406 PRECONDITION_FAILED. A policy
sets the same alternate exchange from outside the declaration, so both declarations agree.

RabbitMQ applies at most one policy to an exchange (the highest priority); ours matches only
`aftersales.decisions` and has a high priority, so a catch-all policy does not hide it.

How it gets there, whichever suits the deployment:
- the resolver applies it at start through the management HTTP API when
  `AFTERSALES_RABBITMQ_MANAGEMENT_URL` is set (docker compose, Kubernetes);
- `aftersales broker policy` applies it the same way, or with `rabbitmqctl` on the
  broker's machine (`scripts/setup.sh` does that), or prints the command;
- without it, the outbox relay still keeps decisions that come back unrouted
  (shared/publisher.py), with a smaller guarantee: see there.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from shared.amqp import DECISIONS_EXCHANGE, UNROUTED_EXCHANGE
from shared.config import split_amqp_urls

log = logging.getLogger(__name__)

POLICY_NAME = "aftersales-decisions-unrouted"
POLICY_PATTERN = "^" + DECISIONS_EXCHANGE.replace(".", r"\.") + "$"
POLICY_PRIORITY = 100
POLICY_DEFINITION: dict[str, Any] = {"alternate-exchange": UNROUTED_EXCHANGE}


def vhost_of(amqp_url: str) -> str:
    path = urlsplit(split_amqp_urls(amqp_url)[0]).path  # every node of a list: one vhost
    return unquote(path[1:]) if len(path) > 1 else "/"


def credentials_of(amqp_url: str) -> tuple[str, str]:
    parts = urlsplit(split_amqp_urls(amqp_url)[0])
    return unquote(parts.username or "guest"), unquote(parts.password or "guest")


def rabbitmqctl_args(vhost: str) -> list[str]:
    return ["set_policy", "-p", vhost, "--apply-to", "exchanges", "--priority",
            str(POLICY_PRIORITY), POLICY_NAME, POLICY_PATTERN, json.dumps(POLICY_DEFINITION)]


def apply_with_http(management_url: str, amqp_url: str, timeout: float = 10.0) -> None:
    """PUT the policy through the management HTTP API (idempotent). The URL's own
    user:password win; else the AMQP URL's are used."""
    parts = urlsplit(management_url)
    user, password = (unquote(parts.username), unquote(parts.password or "")) \
        if parts.username else credentials_of(amqp_url)
    base = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "") \
        + parts.path.rstrip("/")
    vhost = quote(vhost_of(amqp_url), safe="")
    response = httpx.put(
        f"{base}/api/policies/{vhost}/{POLICY_NAME}",
        json={"pattern": POLICY_PATTERN, "definition": POLICY_DEFINITION,
              "priority": POLICY_PRIORITY, "apply-to": "exchanges"},
        auth=(user, password), timeout=timeout)
    response.raise_for_status()


def apply_with_rabbitmqctl(amqp_url: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise FileNotFoundError("rabbitmqctl is not on this machine")
    subprocess.run([ctl, "-q", *rabbitmqctl_args(vhost_of(amqp_url))], check=True,  # noqa: S603
                   capture_output=True, text=True, timeout=60)


def ensure_at_start(management_url: str | None, amqp_url: str) -> bool:
    """The resolver's start: apply the policy if a management URL is configured. A failure
    is logged, not fatal: the relay still keeps what comes back unrouted."""
    if not management_url:
        return False
    try:
        apply_with_http(management_url, amqp_url)
    except (httpx.HTTPError, OSError) as exc:
        log.warning("could not apply the RabbitMQ policy %s through %s: %s; unrouted "
                    "decisions are kept by the outbox relay only", POLICY_NAME,
                    urlsplit(management_url).hostname, exc)
        return False
    log.info("RabbitMQ policy %s applied: unrouted decisions go to %s", POLICY_NAME,
             UNROUTED_EXCHANGE)
    return True
