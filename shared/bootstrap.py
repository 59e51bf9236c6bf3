"""Builders the composition roots share. Each is called once per process, at start."""

from __future__ import annotations

from pathlib import Path

from shared.config import Settings
from shared.db.session import Database, SessionLimits, make_engine
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.errors import ConfigError
from shared.health import Health, amqp_check, database_check, install, redis_check
from shared.notifications.policy import NotificationPolicy


def build_domain(settings: Settings) -> Engine:
    """Load rule sets and holidays; a broken file stops the service with one clear line."""
    try:
        return Engine(RuleBook.load(settings.rules), WorkCalendar(settings.holidays))
    except Exception as exc:  # the domain's errors name the file, line and reason
        raise ConfigError(f"rules/holidays: {exc}") from None


def build_policy(settings: Settings) -> NotificationPolicy:
    try:
        return NotificationPolicy.load(settings.notifications, sms_codes=settings.sms.templates)
    except Exception as exc:
        raise ConfigError(f"AFTERSALES_NOTIFICATIONS: {exc}") from None


def ops_contacts(settings: Settings) -> dict[str, list[str]]:
    return {"emails": list(settings.ops.emails), "phones": list(settings.ops.phones)}


def build_database(settings: Settings, pool_size: int = 5) -> Database:
    limits = SessionLimits(
        statement_timeout_ms=settings.db.statement_timeout_ms,
        lock_timeout_ms=settings.db.lock_timeout_ms,
        keepalives_idle_s=settings.db.keepalives_idle_seconds,
        keepalives_interval_s=settings.db.keepalives_interval_seconds,
        keepalives_count=settings.db.keepalives_count,
    )
    return Database(make_engine(settings.database_url, pool_size=pool_size, limits=limits))


def build_health(settings: Settings, *, redis: bool = False) -> Health:
    """The readiness of this service's process tree (`/readyz`): PostgreSQL, RabbitMQ
    (and Redis for the notifier) checked on an interval, plus the supervisor's workers."""
    checks = {
        "postgresql": database_check(build_database(settings, pool_size=1)),
        "rabbitmq": amqp_check(settings.amqp_url),
    }
    if redis:
        checks["redis"] = redis_check(settings.redis_url)
    return install(Health(checks)).start()


def metrics_dir_for(base: Path | None, service: str, pid: int) -> Path:
    import tempfile

    root = base or Path(tempfile.gettempdir()) / "aftersales-metrics"
    return root / f"{service}-{pid}"


