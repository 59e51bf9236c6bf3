"""Settings, read once per process from the environment (12-factor).

Every service builds one `Settings` in its composition root; nothing reads the environment
anywhere else. A bad or missing value stops the process at start with one line naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.domain.timeutil import CHINA_TZ_NAME
from shared.errors import ConfigError

SERVICES = ("intake", "timer", "resolver", "notifier")
DEFAULT_METRICS_PORTS = {"intake": 9101, "timer": 9102, "resolver": 9103, "notifier": 9104}


def _path_exists(cls: type, v: Path | None) -> Path | None:
    if v is not None and not v.exists():
        raise ValueError(f"{v} does not exist")
    return v


class SettingsGroup(BaseSettings):
    """Settings that belong together, read from their own variables: the group's prefix
    plus the field's name (AFTERSALES_SMTP_ + host), or the field's alias where the
    documented name does not follow the prefix. Fields can also be passed by name."""

    model_config = SettingsConfigDict(env_prefix="AFTERSALES_", extra="ignore",
                                      populate_by_name=True)


class SmtpSettings(SettingsGroup):
    """Email: the SMTP relay the notifier sends through (or `log` to only log them)."""

    model_config = SettingsConfigDict(env_prefix="AFTERSALES_SMTP_")

    transport: Literal["smtp", "log"] = Field(
        default="smtp", validation_alias="AFTERSALES_EMAIL_TRANSPORT")
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    # May carry a display name: "售后服务 <noreply@example.com>".
    sender: str = Field(default="aftersales@localhost", validation_alias="AFTERSALES_SMTP_FROM")
    user: str | None = None
    password: SecretStr | None = None
    tls: Literal["none", "starttls", "tls"] = "none"
    timeout: float = Field(default=10.0, gt=0)
    # An extra CA to trust (a private relay's certificate).
    ca_file: Path | None = None

    _ca_exists = field_validator("ca_file")(_path_exists)

    @field_validator("sender")
    @classmethod
    def _an_address(cls, v: str) -> str:
        if "@" not in v:
            raise ValueError("must be an email address")
        return v

    @model_validator(mode="after")
    def _no_password_in_clear(self) -> SmtpSettings:
        if self.user and self.password and self.tls == "none":
            # smtplib would send the password in the clear; refuse rather than leak it.
            raise ValueError("AFTERSALES_SMTP_TLS: must be starttls or tls when a password "
                             "is set")
        return self


class SmsSettings(SettingsGroup):
    """SMS: the provider and its account. Only the chosen provider's keys are needed."""

    model_config = SettingsConfigDict(env_prefix="AFTERSALES_SMS_")

    provider: Literal["log", "aliyun", "tencent"] = "log"
    # Unset: the provider's own endpoint and region (Aliyun cn-hangzhou, Tencent
    # ap-guangzhou); set them for a private endpoint or another region.
    endpoint: str | None = None
    region: str | None = None
    sign_name: str = "售后服务"
    # Provider template codes per SMS template (they belong to the provider account).
    templates: Path | None = None
    timeout: float = Field(default=10.0, gt=0)
    aliyun_access_key_id: str | None = Field(
        default=None, validation_alias="AFTERSALES_ALIYUN_ACCESS_KEY_ID")
    aliyun_access_key_secret: SecretStr | None = Field(
        default=None, validation_alias="AFTERSALES_ALIYUN_ACCESS_KEY_SECRET")
    tencent_secret_id: str | None = Field(
        default=None, validation_alias="AFTERSALES_TENCENT_SECRET_ID")
    tencent_secret_key: SecretStr | None = Field(
        default=None, validation_alias="AFTERSALES_TENCENT_SECRET_KEY")
    tencent_sdk_app_id: str | None = Field(
        default=None, validation_alias="AFTERSALES_TENCENT_SDK_APP_ID")

    _templates_exist = field_validator("templates")(_path_exists)

    @model_validator(mode="after")
    def _provider_keys(self) -> SmsSettings:
        needed = {
            "aliyun": {"AFTERSALES_ALIYUN_ACCESS_KEY_ID": self.aliyun_access_key_id,
                       "AFTERSALES_ALIYUN_ACCESS_KEY_SECRET": self.aliyun_access_key_secret,
                       "AFTERSALES_SMS_SIGN_NAME": self.sign_name},
            "tencent": {"AFTERSALES_TENCENT_SECRET_ID": self.tencent_secret_id,
                        "AFTERSALES_TENCENT_SECRET_KEY": self.tencent_secret_key,
                        "AFTERSALES_TENCENT_SDK_APP_ID": self.tencent_sdk_app_id,
                        "AFTERSALES_SMS_SIGN_NAME": self.sign_name},
        }.get(self.provider, {})
        for variable, value in needed.items():
            if not value:
                raise ValueError(
                    f"{variable}: required when AFTERSALES_SMS_PROVIDER={self.provider}")
        return self


def _split_addresses(value: object) -> object:
    """The variable's form: addresses separated by commas (or semicolons, spaces)."""
    if isinstance(value, str):
        return tuple(part for part in re.split(r"[,;\s]+", value) if part)
    return value


Addresses = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_addresses)]


class OpsSettings(SettingsGroup):
    """Who ops are: escalations go to these addresses."""

    model_config = SettingsConfigDict(env_prefix="AFTERSALES_OPS_")

    emails: Addresses = ()
    phones: Addresses = ()


class QuietHoursSettings(SettingsGroup):
    """Non-urgent messages wait out this window of the recipient's day ("off" or empty:
    none); the notifier parses it at start."""

    window: str = Field(default="22:00-08:00", validation_alias="AFTERSALES_QUIET_HOURS")
    tz: str = Field(default=CHINA_TZ_NAME, validation_alias="AFTERSALES_QUIET_HOURS_TZ")


class RateLimitSettings(SettingsGroup):
    """Messages per address and window. Escalations to ops have their own limits (not the
    merchants' 10 a day)."""

    sms_per_phone_per_hour: int = Field(default=5, ge=1)
    sms_per_phone_per_day: int = Field(default=10, ge=1)
    email_per_address_per_hour: int = Field(default=30, ge=1)
    ops_sms_per_phone_per_hour: int = Field(default=60, ge=1)
    ops_sms_per_phone_per_day: int = Field(default=300, ge=1)
    ops_email_per_address_per_hour: int = Field(default=600, ge=1)


class DeliverySettings(SettingsGroup):
    """How long the notifier keeps trying a notification."""

    model_config = SettingsConfigDict(env_prefix="AFTERSALES_NOTIFY_")

    # Transient send failures allowed before a notification fails; unset: retried (with
    # backoff) until it expires, so a provider outage is waited out.
    max_attempts: int | None = Field(default=None, ge=1, le=50)
    # A notification not sent within this long of being written fails as "expired".
    valid_seconds: float = Field(default=86400.0, gt=0)
    retry_base_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)


class ConsoleSettings(SettingsGroup):
    """The ops console (`aftersales run console`). Beyond loopback it needs a login."""

    model_config = SettingsConfigDict(env_prefix="AFTERSALES_CONSOLE_")

    host: str = "127.0.0.1"
    port: int = Field(default=9110, ge=1, le=65535)
    user: str | None = None
    password: SecretStr | None = None


class GatewaySettings(SettingsGroup):
    """The gateway (`aftersales run gateway`): where it listens, its limits, the
    platforms' keys. A platform is enabled when its key and secret are both set."""

    model_config = SettingsConfigDict(env_prefix="AFTERSALES_GATEWAY_")

    port: int = Field(default=9105, ge=1, le=65535)
    # Only this machine by default; set 0.0.0.0 (behind the ingress) to take the platforms'
    # pushes from outside.
    bind: str = "127.0.0.1"
    # A request larger than this is refused before it is read whole (413).
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=1000, ge=1, le=100_000)
    # Requests handled at once; beyond it uvicorn answers 503 and the platform retries
    # (bounds the memory that bodies in flight take).
    max_concurrency: int = Field(default=64, ge=1, le=10_000)
    # A folder with douyin.toml, kuaishou.toml and taobao.toml replacing the shipped ones.
    mappings: Path | None = None

    douyin_app_key: str | None = Field(default=None,
                                       validation_alias="AFTERSALES_DOUYIN_APP_KEY")
    douyin_app_secret: SecretStr | None = Field(
        default=None, validation_alias="AFTERSALES_DOUYIN_APP_SECRET")
    kuaishou_app_key: str | None = Field(default=None,
                                         validation_alias="AFTERSALES_KUAISHOU_APP_KEY")
    # 消息加密密钥: base64 of an AES key.
    kuaishou_msg_secret: SecretStr | None = Field(
        default=None, validation_alias="AFTERSALES_KUAISHOU_MSG_SECRET")
    taobao_app_key: str | None = Field(default=None,
                                       validation_alias="AFTERSALES_TAOBAO_APP_KEY")
    taobao_app_secret: SecretStr | None = Field(
        default=None, validation_alias="AFTERSALES_TAOBAO_APP_SECRET")

    @field_validator("mappings")
    @classmethod
    def _a_folder(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a folder")
        return v

    def enabled_platforms(self) -> list[str]:
        pairs = {
            "douyin": (self.douyin_app_key, self.douyin_app_secret),
            "kuaishou": (self.kuaishou_app_key, self.kuaishou_msg_secret),
            "taobao": (self.taobao_app_key, self.taobao_app_secret),
        }
        return [p for p, (key, secret) in pairs.items() if key and secret]


class DatabaseSessionSettings(SettingsGroup):
    """Limits of every database session (AFTERSALES_DATABASE_URL says where it is)."""

    model_config = SettingsConfigDict(env_prefix="AFTERSALES_DB_")

    # A statement or a lock wait longer than this is cancelled (the batch is retried)
    # instead of holding a worker and its locks for ever. 0 = none.
    statement_timeout_ms: int = Field(default=60_000, ge=0)
    lock_timeout_ms: int = Field(default=10_000, ge=0)
    # TCP keepalives on database connections: a dead peer (host gone, cable cut) is
    # noticed after idle + interval * count seconds instead of never.
    keepalives_idle_seconds: int = Field(default=30, ge=1)
    keepalives_interval_seconds: int = Field(default=10, ge=1)
    keepalives_count: int = Field(default=3, ge=1)


class _GroupsFromTheirOwnVariables(EnvSettingsSource):
    """The environment, except for the group fields: a group reads its own variables, and
    AFTERSALES_QUIET_HOURS (a value of the quiet_hours group) is no JSON of the group."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if isinstance(field.annotation, type) and issubclass(field.annotation, SettingsGroup):
            return None, field_name, False
        return super().get_field_value(field, field_name)


class Settings(BaseSettings):
    """All settings. The variables that belong together are read into groups
    (`settings.smtp.host` from AFTERSALES_SMTP_HOST); the others are at the top."""

    # "forbid": a keyword that is no field (a setting moved into a group) is an error here,
    # not silently ignored. Unknown AFTERSALES_* variables in the environment are ignored.
    model_config = SettingsConfigDict(env_prefix="AFTERSALES_", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _GroupsFromTheirOwnVariables(settings_cls)

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
    # The timer hands notifications over only while the notifier's queue holds fewer
    # messages than this (of up to resolver_batch ids each): a backlog waits in PostgreSQL,
    # as rows not yet handed over, instead of in RabbitMQ, where rows waiting longer than
    # timer_redispatch_seconds would be handed over again and again.
    notifier_queue_max_messages: int = Field(default=20, ge=1, le=100_000)

    outbox_batch: int = Field(default=1000, ge=1, le=10_000)
    outbox_poll_seconds: float = Field(default=0.2, gt=0, le=60)

    worker_processes: int = Field(default=1, ge=1, le=64)
    worker_threads: int = Field(default=4, ge=1, le=256)

    # CPU niceness of the notifier's processes (0 = same as the others). Where services
    # share CPUs, intake, timer and resolver come first: a late intake commit can let a
    # deadline fire on a case that was answered in time, while a notification tolerates
    # seconds of delay. Its backlog is watched (aftersales_notifications_pending).
    notifier_nice: int = Field(default=10, ge=0, le=19)

    # The groups: each reads its own AFTERSALES_* variables (see each class).
    db: DatabaseSessionSettings = Field(default_factory=lambda: DatabaseSessionSettings())
    smtp: SmtpSettings = Field(default_factory=lambda: SmtpSettings())
    sms: SmsSettings = Field(default_factory=lambda: SmsSettings())
    ops: OpsSettings = Field(default_factory=lambda: OpsSettings())
    quiet_hours: QuietHoursSettings = Field(default_factory=lambda: QuietHoursSettings())
    rate_limits: RateLimitSettings = Field(default_factory=lambda: RateLimitSettings())
    delivery: DeliverySettings = Field(default_factory=lambda: DeliverySettings())
    console: ConsoleSettings = Field(default_factory=lambda: ConsoleSettings())
    gateway: GatewaySettings = Field(default_factory=lambda: GatewaySettings())

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

    # RabbitMQ's management HTTP API (e.g. http://127.0.0.1:15672): when set, the resolver
    # applies the policy that keeps unrouted decisions (shared/broker_policy.py). The
    # URL's user:password win over the AMQP URL's.
    rabbitmq_management_url: str | None = None

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

    _paths_exist = field_validator("rules", "holidays", "notifications")(_path_exists)

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
        raise ConfigError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """"AFTERSALES_SMTP_PORT: Input should be ...": the first error, named by the variable
    that carries the value (a group's error comes from that group's own read)."""
    err = exc.errors()[0]
    message = str(err["msg"]).removeprefix("Value error, ")
    model: Any = _MODELS.get(exc.title, Settings)
    variable = None
    for part in err["loc"]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:  # already a variable name (an alias), or past the fields
            variable = str(part) if str(part).startswith("AFTERSALES_") else variable
            break
        variable = env_name(model, str(part))
        model = field.annotation if isinstance(field.annotation, type) else None
        if model is None or not issubclass(model, BaseSettings):
            break
    if variable is None or message.startswith("AFTERSALES_"):
        return message  # a check across fields names its variables itself
    return f"{variable}: {message}"


def env_name(model: type[BaseSettings], field: str) -> str:
    """The environment variable a field of `Settings` or of a group is read from."""
    alias = model.model_fields[field].validation_alias
    if isinstance(alias, str):
        return alias
    return f"{model.model_config.get('env_prefix', '')}{field}".upper()


def _groups() -> list[type[SettingsGroup]]:
    return [field.annotation for field in Settings.model_fields.values()
            if isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                 SettingsGroup)]


_MODELS: dict[str, type[BaseSettings]] = {"Settings": Settings} | {
    group.__name__: group for group in _groups()}
