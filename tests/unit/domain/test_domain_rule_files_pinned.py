"""Rule-set files as their author and ops meet them: a broken file is refused naming the
file, the line and the reason (each refusal branch); a good one keeps every value it says;
versions that apply to running steps, shop policies and the default set behave as
docs/rules.md says (found unpinned by mutation testing of rules.py, issue 14)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from domain_support import Driver, cst, make_event, opened

from shared.domain import Engine, Kind, RuleBook, RuleFileError, RuleRef, WorkCalendar
from shared.domain.durations import Duration
from shared.domain.model import Party
from shared.domain.rules import Rule

HEADER = '[ruleset]\nname = "acme"\nversion = "v1"\neffective = 2026-01-01\n'
EXCHANGE = """
[[rule]]
id = "exchange.merchant_response"
kind = "exchange"
step = "merchant_response"
party = "merchant"
duration = "48h"
on_timeout = "auto_approve"
reminders = ["1h"]
"""
REPAIR = EXCHANGE.replace('"exchange', '"repair')
GOOD = HEADER + EXCHANGE + REPAIR


def line_of(text: str, fragment: str, occurrence: int = 1) -> int:
    """1-based line of the `occurrence`-th line containing `fragment`."""
    found = [n for n, line in enumerate(text.splitlines(), start=1) if fragment in line]
    return found[occurrence - 1]


def load(tmp_path: Path, **files: str) -> RuleBook:
    """The shipped sets with the given user files (name -> text) laid over them."""
    folder = tmp_path / "rules"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.toml").write_text(text, encoding="utf-8")
    return RuleBook.load(folder)


def refused(tmp_path: Path, text: str, name: str = "acme") -> RuleFileError:
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, **{name: text})
    assert info.value.path == str(tmp_path / "rules" / f"{name}.toml")
    return info.value


def acme(book: RuleBook) -> Rule:
    (version,) = book.versions("acme")
    return version.rules[0]


# ---- a good file keeps what it says ----------------------------------------------------------

def test_a_good_file_keeps_every_value_it_says(tmp_path: Path) -> None:
    text = HEADER.replace("effective = 2026-01-01\n", 'effective = 2026-01-01\n'
                          'source = "seed 004"\ndescription = "faster answers"\n'
                          "rejection_needs_evidence = true\nafter_sales_window = \"7d\"\n"
                          "applies_to_running = true\n") + """
[[rule]]
id = "onsite_repair.visit_scheduled"
kind = "onsite_repair"
step = "visit_scheduled"
party = "merchant"
duration = "2h"
on_timeout = "auto_refund"
reminders = ["30m", "1h"]
anchor = "visit_until"
note = "two hours after the slot"
sourced = ["party", "duration"]
"""
    book = load(tmp_path, acme=text)
    (version,) = book.versions("acme")
    assert (version.name, version.version, version.effective) == ("acme", "v1",
                                                                  date(2026, 1, 1))
    assert version.source_file == str(tmp_path / "rules" / "acme.toml")
    assert (version.source, version.description) == ("seed 004", "faster answers")
    assert version.rejection_needs_evidence is True
    assert version.after_sales_window == Duration.parse("7d")
    assert version.applies_to_running is True
    assert version.origin == "user"
    (rule,) = version.rules
    assert (rule.set_name, rule.version, rule.id) == ("acme", "v1",
                                                      "onsite_repair.visit_scheduled")
    assert (rule.kind, rule.step, rule.party) == ("onsite_repair", "visit_scheduled",
                                                  Party.merchant)
    assert (rule.duration, rule.on_timeout) == (Duration.parse("2h"), "auto_refund")
    assert rule.reminders == (Duration.parse("30m"), Duration.parse("1h"))
    assert (rule.anchor, rule.note, rule.sourced) == ("visit_until", "two hours after the slot",
                                                      ("party", "duration"))


def test_what_a_file_leaves_out_takes_its_default(tmp_path: Path) -> None:
    book = load(tmp_path, acme=HEADER + EXCHANGE.replace('reminders = ["1h"]\n', ""))
    (version,) = book.versions("acme")
    assert (version.source, version.description) == ("", "")
    assert version.rejection_needs_evidence is None  # not said: an older version's applies
    assert version.after_sales_window is None
    assert version.applies_to_running is False
    (rule,) = version.rules
    assert (rule.reminders, rule.anchor, rule.note, rule.sourced) == ((), "step_start", "", ())


def test_false_is_said_not_left_out(tmp_path: Path) -> None:
    text = HEADER + "rejection_needs_evidence = false\napplies_to_running = false\n" + EXCHANGE
    (version,) = load(tmp_path, acme=text).versions("acme")
    assert version.rejection_needs_evidence is False
    assert version.applies_to_running is False


def test_a_rule_for_any_kind_is_checked_against_the_kinds_that_have_its_step(
    tmp_path: Path,
) -> None:
    # merchant_inspection exists for return_refund and exchange only; escalate fits both
    text = HEADER + EXCHANGE.replace('"exchange.merchant_response"', '"any.merchant_inspection"'
                                     ).replace('kind = "exchange"', 'kind = "any"').replace(
        'step = "merchant_response"', 'step = "merchant_inspection"').replace(
        '"auto_approve"', '"escalate"')
    rule = acme(load(tmp_path, acme=text))
    assert (rule.kind, rule.step, rule.on_timeout) == ("any", "merchant_inspection", "escalate")
    # auto_refund fits return_refund's inspection but not exchange's: refused, naming exchange
    error = refused(tmp_path / "b", text.replace('"escalate"', '"auto_refund"'))
    assert error.line == line_of(text, "on_timeout")
    assert "exchange" in error.reason and "return_refund" not in error.reason


def test_an_explicit_step_start_anchor_is_accepted_for_any_step(tmp_path: Path) -> None:
    rule = acme(load(tmp_path, acme=HEADER + EXCHANGE + 'anchor = "step_start"\n'))
    assert rule.anchor == "step_start" and rule.is_immediate is False


def test_a_numeric_rule_id_is_kept_as_text(tmp_path: Path) -> None:
    rule = acme(load(tmp_path, acme=HEADER + EXCHANGE.replace(
        'id = "exchange.merchant_response"', "id = 7")))
    assert rule.id == "7"


# ---- every refusal names its line and reason -------------------------------------------------

@pytest.mark.parametrize(("text", "fragment", "occurrence", "reason"), [
    # top level and [ruleset]
    ("zeta = 1\nalpha = 2\n" + GOOD, "alpha", 1, "unknown top-level keys ['alpha', 'zeta']"),
    ('ruleset = "acme"\n' + EXCHANGE, None, 1, "missing the [ruleset] table"),
    (EXCHANGE, None, 1, "missing the [ruleset] table"),
    (HEADER.replace('version = "v1"\n', 'version = "v1"\nzone = 1\nowner = 2\n')
     + EXCHANGE, "owner", 1, "unknown key 'owner' in [ruleset]"),
    (HEADER.replace('name = "acme"\n', "") + EXCHANGE, None, 1,
     "[ruleset] name must be a non-empty string"),
    (HEADER.replace('name = "acme"', "name = 3") + EXCHANGE, "name", 1,
     "[ruleset] name must be a non-empty string"),
    (HEADER.replace('version = "v1"', 'version = ""') + EXCHANGE, "version", 1,
     "[ruleset] version must be a non-empty string"),
    (HEADER.replace('version = "v1"', "version = 1") + EXCHANGE, "version", 1,
     "[ruleset] version must be a non-empty string"),
    (HEADER.replace("effective = 2026-01-01\n", "") + EXCHANGE, None, 1,
     "[ruleset] effective must be a date"),
    (HEADER.replace("2026-01-01", "2026-01-01T00:00:00") + EXCHANGE, "effective", 1,
     "[ruleset] effective must be a date"),
    (HEADER + 'rejection_needs_evidence = "yes"\n' + EXCHANGE, "rejection_needs_evidence", 1,
     "[ruleset] rejection_needs_evidence must be true or false"),
    (HEADER + "rejection_needs_evidence = 1\n" + EXCHANGE, "rejection_needs_evidence", 1,
     "[ruleset] rejection_needs_evidence must be true or false"),
    (HEADER + 'after_sales_window = "a week"\n' + EXCHANGE, "after_sales_window", 1, ""),
    (HEADER + 'after_sales_window = "7wd"\n' + EXCHANGE, "after_sales_window", 1,
     "[ruleset] after_sales_window must be in m/h/d"),
    (HEADER + 'applies_to_running = "yes"\n' + EXCHANGE, "applies_to_running", 1,
     "[ruleset] applies_to_running must be true or false"),
    (HEADER, None, 1, "no [[rule]] tables"),
    ("rule = []\n" + HEADER, None, 1, "no [[rule]] tables"),
    ("rule = 3\n" + HEADER, None, 1, "no [[rule]] tables"),
    # a rule: every refusal names a line inside the broken rule
    (HEADER + EXCHANGE + REPAIR.replace('party = "merchant"\n', "").replace(
        'kind = "repair"\n', ""), "[[rule]]", 2, "rule is missing ['kind', 'party']"),
    (HEADER + EXCHANGE + REPAIR + 'zone = 1\ncolour = "red"\n', "colour", 1,
     "unknown key 'colour' in rule 'repair.merchant_response'"),
    (HEADER + EXCHANGE + REPAIR.replace('kind = "repair"', 'kind = "barter"'), "barter", 1,
     "rule 'repair.merchant_response': unknown kind 'barter'"),
    (HEADER + EXCHANGE + REPAIR.replace('"merchant_response"\n', '"visit_window"\n'),
     "visit_window", 1, "rule 'repair.merchant_response': kind repair has no step"),
    (HEADER + EXCHANGE + REPAIR.replace('"merchant_response"\n', '"merchant_inspection"\n'
                                        ).replace('kind = "repair"', 'kind = "any"'),
     "on_timeout", 2, "rule 'repair.merchant_response': unknown action 'auto_approve' for "
     "step merchant_inspection of return_refund"),
    (HEADER + EXCHANGE + REPAIR.replace('party = "merchant"', 'party = "courier"'),
     "courier", 1, "rule 'repair.merchant_response': unknown party 'courier'"),
    (HEADER + EXCHANGE + REPAIR.replace('"48h"', '"two days"'), "two days", 1, ""),
    (HEADER + EXCHANGE + REPAIR.replace('"auto_approve"', '"auto_confirm"'), "auto_confirm", 1,
     "rule 'repair.merchant_response': unknown action 'auto_confirm'"),
    (HEADER + EXCHANGE + REPAIR.replace('["1h"]', '"1h"'), "reminders", 2,
     "rule 'repair.merchant_response': reminders must be a list"),
    (HEADER + EXCHANGE + REPAIR.replace('["1h"]', '["1h", "soon"]'), "soon", 1, ""),
    (HEADER + EXCHANGE + REPAIR.replace('["1h"]', '["1h", "0m"]'), "reminders", 2,
     "rule 'repair.merchant_response': reminder offsets must be positive m/h/d durations"),
    (HEADER + EXCHANGE + REPAIR.replace('["1h"]', '["1wd"]'), "reminders", 2,
     "rule 'repair.merchant_response': reminder offsets must be positive m/h/d durations"),
    (HEADER + EXCHANGE + REPAIR + 'anchor = "visit_at"\n', "anchor", 1,
     "rule 'repair.merchant_response': anchor 'visit_at' is not available for step"),
    (HEADER + EXCHANGE + REPAIR + 'anchor = "lunch"\n', "anchor", 1,
     "rule 'repair.merchant_response': anchor 'lunch' is not available for step"),
    (HEADER + EXCHANGE + REPAIR + 'sourced = "duration"\n', "sourced", 1,
     "rule 'repair.merchant_response': sourced lists the values a platform published"),
    (HEADER + EXCHANGE + REPAIR + 'sourced = ["duration", "anchor"]\n', "sourced", 1,
     "rule 'repair.merchant_response': sourced lists the values a platform published"),
    (HEADER + EXCHANGE + EXCHANGE.replace('kind = "exchange"', 'kind = "repair"'), "id", 2,
     "duplicate rule id 'exchange.merchant_response'"),
    (HEADER + EXCHANGE + EXCHANGE.replace('id = "exchange.', 'id = "other.'), "step", 2,
     "a second rule for kind exchange, step merchant_response"),
])
def test_a_broken_file_is_refused_with_its_line_and_reason(
    tmp_path: Path, text: str, fragment: str | None, occurrence: int, reason: str,
) -> None:
    error = refused(tmp_path, text)
    expected_line = line_of(text, fragment, occurrence) if fragment else None
    assert error.line == expected_line, str(error)
    assert error.reason.startswith(reason), str(error)


def test_a_bad_duration_or_window_names_the_value(tmp_path: Path) -> None:
    assert "two days" in refused(tmp_path / "a", GOOD.replace('"48h"', '"two days"')).reason
    assert "soon" in refused(tmp_path / "b", GOOD.replace('["1h"]', '["soon"]')).reason
    window = HEADER + 'after_sales_window = "a week"\n' + EXCHANGE
    assert "a week" in refused(tmp_path / "c", window).reason


@pytest.mark.parametrize("key_line", [
    '"reminders" = ["1wd"]', '"reminders" = "1h"', '"duration" = "soon"',
    '"on_timeout" = "auto_confirm"', '"anchor" = "visit_at"',
])
def test_a_quoted_key_is_refused_at_its_rules_header_never_at_the_next_rule(
    tmp_path: Path, key_line: str,
) -> None:
    # the line finder does not see a quoted key: the error names the broken rule's
    # [[rule]] line, not the same key in the next rule
    key = key_line.split('"')[1]
    broken = "\n".join(line for line in EXCHANGE.splitlines()
                       if not line.startswith(f"{key} =")) + "\n" + key_line + "\n"
    text = HEADER + broken + REPAIR + 'anchor = "step_start"\n'
    error = refused(tmp_path, text)
    assert error.line == line_of(text, "[[rule]]", 1), str(error)


def test_an_error_in_the_middle_rule_names_a_line_inside_it(tmp_path: Path) -> None:
    middle = REPAIR.replace('"48h"', '"soon"')
    text = HEADER + EXCHANGE + middle + EXCHANGE.replace('"exchange', '"return_refund')
    error = refused(tmp_path, text)
    assert error.line == line_of(text, "soon")


def test_rules_written_inline_are_refused_at_the_first_line(tmp_path: Path) -> None:
    # no [[rule]] header to count from: the error names the file's first line
    inline = ('rule = [{id = "x", kind = "barter", step = "merchant_response", '
              'party = "merchant", duration = "1h", on_timeout = "escalate"}]\n')
    error = refused(tmp_path, inline + HEADER)
    assert error.line == 1 and "unknown kind 'barter'" in error.reason
    missing = refused(tmp_path / "b", 'rule = [{id = "x"}]\n' + HEADER)
    assert missing.line == 1 and missing.reason.startswith("rule is missing")
    good = acme(load(tmp_path / "c", acme=inline.replace("barter", "exchange") + HEADER))
    assert good.id == "x"


def test_an_unknown_key_on_the_first_line_is_named_there(tmp_path: Path) -> None:
    # an unknown top-level key on line 1 is found from line 1
    error = refused(tmp_path, "owner = 1\n" + GOOD)
    assert error.line == 1


def test_a_file_that_is_not_toml_names_its_line(tmp_path: Path) -> None:
    text = GOOD.replace('party = "merchant"', "party = merchant", 1)
    error = refused(tmp_path, text)
    assert error.line == line_of(text, "party = merchant")
    assert error.reason.startswith("not valid TOML")


def test_a_file_that_cannot_be_read_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(RuleFileError) as gone:
        RuleBook.load(missing)
    assert gone.value.path == str(missing) and gone.value.line is None
    assert gone.value.reason.startswith("cannot read")
    folder = tmp_path / "rules"
    (folder / "old.toml").mkdir(parents=True)  # a folder that looks like a rule file
    with pytest.raises(RuleFileError) as info:
        RuleBook.load(folder)
    assert info.value.path == str(folder / "old.toml") and info.value.line is None
    assert info.value.reason.startswith("cannot read")


def test_a_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "acme.toml").write_bytes(GOOD.replace("v1", "版本一").encode("gbk"))
    with pytest.raises(RuleFileError) as info:
        RuleBook.load(folder)
    assert info.value.path == str(folder / "acme.toml")


# ---- loading files: duplicates and shop policies ---------------------------------------------

def test_the_same_set_version_in_two_user_files_names_both(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, a=GOOD, b=GOOD)
    a, b = (str(tmp_path / "rules" / f"{n}.toml") for n in "ab")
    assert info.value.path == b and info.value.line is None
    assert a in info.value.reason and "acme" in info.value.reason


SHOP = """[shop_policy]
platform = "{platform}"
shop_id = "S1"
version = "{version}"
effective = {effective}

[[rule]]
kind = "{kind}"
step = "{step}"
duration = "{duration}"
"""


def shop(duration: str, *, version: str = "v1", effective: str = "2026-01-01",
         platform: str = "acme", kind: str = "any", step: str = "merchant_response") -> str:
    return SHOP.format(platform=platform, version=version, effective=effective, kind=kind,
                       step=step, duration=duration)


def test_the_same_shop_policy_version_in_two_files_names_both(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, acme=GOOD, s1=shop("24h"), s2=shop("12h"))
    one, two = (str(tmp_path / "rules" / f"{n}.toml") for n in ("s1", "s2"))
    assert info.value.path == two and info.value.line is None
    assert one in info.value.reason and "shop:acme:S1" in info.value.reason


def test_shop_policies_of_other_versions_or_shops_load_side_by_side(tmp_path: Path) -> None:
    book = load(tmp_path, acme=GOOD, s1=shop("24h"),
                s2=shop("12h", version="v2", effective="2026-06-01"),
                s3=shop("12h").replace('"S1"', '"S2"'))
    assert [(p.shop_id, p.version) for p in book.shop_policies] == [
        ("S1", "v1"), ("S1", "v2"), ("S2", "v1")]
    assert book.versions("acme")[0].origin == "user"


# ---- the default set must cover every step ---------------------------------------------------

DEFAULT_ONE = """[ruleset]
name = "default"
version = "{version}"
effective = {effective}

[[rule]]
id = "any.merchant_response"
kind = "any"
step = "merchant_response"
party = "merchant"
duration = "{duration}"
on_timeout = "auto_approve"
"""


def test_a_default_version_that_drops_steps_is_refused_naming_one(tmp_path: Path) -> None:
    text = DEFAULT_ONE.format(version="1", effective="2000-01-01", duration="48h")
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, mine=text)  # replaces the shipped default "1"
    assert info.value.path == str(tmp_path / "rules" / "mine.toml")
    assert info.value.line is None
    # the first kind's first step without a rule
    assert "refund_only" in info.value.reason and "buyer_after_rejection" in info.value.reason


def test_a_refusal_of_the_default_set_names_its_first_version(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, a=DEFAULT_ONE.format(version="1", effective="2000-01-01",
                                            duration="48h"),
             b=DEFAULT_ONE.format(version="2", effective="2020-01-01", duration="24h"))
    assert info.value.path == str(tmp_path / "rules" / "a.toml")


def test_a_later_default_version_may_change_only_some_steps(tmp_path: Path) -> None:
    book = load(tmp_path, d=DEFAULT_ONE.format(version="2", effective="2026-01-01",
                                               duration="24h"))
    before = book.rule_for("acme", Kind.repair, "merchant_response", cst(2025, 12, 31))
    after = book.rule_for("acme", Kind.repair, "merchant_response", cst(2026, 1, 1))
    open_step = book.rule_for("acme", Kind.repair, "buyer_confirm", cst(2026, 1, 1))
    assert before is not None and (before.version, before.duration.text) == ("1", "48h")
    assert after is not None and (after.version, after.duration.text) == ("2", "24h")
    assert open_step is not None and open_step.version == "1"


# ---- shop policies: never looser during their life -------------------------------------------

def acme_version(version: str, effective: str, duration: str, *, kind: str = "exchange",
                 step: str = "merchant_response", action: str = "auto_approve",
                 extra: str = "") -> str:
    return (f'[ruleset]\nname = "acme"\nversion = "{version}"\neffective = {effective}\n'
            f'{extra}\n[[rule]]\nid = "{kind}.{step}"\nkind = "{kind}"\nstep = "{step}"\n'
            f'party = "merchant"\nduration = "{duration}"\non_timeout = "{action}"\n')


def test_a_shop_is_checked_against_platform_versions_of_its_life_only(tmp_path: Path) -> None:
    # v1 of the shop lives 2026-01-01 .. 2027-01-01; acme's 24h version comes after it
    book = load(tmp_path,
                a1=acme_version("v1", "2025-01-01", "12h"),  # replaced before the shop's life
                a2=acme_version("v2", "2026-01-01", "72h"),
                a3=acme_version("v3", "2027-01-01", "24h"),
                s1=shop("48h", kind="exchange"),
                s2=shop("24h", kind="exchange", version="v2", effective="2027-01-01"))
    rule = book.rule_for("acme", Kind.exchange, "merchant_response", cst(2026, 6, 1), shop="S1")
    assert rule is not None and rule.duration.text == "48h"


def test_the_last_shop_version_is_checked_against_every_later_platform_version(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, a2=acme_version("v2", "2026-01-01", "72h"),
             a3=acme_version("v3", "2027-01-01", "24h"), s1=shop("48h", kind="exchange"))
    assert info.value.path == str(tmp_path / "rules" / "s1.toml")
    assert info.value.line == line_of(shop("48h"), "[[rule]]")
    assert "acme/v3/exchange.merchant_response" in info.value.reason


def test_a_shop_is_checked_against_the_default_set_its_platform_leaves_open(
    tmp_path: Path,
) -> None:
    # acme has no rule for repair's merchant response: the default set's applies, and a
    # later default version (24h) makes the shop's 36h looser
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, a=GOOD.replace('kind = "repair"', 'kind = "return_refund"').replace(
            '"repair.', '"return_refund.'),
             d=DEFAULT_ONE.format(version="2", effective="2026-06-01", duration="24h"),
             s1=shop("36h", kind="repair"))
    assert "default/2/any.merchant_response" in info.value.reason


def test_a_shop_rule_for_any_kind_is_checked_for_each_kind_with_its_step(
    tmp_path: Path,
) -> None:
    # merchant_inspection: return_refund and exchange have it, refund_only (first) does not
    platform = acme_version("v1", "2026-01-01", "24h", kind="exchange",
                            step="merchant_inspection", action="escalate")
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, a=platform, s1=shop("36h", step="merchant_inspection"))
    assert "acme/v1/exchange.merchant_inspection" in info.value.reason
    assert "exchange" in info.value.reason


def test_a_shop_looser_than_two_platform_versions_names_the_earlier(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError) as info:
        load(tmp_path, a1=acme_version("v1", "2026-01-01", "24h"),
             a2=acme_version("v2", "2026-06-01", "12h"), s1=shop("36h", kind="exchange"))
    assert "acme/v1/exchange.merchant_response" in info.value.reason


# ---- shop variants: found again by their reference -------------------------------------------

SHOP_TWO_RULES = SHOP.format(platform="acme", version="v1", effective="2026-01-01",
                             kind="any", step="merchant_response", duration="24h") + """
[[rule]]
kind = "repair"
step = "merchant_response"
duration = "12h"
reminders = ["3h"]
"""
ANY_RULE = acme_version("v1", "2025-01-01", "48h", kind="any").replace(
    'party = "merchant"', 'party = "merchant"\nreminders = ["30h", "12h", "2h"]')


def test_a_shop_variant_keeps_the_platform_rule_and_the_reminders_that_fit(
    tmp_path: Path,
) -> None:
    book = load(tmp_path, a=ANY_RULE, s=SHOP_TWO_RULES)
    at = cst(2026, 2, 1)
    general = book.rule_for("acme", Kind.exchange, "merchant_response", at, shop="S1")
    own = book.rule_for("acme", Kind.repair, "merchant_response", at, shop="S1")
    assert general is not None and own is not None
    assert (general.set_name, general.version, general.id) == (
        "shop:acme:S1", "v1", "acme/v1/any.merchant_response")
    assert (general.kind, general.step, general.party, general.on_timeout, general.anchor) == (
        "any", "merchant_response", Party.merchant, "auto_approve", "step_start")
    assert general.duration.text == "24h"
    # the platform's 30h reminder falls before the shop's deadline starts: dropped
    assert [r.text for r in general.reminders] == ["12h", "2h"]
    assert general.note == "shop policy of S1"
    assert (own.duration.text, [r.text for r in own.reminders]) == ("12h", ["3h"])
    assert book.get(general.ref) == general
    before = book.rule_for("acme", Kind.exchange, "merchant_response", cst(2025, 12, 31),
                           shop="S1")
    assert before is not None and before.set_name == "acme"


def test_a_shop_variant_of_a_working_day_rule_keeps_every_platform_reminder(
    tmp_path: Path,
) -> None:
    platform = ANY_RULE.replace('"48h"', '"5wd"')
    book = load(tmp_path, a=platform, s=shop("3wd"))
    rule = book.rule_for("acme", Kind.exchange, "merchant_response", cst(2026, 2, 1), shop="S1")
    assert rule is not None and [r.text for r in rule.reminders] == ["30h", "12h", "2h"]


def test_a_shop_note_replaces_the_generic_one(tmp_path: Path) -> None:
    book = load(tmp_path, a=ANY_RULE, s=shop("24h") + 'note = "承诺 24 小时"\n')
    rule = book.rule_for("acme", Kind.exchange, "merchant_response", cst(2026, 2, 1), shop="S1")
    assert rule is not None and rule.note == "承诺 24 小时"


def test_a_shop_variant_for_one_kind_of_a_general_platform_rule_is_found_again(
    tmp_path: Path,
) -> None:
    book = load(tmp_path, a=ANY_RULE, s=shop("24h", kind="repair"))
    rule = book.rule_for("acme", Kind.repair, "merchant_response", cst(2026, 2, 1), shop="S1")
    assert rule is not None and rule.set_name == "shop:acme:S1"
    assert book.get(rule.ref) == rule


def test_a_shop_variant_of_a_rule_whose_id_has_a_slash_is_found_again(tmp_path: Path) -> None:
    platform = ANY_RULE.replace('id = "any.merchant_response"', 'id = "answer/any"')
    book = load(tmp_path, a=platform, s=shop("24h"))
    rule = book.rule_for("acme", Kind.exchange, "merchant_response", cst(2026, 2, 1), shop="S1")
    assert rule is not None and rule.id == "acme/v1/answer/any"
    assert book.get(rule.ref) == rule


@pytest.mark.parametrize("ref", [
    RuleRef("shop:acme:S1", "v1", "acme/v1"),  # does not name a platform rule
    RuleRef("shop:acme:S1", "v9", "acme/v1/any.merchant_response"),  # no such shop version
    RuleRef("shop:acme:S9", "v1", "acme/v1/any.merchant_response"),  # no such shop
    RuleRef("shop:acme:S1", "v1", "acme/v1/exchange.merchant_response"),  # no such rule
    RuleRef("shop:acme:S1", "v1", "acme/v1/any.buyer_confirm/x"),  # no such rule
])
def test_a_reference_to_no_shop_variant_finds_nothing(tmp_path: Path, ref: RuleRef) -> None:
    book = load(tmp_path, a=ANY_RULE, s=shop("24h"))
    assert book.get(ref) is None


def test_a_reference_to_a_platform_rule_the_shop_does_not_shorten_finds_nothing(
    tmp_path: Path,
) -> None:
    platform = ANY_RULE + ('\n[[rule]]\nid = "any.buyer_confirm"\nkind = "any"\n'
                           'step = "buyer_confirm"\nparty = "buyer"\nduration = "7d"\n'
                           'on_timeout = "auto_confirm"\n')
    book = load(tmp_path, a=platform, s=shop("24h"))
    assert book.get(RuleRef("shop:acme:S1", "v1", "acme/v1/any.buyer_confirm")) is None
    assert book.get(RuleRef("acme", "v1", "any.buyer_confirm")) is not None
    assert book.get(RuleRef("acme", "v2", "any.buyer_confirm")) is None


def test_a_shop_rule_for_one_kind_beside_a_general_one_is_found_again(tmp_path: Path) -> None:
    book = load(tmp_path, a=ANY_RULE, s=SHOP_TWO_RULES)
    own = book.rule_for("acme", Kind.repair, "merchant_response", cst(2026, 2, 1), shop="S1")
    assert own is not None and own.duration.text == "12h"
    engine = Engine(book, WorkCalendar())
    at = cst(2026, 2, 1, 10)
    event = replace(make_event("case.opened", at, platform="acme", **opened("repair")),
                    shop_id="S1")
    specs = engine.apply(None, event, at).deadlines or ()
    deadline = next(s for s in specs if s.purpose == "deadline")
    reminders = [s.due_at for s in specs if s.purpose == "reminder"]
    assert deadline.due_at == at + timedelta(hours=12)
    assert reminders == [at + timedelta(hours=9)]  # the repair rule's 3h reminder


# ---- versions that apply to running steps ----------------------------------------------------

RUNNING = "applies_to_running = true\n"


def running_book(tmp_path: Path, **files: str) -> RuleBook:
    return load(tmp_path, v1=acme_version("v1", "2026-01-01", "48h"), **files)


def switch(book: RuleBook, started: datetime, until: datetime, current: RuleRef | None = None,
           kind: Kind = Kind.exchange, shop: str | None = None,
           ) -> tuple[str, str, datetime] | None:
    rule = book.rule_for("acme", kind, "merchant_response", started, shop)
    found = book.running_switch("acme", kind, "merchant_response", started,
                                current or (rule.ref if rule else None), until, shop)
    return None if found is None else (found[0].set_name, found[0].version, found[1])


def test_a_running_version_takes_over_from_its_effective_moment(tmp_path: Path) -> None:
    book = running_book(tmp_path, v2=acme_version("v2", "2026-06-01", "24h", extra=RUNNING))
    started = cst(2026, 5, 31, 12)
    assert switch(book, started, cst(2026, 6, 1)) == ("acme", "v2", cst(2026, 6, 1))
    assert switch(book, started, cst(2026, 6, 1) - timedelta(seconds=1)) is None
    # a step that began at the very moment already has the version
    assert switch(book, cst(2026, 6, 1), cst(2026, 6, 2)) is None
    assert book.switch_moments == [cst(2026, 6, 1)]


def test_a_step_already_on_the_running_version_keeps_it(tmp_path: Path) -> None:
    book = running_book(tmp_path, v2=acme_version("v2", "2026-06-01", "24h", extra=RUNNING))
    on_v2 = RuleRef("acme", "v2", "exchange.merchant_response")
    assert switch(book, cst(2026, 5, 31), cst(2026, 6, 2), current=on_v2) is None


def test_of_two_running_versions_the_newest_takes_over(tmp_path: Path) -> None:
    book = running_book(tmp_path,
                        v2=acme_version("v2", "2026-06-01", "24h", extra=RUNNING),
                        v3=acme_version("v3", "2026-07-01", "12h", extra=RUNNING))
    assert switch(book, cst(2026, 5, 31), cst(2026, 7, 2)) == ("acme", "v3", cst(2026, 7, 1))
    assert switch(book, cst(2026, 5, 31), cst(2026, 6, 2)) == ("acme", "v2", cst(2026, 6, 1))


def test_a_running_version_without_a_rule_for_the_step_brings_no_switch(
    tmp_path: Path,
) -> None:
    # v2 (no flag) changes the step; v3 (flag) changes another step only: at v3's moment
    # the step's rule is v2's, which did not say it applies to running steps
    book = running_book(tmp_path,
                        v2=acme_version("v2", "2026-03-01", "24h"),
                        v3=acme_version("v3", "2026-06-01", "24h", kind="repair",
                                        extra=RUNNING))
    assert switch(book, cst(2026, 2, 1), cst(2026, 7, 1)) is None


def test_a_running_version_takes_over_at_its_own_moment_not_a_later_ones(
    tmp_path: Path,
) -> None:
    book = running_book(tmp_path,
                        v2=acme_version("v2", "2026-03-01", "24h", extra=RUNNING),
                        v3=acme_version("v3", "2026-06-01", "24h", kind="repair",
                                        extra=RUNNING))
    assert switch(book, cst(2026, 2, 1), cst(2026, 7, 1)) == ("acme", "v2", cst(2026, 3, 1))


def test_a_running_default_version_takes_over_a_step_the_platform_leaves_open(
    tmp_path: Path,
) -> None:
    book = running_book(tmp_path, d=DEFAULT_ONE.format(
        version="2", effective="2026-06-01", duration="24h").replace(
        'version = "2"', 'version = "2"\n' + RUNNING))
    assert switch(book, cst(2026, 5, 31), cst(2026, 6, 2), kind=Kind.repair) == (
        "default", "2", cst(2026, 6, 1))
    # the platform's own rule for exchange stays
    assert switch(book, cst(2026, 5, 31), cst(2026, 6, 2)) is None


def test_a_running_version_takes_over_a_shop_variant_with_its_own(tmp_path: Path) -> None:
    book = running_book(tmp_path, v2=acme_version("v2", "2026-06-01", "36h", extra=RUNNING),
                        s=shop("30h", kind="exchange"))
    found = book.running_switch(
        "acme", Kind.exchange, "merchant_response", cst(2026, 5, 31),
        RuleRef("shop:acme:S1", "v1", "acme/v1/exchange.merchant_response"), cst(2026, 6, 2),
        shop="S1")
    assert found is not None
    rule, moment = found
    assert (rule.set_name, rule.id, rule.duration.text) == (
        "shop:acme:S1", "acme/v2/exchange.merchant_response", "30h")
    assert moment == cst(2026, 6, 1)


# the default set's version 2 (36h), effective 2026-06-01, applying to running steps
RUNNING_DEFAULT_V2 = DEFAULT_ONE.format(version="2", effective="2026-06-01", duration="36h"
                                        ).replace('version = "2"', 'version = "2"\n' + RUNNING)


def test_a_version_without_the_flag_taking_effect_with_a_running_one_is_not_switched(
    tmp_path: Path,
) -> None:
    # the default set's running version and acme's v2 (no flag) take effect together: the
    # step's rule is then acme v2's, which does not apply to running steps
    book = running_book(tmp_path, d=RUNNING_DEFAULT_V2,
                        v2=acme_version("v2", "2026-06-01", "24h"))
    assert switch(book, cst(2026, 5, 31), cst(2026, 6, 2)) is None


def test_a_shop_policy_arriving_with_a_running_default_version_is_not_switched_to(
    tmp_path: Path,
) -> None:
    # the step began on acme v1 before the shop had a policy; at the default set's running
    # version the step's rule is the shop's variant of acme v1, which is no running version
    book = running_book(tmp_path, d=RUNNING_DEFAULT_V2,
                        s=shop("30h", kind="exchange", effective="2026-06-01"))
    started = cst(2026, 5, 31)
    current = book.rule_for("acme", Kind.exchange, "merchant_response", started, "S1")
    assert current is not None and current.set_name == "acme"
    assert switch(book, started, cst(2026, 6, 2), shop="S1") is None


def test_a_running_version_moves_a_running_case_end_to_end(tmp_path: Path) -> None:
    from shared.domain.recompute import switch_running

    book = running_book(tmp_path, v2=acme_version("v2", "2026-06-01", "24h", extra=RUNNING))
    driver = Driver(Engine(book, WorkCalendar()), platform="acme")
    driver.open("exchange", cst(2026, 5, 31, 12))
    assert driver.case is not None
    moved = switch_running(driver.engine, driver.case, cst(2026, 6, 1, 8))
    assert moved is not None and moved.new_due_at == cst(2026, 6, 1, 12)


def test_options_fall_back_to_older_versions_and_the_default_set(tmp_path: Path) -> None:
    book = running_book(tmp_path, v2=acme_version(
        "v2", "2026-06-01", "24h", extra="rejection_needs_evidence = true\n"))
    assert book.option("acme", "rejection_needs_evidence", cst(2026, 6, 1)) is True
    assert book.option("acme", "rejection_needs_evidence", cst(2026, 5, 31)) is None
    assert book.option("acme", "after_sales_window", datetime(2026, 7, 1, tzinfo=UTC)) is None


def test_a_file_cut_short_names_its_last_line(tmp_path: Path) -> None:
    text = GOOD + "note ="
    error = refused(tmp_path, text)
    assert error.line == len(text.splitlines())
    assert error.reason.startswith("not valid TOML")


# ---- looking up sets, rules and options that are not there -----------------------------------

def test_a_platform_without_a_set_takes_the_default_sets_options(tmp_path: Path) -> None:
    book = load(tmp_path, d=DEFAULT_ONE.format(version="2", effective="2026-06-01",
                                               duration="48h").replace(
        'version = "2"', 'version = "2"\nafter_sales_window = "15d"'))
    window = book.option("nowhere", "after_sales_window", cst(2026, 6, 1))
    assert window == Duration.parse("15d")
    assert book.versions("nowhere") == []
    assert book.get(RuleRef("nowhere", "1", "any.merchant_response")) is None
    assert book.get(RuleRef("default", "1", "no.such.rule")) is None
    found = book.get(RuleRef("default", "1", "any.merchant_response"))
    assert found is not None and found.version == "1"


def test_a_shop_policy_applies_from_its_effective_moment_and_to_its_steps_only(
    tmp_path: Path,
) -> None:
    book = load(tmp_path, a=ANY_RULE, s=shop("24h"))
    start = book.rule_for("acme", Kind.exchange, "merchant_response", cst(2026, 1, 1), "S1")
    assert start is not None and start.set_name == "shop:acme:S1"
    other_step = book.rule_for("acme", Kind.exchange, "buyer_confirm", cst(2026, 2, 1), "S1")
    assert other_step is not None and other_step.set_name == "default"
    (policy,) = book.shop_policies
    assert policy.origin == "user"


def test_a_bad_sourced_list_in_the_second_rule_names_its_line(tmp_path: Path) -> None:
    text = (HEADER + EXCHANGE + 'sourced = ["duration"]\n' + REPAIR
            + 'sourced = ["anchor"]\n')
    error = refused(tmp_path, text)
    assert error.line == line_of(text, "sourced", 2)


def test_a_shop_variant_of_a_kinds_own_platform_rule_is_found_again(tmp_path: Path) -> None:
    # the platform rule is for exchange only; the shop also shortens refund_only's step
    policy = shop("24h", kind="exchange") + ('\n[[rule]]\nkind = "refund_only"\n'
                                             'step = "merchant_response"\nduration = "12h"\n')
    book = load(tmp_path, a=acme_version("v1", "2026-01-01", "48h"), s=policy)
    rule = book.rule_for("acme", Kind.exchange, "merchant_response", cst(2026, 2, 1), "S1")
    assert rule is not None and rule.duration.text == "24h"
    assert book.get(rule.ref) == rule


def test_a_shop_rule_for_one_kind_is_held_to_that_kinds_platform_rule_only(
    tmp_path: Path,
) -> None:
    # 60h is within acme's 72h for exchange, though beyond the default 48h of other kinds
    book = load(tmp_path, a=acme_version("v1", "2026-01-01", "72h"),
                s=shop("60h", kind="exchange"))
    rule = book.rule_for("acme", Kind.exchange, "merchant_response", cst(2026, 2, 1), "S1")
    assert rule is not None and rule.duration.text == "60h"


def test_a_shop_on_a_platform_without_a_set_is_held_to_the_default_set(tmp_path: Path) -> None:
    book = load(tmp_path, s=shop("24h", platform="nowhere"))
    rule = book.rule_for("nowhere", Kind.exchange, "merchant_response", cst(2026, 2, 1), "S1")
    assert rule is not None and (rule.set_name, rule.duration.text) == ("shop:nowhere:S1",
                                                                        "24h")
    with pytest.raises(RuleFileError) as info:
        load(tmp_path / "b", s=shop("72h", platform="nowhere"))
    assert "default/1/any.merchant_response" in info.value.reason


def test_each_shop_version_is_checked_until_the_next_one_only(tmp_path: Path) -> None:
    # shop v1 lives 2026 only; acme's 24h version comes in 2027-06, under shop v2
    book = load(tmp_path,
                a2=acme_version("v2", "2026-01-01", "72h"),
                a3=acme_version("v3", "2027-06-01", "24h"),
                s1=shop("48h", kind="exchange"),
                s2=shop("24h", kind="exchange", version="v2", effective="2027-01-01"),
                s3=shop("12h", kind="exchange", version="v3", effective="2028-01-01"))
    assert [p.version for p in book.shop_policies] == ["v1", "v2", "v3"]


def test_a_running_default_version_reaches_a_platform_without_a_set(tmp_path: Path) -> None:
    book = load(tmp_path, d=DEFAULT_ONE.format(
        version="2", effective="2026-06-01", duration="24h").replace(
        'version = "2"', 'version = "2"\n' + RUNNING))
    current = RuleRef("default", "1", "any.merchant_response")
    found = book.running_switch("nowhere", Kind.exchange, "merchant_response",
                                cst(2026, 5, 31), current, cst(2026, 6, 2))
    assert found is not None and (found[0].version, found[1]) == ("2", cst(2026, 6, 1))


def test_a_running_version_switches_a_shop_variant_of_a_rule_whose_id_has_a_slash(
    tmp_path: Path,
) -> None:
    slash = 'id = "answer/exchange"'
    book = running_book(tmp_path, v2=acme_version("v2", "2026-06-01", "36h", extra=RUNNING)
                        .replace('id = "exchange.merchant_response"', slash),
                        s=shop("30h", kind="exchange"))
    current = RuleRef("shop:acme:S1", "v1", "acme/v1/exchange.merchant_response")
    found = book.running_switch("acme", Kind.exchange, "merchant_response", cst(2026, 5, 31),
                                current, cst(2026, 6, 2), shop="S1")
    assert found is not None and found[0].id == "acme/v2/answer/exchange"


def test_a_step_on_the_newest_running_version_stays_on_it(tmp_path: Path) -> None:
    from shared.domain.recompute import switch_running

    book = load(tmp_path, v1=acme_version("v1", "2026-01-01", "30d"),
                v2=acme_version("v2", "2026-03-01", "20d", extra=RUNNING),
                v3=acme_version("v3", "2026-03-05", "25d", extra=RUNNING))
    engine = Engine(book, WorkCalendar())
    driver = Driver(engine, platform="acme")
    driver.open("exchange", cst(2026, 2, 25))
    assert driver.case is not None
    first = switch_running(engine, driver.case, cst(2026, 3, 6))  # a timer start after both
    assert first is not None and first.case.rule_version == "v3"
    again = switch_running(engine, first.case, cst(2026, 3, 7))  # the next timer start
    assert again is None, again.case.rule_version


def test_an_install_without_the_default_set_is_refused_naming_the_shipped_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared.domain import rules

    broken = [f for f in rules.shipped_files() if f.name != "default.toml"]
    monkeypatch.setattr(rules, "shipped_files", lambda: broken)
    with pytest.raises(RuleFileError) as info:
        RuleBook.load(None)
    assert (info.value.path, info.value.line) == ("shared/rules", None)
    assert '"default"' in info.value.reason


# ---- the shop variant's kind mark (fixes of the bugs above) ------------------------------------

def test_a_rule_id_with_the_shop_kind_mark_is_refused_at_its_line(tmp_path: Path) -> None:
    text = acme_version("v1", "2026-01-01", "48h").replace(
        'id = "exchange.merchant_response"', 'id = "exchange#merchant_response"')
    error = refused(tmp_path, text)
    assert error.line == line_of(text, 'id = "exchange#merchant_response"')
    assert "#" in error.reason


def test_a_reference_written_before_the_kind_mark_still_finds_the_kinds_variant(
        tmp_path: Path) -> None:
    # A case stored before the fix names the shop variant of a general platform rule
    # without `#kind`; with only a kind's shop rule, it is that one.
    book = load(tmp_path, a=ANY_RULE, s=shop("24h", kind="repair"))
    old = book.get(RuleRef("shop:acme:S1", "v1", "acme/v1/any.merchant_response"))
    assert old is not None and old.duration.text == "24h"
    rule = book.rule_for("acme", Kind.repair, "merchant_response", cst(2026, 2, 1), shop="S1")
    assert rule is not None and rule.id == "acme/v1/any.merchant_response#repair"
    assert book.get(RuleRef("shop:acme:S1", "v1", "acme/v1/any.merchant_response#refund")) is None


def test_a_running_general_version_switches_a_shop_rule_for_one_kind(tmp_path: Path) -> None:
    # The shop shortens a general platform rule for repair only: its variant's id carries
    # the kind mark, and a running platform version still takes it over.
    book = load(tmp_path, v1=acme_version("v1", "2026-01-01", "48h", kind="any"),
                v2=acme_version("v2", "2026-06-01", "36h", kind="any", extra=RUNNING),
                s=shop("30h", kind="repair"))
    current = RuleRef("shop:acme:S1", "v1", "acme/v1/any.merchant_response#repair")
    assert book.get(current) is not None
    found = book.running_switch("acme", Kind.repair, "merchant_response", cst(2026, 5, 31),
                                current, cst(2026, 6, 2), shop="S1")
    assert found is not None
    assert (found[0].id, found[0].duration.text, found[1]) == (
        "acme/v2/any.merchant_response#repair", "30h", cst(2026, 6, 1))
