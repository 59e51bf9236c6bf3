"""Builders the composition roots share. Each is called once per process, at start."""

from __future__ import annotations

from pathlib import Path

from shared.config import Settings
from shared.db.session import Database, make_engine
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.errors import ConfigError
from shared.notifications.policy import NotificationPolicy


def build_domain(settings: Settings) -> Engine:
    """Load rule sets and holidays; a broken file stops the service with one clear line."""
    try:
        return Engine(RuleBook.load(settings.rules), WorkCalendar(settings.holidays))
    except Exception as exc:  # the domain's errors name the file, line and reason
        raise ConfigError(f"rules/holidays: {exc}") from None


def build_policy(settings: Settings) -> NotificationPolicy:
    try:
        return NotificationPolicy.load(settings.notifications, sms_codes=settings.sms_templates)
    except Exception as exc:
        raise ConfigError(f"AFTERSALES_NOTIFICATIONS: {exc}") from None


def ops_contacts(settings: Settings) -> dict[str, list[str]]:
    return {
        "emails": [e.strip() for e in settings.ops_emails.split(",") if e.strip()],
        "phones": [p.strip() for p in settings.ops_phones.split(",") if p.strip()],
    }


def build_database(settings: Settings, pool_size: int = 5) -> Database:
    return Database(make_engine(settings.database_url, pool_size=pool_size))


def metrics_dir_for(base: Path | None, service: str, pid: int) -> Path:
    import tempfile

    root = base or Path(tempfile.gettempdir()) / "aftersales-metrics"
    return root / f"{service}-{pid}"


