"""Channel port and adapters, and the factory that builds them from the settings
(`build_channels`). Import them from here."""

from services.notifier.channels.aliyun import AliyunSmsChannel
from services.notifier.channels.base import Channel, SendResult
from services.notifier.channels.factory import build_channels
from services.notifier.channels.fake import FakeChannel, SentRecord
from services.notifier.channels.log import LogChannel
from services.notifier.channels.smtp import SmtpEmailChannel
from services.notifier.channels.tencent import TencentSmsChannel

__all__ = [
    "AliyunSmsChannel",
    "Channel",
    "FakeChannel",
    "LogChannel",
    "SendResult",
    "SentRecord",
    "SmtpEmailChannel",
    "TencentSmsChannel",
    "build_channels",
]
