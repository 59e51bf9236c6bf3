"""How a send failed, classified so the caller knows whether and when to try again.

- ThrottledError: the provider (or a limit of ours) said "not now"; retry after `retry_after`.
- TransientSendError: a hiccup (connection, 5xx, timeout); retry with capped backoff.
- PermanentSendError: retrying cannot help (bad number, unknown template, auth); record, stop.

Each also sits in the project's categories (shared.errors: `Transient`, `Permanent`), so a
boundary that only knows those (a Dramatiq actor's `throws=`) treats them right.
"""

from __future__ import annotations

from shared.errors import AftersalesError, Permanent, Transient


class SendError(AftersalesError):
    """Root of the notifier's send errors. `code` is the provider's / server's own code."""

    kind = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


class ThrottledError(SendError, Transient):
    """Rate limited. `retry_after` (seconds) is the provider's hint, None when it gave none."""

    kind = "throttled"

    def __init__(
        self, message: str, *, retry_after: float | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class TransientSendError(SendError, Transient):
    """`maybe_sent`: the request left us and no answer came back (read timeout, connection
    dropped during SMTP DATA). The provider may have accepted it, so a retry could make a
    person get the message twice; the delivery policy does not retry these by default."""

    kind = "transient"

    def __init__(self, message: str, *, code: str | None = None, maybe_sent: bool = False
                 ) -> None:
        super().__init__(message, code=code)
        self.maybe_sent = maybe_sent


class PermanentSendError(SendError, Permanent):
    kind = "permanent"
