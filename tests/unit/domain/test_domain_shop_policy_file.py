"""A shop policy file as its author meets it: a broken one is refused with the file, the
line and the reason; a good one keeps what it says (found unpinned by mutation testing of
shops.py: only the happy paths and the "looser" refusal were checked)."""

from __future__ import annotations

import tomllib
from datetime import date
from pathlib import Path

import pytest

from shared.domain import Kind, RuleFileError
from shared.domain.durations import Duration
from shared.domain.shops import ShopPolicyVersion, parse_shop_policy

PATH = Path("rules/shop-S1001.toml")

HEADER = """[shop_policy]
platform = "douyin"
shop_id = "S1001"
version = "v1"
effective = 2026-01-01
"""
RULE_1 = """
[[rule]]
kind = "any"
step = "merchant_response"
duration = "24h"
"""
RULE_2 = """
[[rule]]
kind = "exchange"
step = "buyer_confirm"
duration = "5d"
reminders = ["1d"]
"""
GOOD = HEADER + RULE_1 + RULE_2


def parse(text: str) -> ShopPolicyVersion:
    return parse_shop_policy(PATH, text, tomllib.loads(text), "local")


def refused(text: str) -> RuleFileError:
    with pytest.raises(RuleFileError) as info:
        parse(text)
    assert info.value.path == str(PATH)
    return info.value


def line_of(text: str, fragment: str, occurrence: int = 1) -> int:
    """1-based line of the `occurrence`-th line containing `fragment`."""
    found = [n for n, line in enumerate(text.splitlines(), start=1) if fragment in line]
    return found[occurrence - 1]


def test_a_good_policy_keeps_what_it_says() -> None:
    text = GOOD.replace('effective = 2026-01-01\n', 'effective = 2026-01-01\n'
                        'source = "店铺售后承诺"\ndescription = "faster answers"\n')
    policy = parse(text)
    assert (policy.platform, policy.shop_id, policy.version) == ("douyin", "S1001", "v1")
    assert policy.effective == date(2026, 1, 1)
    assert (policy.source, policy.description, policy.origin) == ("店铺售后承诺",
                                                                  "faster answers", "local")
    assert policy.source_file == str(PATH)
    first, second = policy.rules
    assert (first.kind, first.step, first.duration, first.reminders) == (
        "any", "merchant_response", Duration.parse("24h"), None)
    assert first.line == line_of(text, "[[rule]]")
    assert (second.kind, second.step, second.reminders) == (
        "exchange", "buyer_confirm", (Duration.parse("1d"),))
    assert second.line == line_of(text, "[[rule]]", 2)
    assert policy.find(Kind.exchange, "buyer_confirm") is second
    assert policy.find(Kind.refund_only, "merchant_response") is first
    assert policy.find(Kind.refund_only, "buyer_confirm") is None


def test_without_source_or_description_they_are_empty() -> None:
    policy = parse(GOOD)
    assert (policy.source, policy.description) == ("", "")
    assert policy.rules[0].note == ""


def test_a_shop_rule_names_the_kind_it_is_for_before_the_general_one() -> None:
    text = HEADER + RULE_1 + RULE_1.replace('"any"', '"exchange"').replace('"24h"', '"12h"')
    policy = parse(text)
    exchange, repair = (policy.find(k, "merchant_response") for k in (Kind.exchange, Kind.repair))
    assert exchange is not None and exchange.duration == Duration.parse("12h")
    assert repair is not None and repair.duration == Duration.parse("24h")


@pytest.mark.parametrize(("text", "fragment", "occurrence", "reason"), [
    (GOOD + "\n[extra]\nowner = 1\n", None, 1, "unknown top-level keys ['extra']"),
    (GOOD.replace('version = "v1"\n', 'version = "v1"\nowner = "me"\n'),
     "owner", 1, "unknown key 'owner' in [shop_policy]"),
    (GOOD.replace('shop_id = "S1001"\n', 'shop_id = ""\n'),
     "shop_id", 1, "[shop_policy] shop_id must be a non-empty string"),
    (GOOD.replace('platform = "douyin"\n', 'platform = 7\n'),
     "platform", 1, "[shop_policy] platform must be a non-empty string"),
    (GOOD.replace('version = "v1"\n', ''), None, 1,
     "[shop_policy] version must be a non-empty string"),
    (GOOD.replace('effective = 2026-01-01', 'effective = "2026-01-01"'),
     "effective", 1, "[shop_policy] effective must be a date like 2026-12-01"),
    (GOOD.replace('effective = 2026-01-01', 'effective = 2026-01-01T00:00:00'),
     "effective", 1, "[shop_policy] effective must be a date like 2026-12-01"),
    (HEADER, None, 1, "no [[rule]] tables"),
    ("rule = 3\n" + HEADER, None, 1, "no [[rule]] tables"),
    (GOOD + 'on_timeout = "auto_close"\n', "on_timeout", 1,
     "unknown key 'on_timeout' in a shop rule (a shop may only shorten a deadline: "),
    (HEADER + RULE_1 + RULE_2.replace('duration = "5d"\n', ''), "[[rule]]", 2,
     "shop rule is missing 'duration'"),
    (HEADER + RULE_1 + RULE_2.replace('"exchange"', '"gift"'), "gift", 1,
     "unknown kind 'gift'"),
    (HEADER + RULE_1 + RULE_2.replace('"buyer_confirm"', '"visit_window"'), "visit_window", 1,
     "kind exchange has no step 'visit_window'"),
    (HEADER + RULE_1 + RULE_1, "step", 2,
     "a second shop rule for kind any, step merchant_response"),
    (HEADER + RULE_1 + RULE_2.replace('"5d"', '"soon"'), "soon", 1, ""),
    (HEADER + RULE_1 + RULE_2.replace('["1d"]', '["soon"]'), "reminders", 1, ""),
    (HEADER + RULE_1 + RULE_2.replace('["1d"]', '["1wd"]'), "reminders", 1,
     "reminder offsets must be positive m/h/d durations"),
    (HEADER + RULE_1 + RULE_2.replace('["1d"]', '["0h"]'), "reminders", 1,
     "reminder offsets must be positive m/h/d durations"),
])
def test_a_broken_policy_is_refused_with_its_line_and_reason(
    text: str, fragment: str | None, occurrence: int, reason: str,
) -> None:
    error = refused(text)
    expected_line = line_of(text, fragment, occurrence) if fragment else None
    assert error.line == expected_line, str(error)
    assert error.reason.startswith(reason), str(error)
    assert str(error).startswith(f"{PATH}:{expected_line}: " if expected_line else f"{PATH}: ")


def test_a_bad_duration_names_the_duration_and_a_bad_reminder_the_reminders() -> None:
    bad_duration = refused(HEADER + RULE_1 + RULE_2.replace('"5d"', '"soon"'))
    bad_reminder = refused(HEADER + RULE_1 + RULE_2.replace('["1d"]', '["soon"]'))
    assert "soon" in bad_duration.reason and "soon" in bad_reminder.reason
    assert bad_duration.line != bad_reminder.line


def test_shop_policy_must_be_a_table() -> None:
    text = 'shop_policy = 1\n' + RULE_1
    error = refused(text)
    assert error.reason == "[shop_policy] must be a table" and error.line is None
