"""`aftersales broker policy`: apply the policy that keeps unrouted decisions."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import httpx

from shared.broker_policy import (
    apply_with_http,
    apply_with_rabbitmqctl,
    rabbitmqctl_args,
    vhost_of,
)
from shared.config import Settings


def apply_policy(settings: Settings, print_only: bool) -> int:
    command = "rabbitmqctl " + shlex.join(rabbitmqctl_args(vhost_of(settings.amqp_url)))
    if print_only:
        print(command)
        return 0
    try:
        if settings.rabbitmq_management_url:
            apply_with_http(settings.rabbitmq_management_url, settings.amqp_url)
            how = "through the management API"
        else:
            apply_with_rabbitmqctl(settings.amqp_url)
            how = "with rabbitmqctl"
    except (httpx.HTTPError, OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        print(f"aftersales: could not apply the policy: {detail!s}".strip(), file=sys.stderr)
        print(f"run on a RabbitMQ node: {command}", file=sys.stderr)
        return 1
    print(json.dumps({"applied": how, "vhost": vhost_of(settings.amqp_url)}))
    return 0
