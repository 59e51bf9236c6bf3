"""The pure domain core: case state machine, rule sets, business calendar, money.

No I/O except reading rule and holiday files at start-up. See docs/design.md for the API
and docs/rules.md for the flows and rule sets.
"""

from shared.domain.calendar import WorkCalendar
from shared.domain.engine import Engine, decision_key, facts_of
from shared.domain.errors import (
    AftersalesError,
    ConfigError,
    HolidayFileError,
    RuleFileError,
)
from shared.domain.model import (
    CLOSED,
    OPEN,
    Case,
    DeadlineSpec,
    Decision,
    Event,
    Kind,
    Notice,
    Outcome,
    Party,
    RuleRef,
    StepResult,
    decision_id,
    seconds_to_resolution,
)
from shared.domain.rules import Rule, RuleBook, RuleSetVersion

__all__ = [
    "CLOSED",
    "OPEN",
    "AftersalesError",
    "Case",
    "ConfigError",
    "DeadlineSpec",
    "Decision",
    "Engine",
    "Event",
    "HolidayFileError",
    "Kind",
    "Notice",
    "Outcome",
    "Party",
    "Rule",
    "RuleBook",
    "RuleFileError",
    "RuleRef",
    "RuleSetVersion",
    "StepResult",
    "WorkCalendar",
    "decision_id",
    "decision_key",
    "facts_of",
    "seconds_to_resolution",
]
