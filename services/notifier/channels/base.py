"""The channel port: one method, `send(message, dedup_key) -> SendResult`.

A channel either returns (the provider accepted the message) or raises one of
ThrottledError / TransientSendError / PermanentSendError (services.notifier.errors). The dedup key
goes to the provider (Message-ID, OutId, SessionContext) so a message that was sent
anyway despite a crash can be recognised on the provider's side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from shared.notifications.policy import RenderedMessage


@dataclass(frozen=True)
class SendResult:
    provider: str  # "smtp", "aliyun", "tencent", "log", "fake"
    provider_id: str  # the provider's id for the message (BizId, SerialNo, Message-ID)
    detail: str = ""


@runtime_checkable
class Channel(Protocol):
    name: str  # the provider name, e.g. "aliyun"

    def send(self, message: RenderedMessage, dedup_key: str) -> SendResult: ...


def national_phone(phone: str) -> str:
    """Digits of a mainland number without the country code (Aliyun's PhoneNumbers form);
    other numbers keep their country code, as Aliyun wants for international SMS."""
    digits = re.sub(r"\D", "", phone)
    if phone.strip().startswith("+"):
        return digits.removeprefix("86") if digits.startswith("861") else digits
    if digits.startswith("0086"):
        return digits[4:]
    if digits.startswith("86") and len(digits) == 13:
        return digits[2:]
    return digits


def e164_phone(phone: str) -> str:
    """+86... form (Tencent's PhoneNumberSet wants E.164)."""
    s = phone.strip()
    if s.startswith("+"):
        return "+" + re.sub(r"\D", "", s)
    digits = re.sub(r"\D", "", s)
    if digits.startswith("00"):
        return "+" + digits[2:]
    if len(digits) == 11 and digits.startswith("1"):
        return "+86" + digits
    if digits.startswith("86") and len(digits) == 13:
        return "+" + digits
    return "+" + digits
