"""Who is told what: the notification policy (data), zh-CN templates and log masking."""

from shared.notifications.masking import mask_address, mask_email, mask_phone
from shared.notifications.policy import (
    NotificationPolicy,
    NotificationRequest,
    OpsContacts,
    PolicyError,
    RenderedMessage,
    dedup_key,
    yuan,
)

__all__ = [
    "NotificationPolicy",
    "NotificationRequest",
    "OpsContacts",
    "PolicyError",
    "RenderedMessage",
    "dedup_key",
    "mask_address",
    "mask_email",
    "mask_phone",
    "yuan",
]
