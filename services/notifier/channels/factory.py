"""Settings in, channels out: the email and SMS channels the settings choose."""

from __future__ import annotations

import ssl

from services.notifier.channels.aliyun import DEFAULT_ENDPOINT as ALIYUN_ENDPOINT
from services.notifier.channels.aliyun import DEFAULT_REGION as ALIYUN_REGION
from services.notifier.channels.aliyun import AliyunSmsChannel
from services.notifier.channels.base import Channel
from services.notifier.channels.log import LogChannel
from services.notifier.channels.smtp import SmtpEmailChannel
from services.notifier.channels.tencent import DEFAULT_ENDPOINT as TENCENT_ENDPOINT
from services.notifier.channels.tencent import DEFAULT_REGION as TENCENT_REGION
from services.notifier.channels.tencent import TencentSmsChannel
from shared.config import SmsSettings, SmtpSettings
from shared.errors import ConfigError
from shared.notifications.policy import NotificationPolicy


def build_channels(smtp: SmtpSettings, sms: SmsSettings,
                   policy: NotificationPolicy | None = None) -> dict[str, Channel]:
    """{"email": ..., "sms": ...}. With `policy`, also checks at start that the chosen SMS
    provider has a template code for every SMS template the policy uses."""
    if policy is not None and sms.provider != "log":
        missing = policy.missing_sms_codes(sms.provider)
        if missing:
            raise ConfigError(f"AFTERSALES_SMS_TEMPLATES: no {sms.provider} template code "
                              f"for {', '.join(missing)}")
    return {"email": email_channel(smtp), "sms": sms_channel(sms)}


def email_channel(smtp: SmtpSettings) -> Channel:
    if smtp.transport == "log":
        return LogChannel("email")
    context = ssl.create_default_context(cafile=smtp.ca_file) if smtp.ca_file else None
    return SmtpEmailChannel(
        smtp.host, smtp.port, smtp.sender, user=smtp.user,
        password=smtp.password.get_secret_value() if smtp.password else None,
        tls=smtp.tls, timeout=smtp.timeout, ssl_context=context,
    )


def sms_channel(sms: SmsSettings) -> Channel:
    # The settings checked at start that the chosen provider's keys are set.
    if sms.provider == "aliyun":
        return AliyunSmsChannel(
            sms.aliyun_access_key_id or "",
            sms.aliyun_access_key_secret.get_secret_value()
            if sms.aliyun_access_key_secret else "",
            sms.sign_name, endpoint=sms.endpoint or ALIYUN_ENDPOINT,
            region_id=sms.region or ALIYUN_REGION, timeout=sms.timeout,
        )
    if sms.provider == "tencent":
        return TencentSmsChannel(
            sms.tencent_secret_id or "",
            sms.tencent_secret_key.get_secret_value() if sms.tencent_secret_key else "",
            sms.tencent_sdk_app_id or "", sms.sign_name,
            endpoint=sms.endpoint or TENCENT_ENDPOINT,
            region=sms.region or TENCENT_REGION, timeout=sms.timeout,
        )
    return LogChannel("sms")
