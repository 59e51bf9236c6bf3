"""A channel that only writes a (masked) log line: the local default for SMS.

Lets `aftersales run all` work on a laptop without provider keys while every decision
about who is told what still shows up in the log.
"""

from __future__ import annotations

import logging

from services.notifier.channels.base import SendResult
from shared.notifications.masking import mask_address
from shared.notifications.policy import RenderedMessage

log = logging.getLogger("aftersales.notifier.log_channel")


class LogChannel:
    def __init__(self, kind: str = "sms", logger: logging.Logger | None = None) -> None:
        self.kind = kind
        self.name = "log"
        self._log = logger or log

    def send(self, message: RenderedMessage, dedup_key: str) -> SendResult:
        if message.channel == "email":
            self._log.info(
                "email (log only) to=%s key=%s subject=%s",
                mask_address(message.recipient, "email"),
                dedup_key,
                message.subject,
            )
        else:
            # The SMS text holds case ids and amounts, never the address: safe to log.
            self._log.info(
                "sms (log only) to=%s key=%s template=%s text=%s",
                mask_address(message.recipient, "sms"),
                dedup_key,
                message.template,
                message.body,
            )
        return SendResult(provider="log", provider_id=f"log-{dedup_key}")

