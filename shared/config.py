"""Settings, read once per process from the environment (12-factor).

Every service builds one `Settings` in its composition root; nothing reads the environment
anywhere else. A bad or missing value stops the process at start with one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

SERVICES = ("intake", "timer", "resolver", "notifier")
DEFAULT_METRICS_PORTS = {"intake": 9101, "timer": 9102, "resolver": 9103, "notifier": 9104}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFTERSALES_", extra="ignore")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    database_url: str = "postgresql+psycopg://127.0.0.1/aftersales"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix of every Redis key this deployment writes, so tests and tenants never collide.
    redis_prefix: str = "aftersales:"

    rules: Path | None = None
    holidays: Path | None = None
    notifications: Path | None = None

    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Where prometheus_client keeps per-process files in multiprocess mode.
    metrics_dir: Path | None = None

    # RabbitMQ queue type for the queues the services declare ("quorum" in clusters).
    queue_type: Literal["classic", "quorum"] = "classic"
    # Largest accepted inbound event body; larger ones are rejected, not parsed.
    max_event_bytes: int = Field(default=64 * 1024, ge=1024)
    intake_prefetch: int = Field(default=200, ge=1, le=10_000)
    intake_batch: int = Field(default=100, ge=1, le=5_000)
    # A batch is committed once its oldest event has waited this long, full or not: under a
    # steady trickle a batch would otherwise wait to fill, adding its fill time to latency.
    # 20 ms measured best at 500 events/s (p50/p99 34/86 ms against 62/138 ms at 50 ms);
    # under a backlog batches fill long before, so throughput does not depend on it.
    intake_batch_wait_seconds: float = Field(default=0.02, gt=0, le=10)

    timer_batch: int = Field(default=500, ge=1, le=50_000)
    timer_poll_seconds: float = Field(default=0.2, gt=0, le=60)
    # A dispatched deadline that the resolver has not finished after this long is sent again.
    timer_redispatch_seconds: float = Field(default=120, gt=0)
    # Deadlines fired per second at most during catch-up, so a backlog does not flood the rest.
    timer_max_rate: float = Field(default=2000, gt=0)
    # Deadlines per message from the timer to the resolver (one resolver transaction each).
    resolver_batch: int = Field(default=200, ge=1, le=1000)

    outbox_batch: int = Field(default=1000, ge=1, le=10_000)
    outbox_poll_seconds: float = Field(default=0.2, gt=0, le=60)

    worker_processes: int = Field(default=1, ge=1, le=64)
    worker_threads: int = Field(default=4, ge=1, le=256)

    # Notifier
    email_transport: Literal["smtp", "log"] = "smtp"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_from: str = "aftersales@localhost"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_timeout: float = 10.0
    smtp_ca_file: Path | None = None
    sms_provider: Literal["log", "aliyun", "tencent"] = "log"
    sms_endpoint: str | None = None
    sms_sign_name: str = "售后服务"
    sms_region: str = "cn-hangzhou"
    # Provider template codes per SMS template (they belong to the provider account).
    sms_templates: Path | None = None
    sms_timeout: float = 10.0
    aliyun_access_key_id: str | None = None
    aliyun_access_key_secret: SecretStr | None = None
    tencent_secret_id: str | None = None
    tencent_secret_key: SecretStr | None = None
    tencent_sdk_app_id: str | None = None
    ops_emails: str = ""
    ops_phones: str = ""
    # CPU niceness of the notifier's processes (0 = same as the others). Where services
    # share CPUs, intake, timer and resolver come first: a late intake commit can let a
    # deadline fire on a case that was answered in time, while a notification tolerates
    # seconds of delay. Its backlog is watched (aftersales_notifications_pending).
    notifier_nice: int = Field(default=10, ge=0, le=19)
    quiet_hours: str = "22:00-08:00"
    quiet_hours_tz: str = "Asia/Shanghai"
    sms_per_phone_per_hour: int = Field(default=5, ge=1)
    sms_per_phone_per_day: int = Field(default=10, ge=1)
    email_per_address_per_hour: int = Field(default=30, ge=1)
    notify_max_attempts: int = Field(default=6, ge=1, le=50)
    notify_retry_base_seconds: float = Field(default=30.0, gt=0)
    notify_retry_max_seconds: float = Field(default=3600.0, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Retention (`aftersales retention run`, docs/design.md "Retention"): a closed case and
    # everything it caused is archived and removed this many days after it closed; parked
    # events whose case never opened, this many days after they were received.
    retention_days: int = Field(default=400, ge=1, le=36_500)
    # How long an event id is remembered, in days after its case closed (after it was
    # received, for an event whose case never opened). Unset = the retention. Never shorter
    # than the retention; if longer, retention keeps the id alone (no body) until then.
    dedup_window_days: int | None = Field(default=None, ge=1, le=36_500)
    # Cases per retention transaction: small, so locks are held for milliseconds.
    retention_batch: int = Field(default=500, ge=1, le=10_000)
    # Where retention writes its archive (gzip'd JSON lines); required to remove anything.
    archive_dir: Path | None = None

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, v: str) -> str:
        if not v.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return v

    @field_validator("database_url")
    @classmethod
    def _db_scheme(cls, v: str) -> str:
        if not v.startswith("postgresql"):
            raise ValueError("must be a postgresql:// URL (e.g. postgresql+psycopg://host/db)")
        if v.startswith("postgresql://"):
            # psycopg 3 is the driver this project ships; accept the plain URL form too.
            v = "postgresql+psycopg://" + v.removeprefix("postgresql://")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("rules", "holidays", "notifications", "sms_templates", "smtp_ca_file")
    @classmethod
    def _path_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.exists():
            raise ValueError(f"{v} does not exist")
        return v

    @field_validator("dedup_window_days")
    @classmethod
    def _dedup_covers_retention(cls, v: int | None, info: ValidationInfo) -> int | None:
        retention = info.data.get("retention_days")
        if v is not None and retention is not None and v < retention:
            raise ValueError(
                f"must be at least AFTERSALES_RETENTION_DAYS ({retention}): an event id is "
                "remembered as long as its case is kept")
        return v

    @property
    def dedup_window(self) -> int:
        """Days an event id is remembered after its case closed (>= retention_days)."""
        return self.dedup_window_days or self.retention_days

    def metrics_port_for(self, service: str) -> int:
        return self.metrics_port or DEFAULT_METRICS_PORTS[service]


def load_settings() -> Settings:
    """Read the environment once; turn any validation failure into one clear line."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        raise ConfigError(f"AFTERSALES_{field.upper()}: {err['msg']}") from None
