"""The settings every command reads, with a bad one reported as a command-line error."""

from __future__ import annotations

import sys

from shared.config import Settings, load_settings
from shared.errors import ConfigError


def command_settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"aftersales: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
