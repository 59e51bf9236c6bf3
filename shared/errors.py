"""The one error tree, and the one rule that tells a retry from a verdict.

    AftersalesError                 (shared.domain.errors: the domain imports no infrastructure)
    ├── ConfigError                 a setting or data file is unusable: stop at start
    │   ├── DataFileError           (RuleFileError, HolidayFileError)
    │   └── MappingError            (services.gateway.mapping: a platform mapping file)
    ├── InvalidInput                this input can never be handled: its verdict is "rejected"
    │   └── ActionError             (services.ops.actions: an ops action that does not apply)
    ├── Transient                   a dependency is away or busy: the same work, retried, can pass
    └── Permanent                   retrying cannot help: record the failure and move on

Services raise these (or their own subclasses, e.g. the notifier's send errors) at their
boundaries. `is_transient` is the only place that decides whether a failure is worth
retrying: Dramatiq actors turn a transient failure into `dramatiq.Retry` and list the
permanent categories in `throws=` (shared.worker.batch_actor); loops that retry a batch
themselves (intake, the notifier's sender) ask it too.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared.domain.errors import AftersalesError, ConfigError

__all__ = [
    "NOT_RETRIED",
    "AftersalesError",
    "ConfigError",
    "InvalidInput",
    "Permanent",
    "Transient",
    "is_transient",
]


class InvalidInput(AftersalesError):
    """An input that can never be handled as it is (a request naming no case, an action
    that does not apply): the caller gets a verdict, not a retry."""


class Transient(AftersalesError):
    """A dependency hiccup (connection lost, restart, deadlock, a provider's 5xx): the same
    work can pass when retried."""


class Permanent(AftersalesError):
    """Retrying cannot help (a missing row that must exist, a provider refusing for good)."""


# What an actor never retries (Dramatiq `throws=`): the failure is recorded instead.
NOT_RETRIED: tuple[type[Exception], ...] = (Permanent, InvalidInput, ConfigError)

# PostgreSQL errors (psycopg class names) that end a transaction without saying anything
# about its data: a deadlock, a serialization failure, a restart, and statement_timeout /
# lock_timeout cancelling a statement that waited too long.
_TRANSIENT_PG_ERRORS = frozenset({
    "DeadlockDetected", "SerializationFailure", "AdminShutdown", "CannotConnectNow",
    "QueryCanceled", "LockNotAvailable",
})


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same work can succeed: our `Transient` errors, and PostgreSQL
    unreachable, restarting, deadlocked or timing out (lost connections, restarts and
    deadlocks are worth retrying the whole batch). A data error (a value PostgreSQL
    refuses) or a bug is about the work itself: retrying would fail the same way."""
    if isinstance(exc, Transient):
        return True
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(
            exc, (OperationalError, InterfaceError)
        ) or type(exc.orig).__name__ in _TRANSIENT_PG_ERRORS
    return False
