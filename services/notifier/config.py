"""Everything the notifier's channels and delivery policy need, as one typed object.

Built once in the composition root (main.py) from the process settings
(`NotifierConfig.from_settings(shared.config.Settings)`), then `build_channels(cfg)`.
Choosing a provider and its keys is settings only; no secret lives in code.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Any, Literal

from services.notifier.channels.aliyun import DEFAULT_ENDPOINT as ALIYUN_ENDPOINT
from services.notifier.channels.aliyun import AliyunSmsChannel
from services.notifier.channels.base import Channel
from services.notifier.channels.log import LogChannel
from services.notifier.channels.smtp import SmtpEmailChannel
from services.notifier.channels.tencent import DEFAULT_ENDPOINT as TENCENT_ENDPOINT
from services.notifier.channels.tencent import TencentSmsChannel
from services.notifier.delivery import QuietHours, RetryPolicy
from services.notifier.ratelimit import RateLimit
from shared.errors import ConfigError
from shared.notifications.policy import NotificationPolicy, OpsContacts

SmsProvider = Literal["log", "aliyun", "tencent"]
TlsMode = Literal["none", "starttls", "tls"]


@dataclass(frozen=True)
class NotifierConfig:
    # email
    email_transport: Literal["smtp", "log"] = "smtp"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_from: str = "aftersales@localhost"  # may be "售后服务 <noreply@example.com>"
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_tls: TlsMode = "none"
    smtp_timeout: float = 10.0
    smtp_ca_file: str | None = None  # extra CA to trust (a private relay's certificate)
    # sms
    sms_provider: SmsProvider = "log"
    sms_sign_name: str = "售后服务"
    sms_templates: str | None = None  # TOML file with your provider template codes
    http_timeout: float = 10.0
    aliyun_access_key_id: str | None = None
    aliyun_access_key_secret: str | None = field(default=None, repr=False)
    aliyun_endpoint: str = ALIYUN_ENDPOINT
    aliyun_region: str = "cn-hangzhou"
    tencent_secret_id: str | None = None
    tencent_secret_key: str | None = field(default=None, repr=False)
    tencent_sdk_app_id: str | None = None
    tencent_endpoint: str = TENCENT_ENDPOINT
    tencent_region: str = "ap-guangzhou"
    # who ops are
    ops_emails: tuple[str, ...] = ()
    ops_phones: tuple[str, ...] = ()
    # delivery policy
    quiet_start: time = time(22, 0)
    quiet_end: time = time(8, 0)
    quiet_tz: str = "Asia/Shanghai"
    sms_per_phone_per_hour: int = 5
    sms_per_phone_per_day: int = 10
    email_per_address_per_hour: int = 30
    max_attempts: int | None = None  # None: transient failures retried until expiry
    valid_s: float = 86400.0  # a notification not sent this long after it was written fails
    ops_sms_per_phone_per_hour: int = 60
    ops_sms_per_phone_per_day: int = 300
    ops_email_per_address_per_hour: int = 600
    retry_base_delay_s: float = 30.0
    retry_max_delay_s: float = 3600.0

    # ---- derived objects -------------------------------------------------------------

    def quiet_hours(self) -> QuietHours:
        return QuietHours(self.quiet_start, self.quiet_end, self.quiet_tz)

    def rate_limits(self) -> tuple[RateLimit, ...]:
        return (
            RateLimit("sms", self.sms_per_phone_per_hour, 3600),
            RateLimit("sms", self.sms_per_phone_per_day, 86400),
            RateLimit("email", self.email_per_address_per_hour, 3600),
            RateLimit("sms", self.ops_sms_per_phone_per_hour, 3600, scope="ops"),
            RateLimit("sms", self.ops_sms_per_phone_per_day, 86400, scope="ops"),
            RateLimit("email", self.ops_email_per_address_per_hour, 3600, scope="ops"),
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            # No budget set: a throttling provider is waited out like one that is down,
            # until the notification expires (valid_s).
            max_throttled_attempts=None if self.max_attempts is None else 30,
            base_delay_s=self.retry_base_delay_s,
            max_delay_s=self.retry_max_delay_s,
        )

    def ops_contacts(self) -> OpsContacts:
        return OpsContacts(emails=self.ops_emails, phones=self.ops_phones, tz=self.quiet_tz)

    def load_policy(self, path: Path | str | None = None) -> NotificationPolicy:
        """The shipped (or `path`) policy with this account's SMS template codes."""
        return NotificationPolicy.load(path, sms_codes=self.sms_templates)

    # ---- validation ------------------------------------------------------------------

    def validate(self) -> NotifierConfig:
        """Raise ConfigError naming the environment variable of the first bad setting."""

        def need(value: Any, var: str) -> None:
            if not value:
                raise ConfigError(
                    f"{var} is required when AFTERSALES_SMS_PROVIDER={self.sms_provider}"
                )

        if self.smtp_tls not in ("none", "starttls", "tls"):
            raise ConfigError("AFTERSALES_SMTP_TLS: must be none, starttls or tls")
        if "@" not in self.smtp_from:
            raise ConfigError("AFTERSALES_SMTP_FROM: must be an email address")
        if self.smtp_user and self.smtp_password and self.smtp_tls == "none":
            # smtplib would send the password in the clear; refuse rather than leak it.
            raise ConfigError("AFTERSALES_SMTP_TLS: must be starttls or tls when a password is set")
        if self.smtp_ca_file and not Path(self.smtp_ca_file).is_file():
            raise ConfigError(f"AFTERSALES_SMTP_CA_FILE: {self.smtp_ca_file} does not exist")
        if self.sms_templates and not Path(self.sms_templates).is_file():
            raise ConfigError(f"AFTERSALES_SMS_TEMPLATES: {self.sms_templates} does not exist")
        if self.sms_provider == "aliyun":
            need(self.aliyun_access_key_id, "AFTERSALES_ALIYUN_ACCESS_KEY_ID")
            need(self.aliyun_access_key_secret, "AFTERSALES_ALIYUN_ACCESS_KEY_SECRET")
            need(self.sms_sign_name, "AFTERSALES_SMS_SIGN_NAME")
        elif self.sms_provider == "tencent":
            need(self.tencent_secret_id, "AFTERSALES_TENCENT_SECRET_ID")
            need(self.tencent_secret_key, "AFTERSALES_TENCENT_SECRET_KEY")
            need(self.tencent_sdk_app_id, "AFTERSALES_TENCENT_SDK_APP_ID")
            need(self.sms_sign_name, "AFTERSALES_SMS_SIGN_NAME")
        elif self.sms_provider != "log":
            raise ConfigError("AFTERSALES_SMS_PROVIDER: must be log, aliyun or tencent")
        for var, n in (
            ("AFTERSALES_SMS_PER_PHONE_PER_HOUR", self.sms_per_phone_per_hour),
            ("AFTERSALES_SMS_PER_PHONE_PER_DAY", self.sms_per_phone_per_day),
            ("AFTERSALES_EMAIL_PER_ADDRESS_PER_HOUR", self.email_per_address_per_hour),
            ("AFTERSALES_NOTIFY_MAX_ATTEMPTS", self.max_attempts or 1),
            ("AFTERSALES_OPS_SMS_PER_PHONE_PER_HOUR", self.ops_sms_per_phone_per_hour),
            ("AFTERSALES_OPS_SMS_PER_PHONE_PER_DAY", self.ops_sms_per_phone_per_day),
            ("AFTERSALES_OPS_EMAIL_PER_ADDRESS_PER_HOUR", self.ops_email_per_address_per_hour),
        ):
            if n < 1:
                raise ConfigError(f"{var}: must be at least 1")
        return self

    # ---- from the process settings ---------------------------------------------------

    @classmethod
    def from_settings(cls, s: Any) -> NotifierConfig:
        """From `shared.config.Settings` (read by attribute, so fields it lacks keep
        their defaults here). Validates."""

        def get(name: str, default: Any = None) -> Any:
            v = getattr(s, name, default)
            if hasattr(v, "get_secret_value"):  # pydantic SecretStr
                v = v.get_secret_value()
            return default if v is None else v

        provider = str(get("sms_provider", "log"))
        region = get("sms_region")
        endpoint = get("sms_endpoint")
        quiet = QuietHours.parse(str(get("quiet_hours", "22:00-08:00")),
                                 str(get("quiet_hours_tz", "Asia/Shanghai")))
        ops = OpsContacts.parse(get("ops_emails", ""), get("ops_phones", ""))
        ca = get("smtp_ca_file")
        templates = get("sms_templates")
        cfg = cls(
            email_transport=get("email_transport", "smtp"),
            smtp_host=str(get("smtp_host", "127.0.0.1")),
            smtp_port=int(get("smtp_port", 25)),
            smtp_from=str(get("smtp_from", "aftersales@localhost")),
            smtp_user=get("smtp_user") or None,
            smtp_password=get("smtp_password") or None,
            smtp_tls=get("smtp_tls", "none"),
            smtp_timeout=float(get("smtp_timeout", 10.0)),
            smtp_ca_file=str(ca) if ca else None,
            sms_provider=provider,  # type: ignore[arg-type]
            sms_sign_name=str(get("sms_sign_name", "售后服务")),
            sms_templates=str(templates) if templates else None,
            http_timeout=float(get("sms_timeout", 10.0)),
            aliyun_access_key_id=get("aliyun_access_key_id"),
            aliyun_access_key_secret=get("aliyun_access_key_secret"),
            aliyun_endpoint=get("aliyun_endpoint")
            or (endpoint if provider == "aliyun" and endpoint else ALIYUN_ENDPOINT),
            aliyun_region=get("aliyun_region") or (region if provider == "aliyun" and region
                                                   else "cn-hangzhou"),
            tencent_secret_id=get("tencent_secret_id"),
            tencent_secret_key=get("tencent_secret_key"),
            tencent_sdk_app_id=get("tencent_sdk_app_id"),
            tencent_endpoint=get("tencent_endpoint")
            or (endpoint if provider == "tencent" and endpoint else TENCENT_ENDPOINT),
            # The shared AFTERSALES_SMS_REGION defaults to Aliyun's cn-hangzhou, which is
            # no Tencent region: only take it for Tencent when it looks like one.
            tencent_region=get("tencent_region")
            or (region if provider == "tencent" and region and str(region).startswith("ap-")
                else "ap-guangzhou"),
            ops_emails=ops.emails,
            ops_phones=ops.phones,
            quiet_start=quiet.start,
            quiet_end=quiet.end,
            quiet_tz=quiet.tz,
            sms_per_phone_per_hour=int(get("sms_per_phone_per_hour", 5)),
            sms_per_phone_per_day=int(get("sms_per_phone_per_day", 10)),
            email_per_address_per_hour=int(get("email_per_address_per_hour", 30)),
            max_attempts=(int(get("notify_max_attempts"))
                          if get("notify_max_attempts") is not None else None),
            valid_s=float(get("notify_valid_seconds", 86400.0)),
            ops_sms_per_phone_per_hour=int(get("ops_sms_per_phone_per_hour", 60)),
            ops_sms_per_phone_per_day=int(get("ops_sms_per_phone_per_day", 300)),
            ops_email_per_address_per_hour=int(get("ops_email_per_address_per_hour", 600)),
            retry_base_delay_s=float(get("notify_retry_base_seconds", 30.0)),
            retry_max_delay_s=float(get("notify_retry_max_seconds", 3600.0)),
        )
        return cfg.validate()


def build_channels(
    cfg: NotifierConfig, policy: NotificationPolicy | None = None
) -> dict[str, Channel]:
    """{"email": ..., "sms": ...} as the settings choose. With `policy`, also checks at
    start that the chosen SMS provider has a template code for every SMS template used."""
    cfg.validate()
    email: Channel
    if cfg.email_transport == "log":
        email = LogChannel("email")
    else:
        ctx = ssl.create_default_context(cafile=cfg.smtp_ca_file) if cfg.smtp_ca_file else None
        email = SmtpEmailChannel(
            cfg.smtp_host,
            cfg.smtp_port,
            cfg.smtp_from,
            user=cfg.smtp_user,
            password=cfg.smtp_password,
            tls=cfg.smtp_tls,
            timeout=cfg.smtp_timeout,
            ssl_context=ctx,
        )
    sms: Channel
    if cfg.sms_provider == "aliyun":
        sms = AliyunSmsChannel(
            cfg.aliyun_access_key_id or "",
            cfg.aliyun_access_key_secret or "",
            cfg.sms_sign_name,
            endpoint=cfg.aliyun_endpoint,
            region_id=cfg.aliyun_region,
            timeout=cfg.http_timeout,
        )
    elif cfg.sms_provider == "tencent":
        sms = TencentSmsChannel(
            cfg.tencent_secret_id or "",
            cfg.tencent_secret_key or "",
            cfg.tencent_sdk_app_id or "",
            cfg.sms_sign_name,
            endpoint=cfg.tencent_endpoint,
            region=cfg.tencent_region,
            timeout=cfg.http_timeout,
        )
    else:
        sms = LogChannel("sms")
    if policy is not None and cfg.sms_provider != "log":
        missing = policy.missing_sms_codes(cfg.sms_provider)
        if missing:
            raise ConfigError(
                f"AFTERSALES_SMS_TEMPLATES: no {cfg.sms_provider} template code for "
                f"{', '.join(missing)}"
            )
    return {"email": email, "sms": sms}
