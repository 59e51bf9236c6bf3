"""Error categories of the services (the domain core has its own root, re-used here).

Permanent errors are never retried (Dramatiq `throws=`); transient ones are.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Root of the errors the services raise on purpose."""


class ConfigError(ServiceError):
    """A bad or missing setting: the process stops at start with this one line."""


class PermanentError(ServiceError):
    """Retrying cannot help (bad input, a missing row that must exist)."""


class TransientError(ServiceError):
    """A dependency hiccup (connection lost, deadlock); retrying should help."""
