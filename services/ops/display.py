"""Text shown the same way by the `aftersales` commands and the web console."""

from __future__ import annotations


def span(seconds: float | None) -> str:
    if seconds is None:
        return "ongoing"
    if abs(seconds) < 60:
        return f"{seconds:.1f}s" if seconds % 1 else f"{int(seconds)}s"
    seconds = int(seconds)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours else []
    parts += [f"{minutes}m"] if minutes or not parts else []
    return sign + " ".join(parts)
