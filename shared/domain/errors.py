"""Errors of the domain core.

`AftersalesError` is the root of every error the project raises on purpose; the services
re-export it. The domain raises only for programming or configuration errors: bad business
input (an event that does not fit a case) is reported in an `Outcome`, never raised.
"""

from __future__ import annotations

from pathlib import Path


class AftersalesError(Exception):
    """Root of every error the project raises on purpose."""


class DomainError(AftersalesError):
    """A configuration or programming error detected by the domain core."""


class DataFileError(DomainError):
    """A rule or holiday file that cannot be used; the message names file, line and reason."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class RuleFileError(DataFileError):
    """A broken rule-set file (TOML syntax or an unknown kind, step, action, duration...)."""


class HolidayFileError(DataFileError):
    """A broken user holiday file."""

