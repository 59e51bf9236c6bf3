"""Helpers to point at the line of a TOML file that is wrong."""

from __future__ import annotations

import re
import tomllib

_AT_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def toml_error_line(exc: tomllib.TOMLDecodeError, text: str) -> tuple[int, str]:
    """(line, reason) of a TOML syntax error; Python 3.11 keeps the line only in the message,
    and says "(at end of document)" for an error at the end: that is the last line."""
    message = str(exc)
    match = _AT_LINE.search(message)
    return (int(match.group(1)) if match else max(1, len(text.splitlines()))), message


def header_lines(text: str, header: str) -> list[int]:
    """1-based numbers of the lines that open a table, e.g. header "[[rule]]"."""
    return [n for n, line in enumerate(text.splitlines(), start=1) if line.strip() == header]


def key_line(text: str, key: str, start: int = 1, end: int | None = None) -> int | None:
    """1-based number of the first line in [start, end) that assigns `key`."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if number >= start and (end is None or number < end) and pattern.match(line):
            return number
    return None
