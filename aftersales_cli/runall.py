"""`aftersales run all`: the four services and the platform gateway for local use,
Procfile-style (honcho)."""

from __future__ import annotations

import sys

from honcho.manager import Manager

from shared.config import SERVICES


def run_all() -> int:
    manager = Manager()
    for service in SERVICES:
        manager.add_process(service, f"{sys.executable} -m aftersales_cli.cli run {service}")
    manager.add_process("gateway", f"{sys.executable} -m aftersales_cli.cli run gateway")
    manager.loop()
    return int(manager.returncode or 0)
