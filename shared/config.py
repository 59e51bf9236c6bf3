"""Settings, read once per process from the environment (12-factor).

Every service builds one `Settings` in its composition root; nothing reads the environment
anywhere else. A bad or missing value stops the process at start with one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

SERVICES = ("intake", "timer", "resolver", "notifier")
DEFAULT_METRICS_PORTS = {"intake": 9101, "timer": 9102, "resolver": 9103, "notifier": 9104}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFTERSALES_", extra="ignore")

    # One AMQP URL, or several separated by commas (one per node of a RabbitMQ cluster):
    # connections try them in turn and move to another node when theirs goes away.
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
    # Inbound limits (docs/asyncapi.yaml): nesting depth of the JSON document, checked on
    # the raw bytes before parsing; the plausible window of occurred_at and due_at around
    # the time intake receives the event.
    intake_max_depth: int = Field(default=16, ge=4, le=64)
    intake_max_future_seconds: float = Field(default=300, ge=0)
    intake_max_past_days: float = Field(default=400, gt=0)
    intake_max_due_days: float = Field(default=400, gt=0)
    # An event for a case not opened yet is parked; one still parked after this long goes
    # to aftersales.events.rejected (reason case_never_opened). Checked every
    # intake_parked_sweep_seconds.
    intake_parked_max_seconds: float = Field(default=3 * 86400, gt=0)
    intake_parked_sweep_seconds: float = Field(default=60, gt=0)
    # RabbitMQ's max_message_size (deploy/docker/rabbitmq/rabbitmq.conf): the largest body
    # the broker delivers. prefetch x this is the most unacked message data intake holds,
    # bounded by intake_max_buffered_bytes (AMQP has no prefetch by size).
    broker_max_message_bytes: int = Field(default=256 * 1024, ge=1024)
    intake_max_buffered_bytes: int = Field(default=128 * 1024 * 1024, ge=1024 * 1024)

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
    # Transient send failures allowed before a notification fails; unset: retried (with
    # backoff) until it expires, so a provider outage is waited out.
    notify_max_attempts: int | None = Field(default=None, ge=1, le=50)
    # A notification not sent within this long of being written fails as "expired".
    notify_valid_seconds: float = Field(default=86400.0, gt=0)
    # Escalations to ops have their own per-address limits (not the merchants' 10 a day).
    ops_sms_per_phone_per_hour: int = Field(default=60, ge=1)
    ops_sms_per_phone_per_day: int = Field(default=300, ge=1)
    ops_email_per_address_per_hour: int = Field(default=600, ge=1)
    notify_retry_base_seconds: float = Field(default=30.0, gt=0)
    notify_retry_max_seconds: float = Field(default=3600.0, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Operations (issue 15). SIGTERM: each service stops taking work and finishes or hands
    # back what it holds within this grace; the pods' terminationGracePeriodSeconds match.
    shutdown_grace_seconds: float = Field(default=25.0, ge=2, le=3600)
    # Where /metrics, /healthz and /readyz listen: this machine only unless opened (the
    # Kubernetes files set 0.0.0.0 so Prometheus and the kubelet reach them).
    metrics_bind: str = "127.0.0.1"
    # The backlog gauges (timer's /metrics) are read from PostgreSQL this often, not per
    # scrape.
    backlog_interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    # Every database session: a statement or a lock wait longer than this is cancelled
    # (the batch is retried) instead of holding a worker and its locks for ever. 0 = none.
    db_statement_timeout_ms: int = Field(default=60_000, ge=0)
    db_lock_timeout_ms: int = Field(default=10_000, ge=0)
    # TCP keepalives on database connections: a dead peer (host gone, cable cut) is
    # noticed after idle + interval * count seconds instead of never.
    db_keepalives_idle_seconds: int = Field(default=30, ge=1)
    db_keepalives_interval_seconds: int = Field(default=10, ge=1)
    db_keepalives_count: int = Field(default=3, ge=1)

    # RabbitMQ's management HTTP API (e.g. http://127.0.0.1:15672): when set, the resolver
    # applies the policy that keeps unrouted decisions (shared/broker_policy.py). The
    # URL's user:password win over the AMQP URL's.
    rabbitmq_management_url: str | None = None

    # Ops console (`aftersales run console`). Beyond loopback it needs a login.
    console_host: str = "127.0.0.1"
    console_port: int = Field(default=9110, ge=1, le=65535)
    console_user: str | None = None
    console_password: SecretStr | None = None

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
    # Monthly partitions of the growing tables kept created ahead, beyond this month, by
    # every `aftersales retention run` (shared/db/partitions.py): run it at least this
    # often, or rows land in the default partition (kept, but slower to drop later).
    partition_months_ahead: int = Field(default=3, ge=1, le=24)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, v: str) -> str:
        return ",".join(split_amqp_urls(v))  # each URL checked, blanks dropped

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

    @model_validator(mode="after")
    def _intake_memory_is_bounded(self) -> Settings:
        if self.max_event_bytes > self.broker_max_message_bytes:
            raise ValueError("max_event_bytes is larger than broker_max_message_bytes")
        held = self.intake_prefetch * self.broker_max_message_bytes
        if held > self.intake_max_buffered_bytes:
            raise ValueError(
                f"intake_prefetch x broker_max_message_bytes = {held} bytes exceeds "
                f"intake_max_buffered_bytes ({self.intake_max_buffered_bytes})")
        return self

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


def split_amqp_urls(value: str) -> list[str]:
    """The URLs of a comma-separated AMQP URL list (a single URL is a list of one).
    A comma inside a URL (in a password) must be written %2C."""
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("no AMQP URL given")
    for number, url in enumerate(urls, 1):
        if not url.startswith(("amqp://", "amqps://")):
            where = f"URL {number} of {len(urls)}" if len(urls) > 1 else "the URL"
            raise ValueError(f"must start with amqp:// or amqps:// ({where} does not)")
    return urls


def load_settings() -> Settings:
    """Read the environment once; turn any validation failure into one clear line."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        raise ConfigError(f"AFTERSALES_{field.upper()}: {err['msg']}") from None
