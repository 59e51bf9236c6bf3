"""Email over SMTP (smtplib), with STARTTLS or implicit TLS and AUTH.

The Message-ID is derived from the dedup key, so a message that went out although we
never recorded it (crash after DATA) is recognisable in the receiving mailbox and in the
relay's logs, and mail clients thread or collapse duplicates.

SMTP reply codes are classified (RFC 5321 / RFC 3463):
- 421 (service closing, often "too many connections"), 452 (too many recipients /
  insufficient storage) and any 4.7.x mentioning rate or limits -> ThrottledError;
- other 4xx and connection / timeout errors -> TransientError;
- 5xx (unknown user, auth failed, policy rejection) -> PermanentError.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Literal

from services.notifier.channels.base import SendResult
from services.notifier.errors import (
    NotifierError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from shared.notifications.masking import mask_email
from shared.notifications.policy import RenderedMessage

log = logging.getLogger("aftersales.notifier.smtp")

TlsMode = Literal["none", "starttls", "tls"]

# Default wait when a server throttles without saying how long (most relays use minutes).
DEFAULT_THROTTLE_RETRY_S = 300.0
_RATE_WORDS = re.compile(r"rate|too many|limit|throttl|try again later|频率|过多", re.I)


class SmtpEmailChannel:
    name = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        *,
        user: str | None = None,
        password: str | None = None,
        tls: TlsMode = "none",
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        message_id_domain: str | None = None,
        local_hostname: str | None = None,
    ) -> None:
        if tls not in ("none", "starttls", "tls"):
            raise ValueError(f"tls must be none, starttls or tls, not {tls!r}")
        self.host, self.port = host, port
        self.sender = sender
        self._from_name, self._from_addr = parseaddr(sender)
        if "@" not in self._from_addr:
            raise ValueError(f"sender {sender!r} is not an email address")
        self.user, self.password = user, password
        self.tls = tls
        self.timeout = timeout
        # Verify certificates by default; tests pass a context trusting their own CA.
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.message_id_domain = message_id_domain or self._from_addr.rpartition("@")[2]
        self.local_hostname = local_hostname

    # ---- message ----------------------------------------------------------------------

    def message_id(self, dedup_key: str) -> str:
        return f"<{dedup_key}@{self.message_id_domain}>"

    def build(self, message: RenderedMessage, dedup_key: str) -> EmailMessage:
        msg = EmailMessage()  # default policy: non-ASCII headers get RFC 2047 encoded
        if self._from_name:
            local, _, domain = self._from_addr.rpartition("@")
            msg["From"] = Address(self._from_name, local, domain)
        else:
            msg["From"] = self._from_addr
        msg["To"] = message.recipient
        msg["Subject"] = message.subject
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = self.message_id(dedup_key)
        # Kept separately so bounce processing can find the notification without parsing ids.
        msg["X-Aftersales-Key"] = dedup_key
        # base64 keeps the body 7-bit clean: no reliance on the relay's 8BITMIME support.
        msg.set_content(message.body, charset="utf-8", cte="base64")
        return msg

    # ---- send ---------------------------------------------------------------------------

    def send(self, message: RenderedMessage, dedup_key: str) -> SendResult:
        if message.channel != "email":
            raise PermanentError(f"smtp channel cannot send a {message.channel} message")
        msg = self.build(message, dedup_key)
        to = mask_email(message.recipient)
        # MAIL / RCPT / DATA by hand (what sendmail does) to know when the message left us:
        # a connection lost during DATA may have delivered it, earlier it cannot have.
        in_data = False
        try:
            with self._connect() as smtp:
                if self.user:
                    smtp.login(self.user, self.password or "")
                smtp.ehlo_or_helo_if_needed()
                code, text = smtp.mail(self._from_addr)
                if code != 250:
                    raise _classify(code, text, what="MAIL FROM")
                code, text = smtp.rcpt(message.recipient)
                if code not in (250, 251):
                    raise _classify(code, text, what="RCPT")
                in_data = True
                smtp.data(msg.as_bytes())
        except NotifierError:
            raise
        except smtplib.SMTPResponseException as exc:
            # SMTPDataError, SMTPAuthenticationError, SMTPHeloError, SMTPConnectError, ...
            raise _classify(exc.smtp_code, exc.smtp_error, what=type(exc).__name__) from exc
        except smtplib.SMTPNotSupportedError as exc:
            # e.g. STARTTLS or AUTH asked for but not offered: a setting, not a hiccup.
            raise PermanentError(f"server does not support it: {exc}", code="unsupported") from exc
        except ssl.SSLCertVerificationError as exc:
            raise PermanentError(f"TLS certificate rejected: {exc}", code="tls") from exc
        except (TimeoutError, smtplib.SMTPServerDisconnected, ssl.SSLError, OSError) as exc:
            raise TransientError(
                f"{type(exc).__name__}: {exc}", code="connection", maybe_sent=in_data
            ) from exc
        except smtplib.SMTPException as exc:
            raise TransientError(
                f"{type(exc).__name__}: {exc}", code="smtp", maybe_sent=in_data
            ) from exc
        log.info("email sent to=%s key=%s", to, dedup_key)
        return SendResult(provider="smtp", provider_id=msg["Message-ID"])

    def _connect(self) -> smtplib.SMTP:
        if self.tls == "tls":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                self.host,
                self.port,
                local_hostname=self.local_hostname,
                timeout=self.timeout,
                context=self.ssl_context,
            )
        else:
            smtp = smtplib.SMTP(
                self.host, self.port, local_hostname=self.local_hostname, timeout=self.timeout
            )
        try:
            if self.tls == "starttls":
                smtp.ehlo()
                # Without STARTTLS on offer smtplib raises SMTPNotSupportedError: we never
                # fall back to sending credentials or mail in the clear.
                smtp.starttls(context=self.ssl_context)
                smtp.ehlo()
        except BaseException:
            smtp.close()
            raise
        return smtp


def _text(v: bytes | str) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _classify(code: int, text: bytes | str, *, what: str) -> NotifierError:
    msg = f"{what}: {code} {_text(text)}".strip()
    c = str(code)
    if 400 <= code < 500:
        t = _text(text)
        if code in (421, 452) or (t.startswith("4.7.") and _RATE_WORDS.search(t)) or (
            code in (450, 451) and _RATE_WORDS.search(t)
        ):
            return ThrottledError(msg, retry_after=DEFAULT_THROTTLE_RETRY_S, code=c)
        return TransientError(msg, code=c)
    if 500 <= code < 600:
        return PermanentError(msg, code=c)
    # -1 and other non-codes: smtplib's way of saying the connection broke.
    return TransientError(msg, code=c)
