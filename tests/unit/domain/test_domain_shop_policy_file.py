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
from shared.domain.shops import ShopPolicyVersion, not_looser, parse_shop_policy

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


def test_an_unknown_top_level_key_is_named_at_its_line() -> None:
    error = refused("owner = 1\n" + GOOD)
    assert (error.line, error.reason) == (1, "unknown top-level keys ['owner']")


@pytest.mark.parametrize(("rule", "reason"), [
    ('"on_timeout" = "auto_close"', "unknown key 'on_timeout' in a shop rule"),
    ('"reminders" = ["soon"]', "bad duration 'soon'"),
    ('"reminders" = ["1wd"]', "reminder offsets must be positive m/h/d durations"),
])
def test_a_key_written_in_quotes_is_refused_at_its_rules_header(rule: str, reason: str) -> None:
    # The line finder does not see a quoted key: the error names the rule's [[rule]] line,
    # not another rule's line with the same key, nor no line at all.
    text = HEADER + RULE_1 + RULE_2.replace('reminders = ["1d"]', rule)
    error = refused(text)
    assert error.line == line_of(text, "[[rule]]", 2), str(error)
    assert error.reason.startswith(reason)


def test_an_error_in_one_rule_never_names_a_line_of_the_next() -> None:
    rules = [RULE_1.replace('duration = "24h"', '"duration" = "soon"'),
             RULE_2.replace('"exchange"', '"repair"').replace('"buyer_confirm"',
                                                               '"merchant_repair"'),
             RULE_2]
    text = HEADER + "".join(rules)
    error = refused(text)
    assert error.line == line_of(text, "[[rule]]", 1), str(error)


def test_rules_written_inline_are_refused_at_the_first_line() -> None:
    text = HEADER.replace("[shop_policy]\n", "rule = [{kind = \"gift\", step = \"x\", "
                          "duration = \"1h\"}]\n[shop_policy]\n")
    error = refused(text)
    assert (error.line, error.reason) == (1, "unknown kind 'gift'")
    good = parse(HEADER.replace("[shop_policy]\n", "rule = [{kind = \"any\", step = "
                                "\"merchant_response\", duration = \"1h\"}]\n[shop_policy]\n"))
    assert good.rules[0].line == 1


def test_a_rule_keeps_its_note() -> None:
    policy = parse(GOOD.replace('reminders = ["1d"]', 'reminders = ["1d"]\nnote = "承诺"'))
    assert policy.rules[1].note == "承诺"


@pytest.mark.parametrize(("shop", "platform", "allowed"), [
    ("72h", "72h", True), ("73h", "72h", False),  # both fixed: up to the same length
    ("3wd", "3wd", True), ("4wd", "3wd", False),  # both working days: up to as many
    ("3d", "3wd", True), ("4d", "3wd", False),  # N calendar days never exceed N working
    ("2wd", "72h", False),  # working days against a fixed length: may span longer
])
def test_never_looser_compares_like_with_like(shop: str, platform: str, allowed: bool) -> None:
    assert not_looser(Duration.parse(shop), Duration.parse(platform)) is allowed
