"""Masking of personal contact data for log lines.

Every log line the notifier writes goes through these helpers: a support engineer can still
tell two recipients apart (prefix, suffix, domain) without the log becoming a contact list.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"\d")


def mask_phone(phone: str | None) -> str:
    """"13812345678" -> "138****5678"; "+8613812345678" -> "+86138****5678".

    Keeps the first 3 and last 4 digits of the national number (how Chinese apps show a
    phone); shorter numbers keep only their last 2 digits.
    """
    if not phone:
        return ""
    s = phone.strip()
    prefix = ""
    for cc in ("+86", "0086"):
        if s.startswith(cc) and len(s) > len(cc) + 7:
            prefix, s = cc, s[len(cc) :]
            break
    digits = "".join(_DIGITS.findall(s))
    if len(digits) >= 11:
        return f"{prefix}{digits[:3]}****{digits[-4:]}"
    if len(digits) >= 4:
        return f"{prefix}{'*' * (len(digits) - 2)}{digits[-2:]}"
    return prefix + "*" * len(digits)


def mask_email(email: str | None) -> str:
    """"zhangsan@example.com" -> "z***@example.com" (the domain helps with bounce analysis)."""
    if not email:
        return ""
    local, sep, domain = email.strip().rpartition("@")
    if not sep:
        # Not an address at all; show nothing of it.
        return "***"
    if not local:
        return f"***@{domain}"
    return f"{local[0]}***@{domain}"


def mask_address(address: str | None, channel: str | None = None) -> str:
    """Mask an email or a phone, guessing from the shape when the channel is not given."""
    if not address:
        return ""
    if channel == "email" or (channel is None and "@" in address):
        return mask_email(address)
    return mask_phone(address)


_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
# Mainland mobiles (1[3-9]x, 11 digits) with an optional +86 / 0086 / 86 in front.
_PHONE_RE = re.compile(r"(?<!\d)(?:\+?86|0086)?1[3-9]\d{9}(?!\d)")


def mask_text(text: str) -> str:
    """Mask every email address and mainland mobile number inside free text, such as an
    SMTP server's "550 <zhangsan@example.com>: user unknown" or a provider's message."""
    text = _EMAIL_RE.sub(lambda m: mask_email(m.group(0)), text)
    return _PHONE_RE.sub(lambda m: mask_phone(m.group(0)), text)
