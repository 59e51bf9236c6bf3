"""The root of the project's errors, and the domain core's own.

`AftersalesError` is the root of every error the project raises on purpose. It lives here
because the domain core imports no infrastructure; `shared.errors` builds the categories
the services use at their boundaries (invalid input, transient, permanent) on it.

The domain raises only for configuration errors: bad business input (an event that does
not fit a case) is reported in an `Outcome`, never raised.
"""

from __future__ import annotations

from pathlib import Path


class AftersalesError(Exception):
    """Root of every error the project raises on purpose."""


class ConfigError(AftersalesError):
    """A setting or a data file that cannot be used: the process stops at start with this
    one line, naming the variable or the file."""


class DataFileError(ConfigError):
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
