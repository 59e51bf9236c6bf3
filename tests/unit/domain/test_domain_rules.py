"""Rule files: loading, errors that name file and line, selection by platform and date."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from domain_support import Driver, cst

from shared.domain import Engine, Kind, RuleBook, RuleFileError, RuleRef, WorkCalendar

SHIPPED = Path(__file__).resolve().parents[3] / "shared" / "rules"

GOOD_RULE = """
[[rule]]
id = "exchange.merchant_response"
kind = "exchange"
step = "merchant_response"
party = "merchant"
duration = "{duration}"
on_timeout = "auto_approve"
reminders = ["1h"]
"""


def _set_file(name: str, version: str, effective: str, *rules: str) -> str:
    header = f'[ruleset]\nname = "{name}"\nversion = "{version}"\neffective = {effective}\n'
    return header + "".join(rules)


def _book_folder(tmp_path: Path, **files: str) -> Path:
    """A folder with the shipped default set plus the given files."""
    folder = tmp_path / "rules"
    folder.mkdir()
    shutil.copy(SHIPPED / "default.toml", folder / "default.toml")
    for filename, text in files.items():
        (folder / f"{filename}.toml").write_text(text, encoding="utf-8")
    return folder


def test_shipped_sets_load_with_kuaishou_versions() -> None:
    book = RuleBook.load(None)
    assert book.set_names == ["default", "douyin", "jd", "kuaishou", "pinduoduo", "taobao",
                              "wechat"]
    assert [v.version for v in book.versions("kuaishou")] == ["2022-09-30", "2022-12-22"]


def test_platform_set_wins_and_default_fills_the_gaps() -> None:
    book = RuleBook.load(None)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    exchange = book.rule_for("kuaishou", Kind.exchange, "merchant_response", at)
    refund = book.rule_for("kuaishou", Kind.refund_only, "merchant_response", at)
    unknown_platform = book.rule_for("acmeshop", Kind.exchange, "merchant_response", at)
    assert exchange is not None and exchange.ref.set == "kuaishou"
    assert refund is not None and refund.ref == RuleRef("default", "1", "any.merchant_response")
    assert unknown_platform is not None and unknown_platform.ref.set == "default"


def test_rule_version_in_force_when_the_step_began(tmp_path: Path) -> None:
    folder = _book_folder(
        tmp_path,
        v1=_set_file("acme", "v1", "2026-01-01", GOOD_RULE.format(duration="48h")),
        v2=_set_file("acme", "v2", "2026-06-01", GOOD_RULE.format(duration="24h")),
    )
    engine = Engine(RuleBook.load(folder), WorkCalendar())
    before, after = Driver(engine, platform="acme"), Driver(engine, platform="acme")
    before.open("exchange", cst(2026, 5, 31, 23, 59))
    after.open("exchange", cst(2026, 6, 1, 0, 0))  # effective from 00:00 China time
    assert before.deadline.rule == RuleRef("acme", "v1", "exchange.merchant_response")
    assert before.due_local() == cst(2026, 6, 2, 23, 59)
    assert after.deadline.rule == RuleRef("acme", "v2", "exchange.merchant_response")
    assert after.due_local() == cst(2026, 6, 2, 0, 0)
    # before any version of the set was effective, the default set applies
    early = Driver(engine, platform="acme")
    early.open("exchange", cst(2025, 12, 31, 12))
    assert early.deadline.rule.set == "default"


def test_a_case_keeps_the_version_of_its_step_across_a_later_version(tmp_path: Path) -> None:
    folder = _book_folder(
        tmp_path,
        v1=_set_file("acme", "v1", "2026-01-01", GOOD_RULE.format(duration="48h")),
        v2=_set_file("acme", "v2", "2026-06-01", GOOD_RULE.format(duration="24h")),
    )
    engine = Engine(RuleBook.load(folder), WorkCalendar())
    driver = Driver(engine, platform="acme")
    driver.open("exchange", cst(2026, 5, 31, 12))
    driver.send("intervention.requested", cst(2026, 6, 1, 12))
    driver.send("intervention.resolved", cst(2026, 6, 3, 12), outcome="resume")
    assert driver.deadline.rule.version == "v1"


def test_a_user_file_overlays_the_shipped_sets_without_dropping_any(tmp_path: Path) -> None:
    shipped = RuleBook.load(None)
    single = tmp_path / "acme.toml"
    single.write_text(_set_file("acme", "v1", "2026-01-01", GOOD_RULE.format(duration="48h")))
    book = RuleBook.load(single)
    assert set(book.set_names) == set(shipped.set_names) | {"acme"}
    for name in shipped.set_names:  # every shipped version is still there, unchanged
        assert book.versions(name) == shipped.versions(name)
    (acme,) = book.versions("acme")
    assert (acme.origin, acme.overrides) == ("user", "")


def test_a_user_version_replaces_the_shipped_one_of_the_same_name_and_version(
    tmp_path: Path,
) -> None:
    text = (SHIPPED / "kuaishou-2022-09-30.toml").read_text(encoding="utf-8")
    (tmp_path / "k.toml").write_text(text.replace('duration = "48h"', 'duration = "36h"', 1))
    book = RuleBook.load(tmp_path)
    old, new = book.versions("kuaishou")
    assert (new.version, new.origin, new.overrides) == (
        "2022-12-22", "shipped", "")  # the other shipped version stays
    assert (old.version, old.origin) == ("2022-09-30", "user")
    assert old.overrides.endswith("kuaishou-2022-09-30.toml")
    rule = book.rule_for("kuaishou", Kind.exchange, "merchant_response",
                         datetime(2026, 1, 1, tzinfo=UTC))
    assert rule is not None and rule.duration.text == "36h"


def _error(tmp_path: Path, text: str) -> RuleFileError:
    folder = _book_folder(tmp_path, broken=text)
    with pytest.raises(RuleFileError) as info:
        RuleBook.load(folder)
    return info.value


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = _set_file("acme", "v1", "2026-01-01", GOOD_RULE.format(duration="48h"))
    text = text.replace('party = "merchant"', "party = merchant")
    error = _error(tmp_path, text)
    assert error.path.endswith("broken.toml")
    assert error.line == 10 and "not valid TOML" in str(error)
    assert str(error).startswith(f"{error.path}:10: ")


@pytest.mark.parametrize(("bad", "good", "key", "reason"), [
    ('on_timeout = "auto_approve"', 'on_timeout = "auto_explode"', "on_timeout",
     "unknown action 'auto_explode'"),
    ('duration = "48h"', 'duration = "48 hours"', "duration", "bad duration"),
    ('kind = "exchange"', 'kind = "barter"', "kind", "unknown kind"),
    ('step = "merchant_response"', 'step = "visit_window"', "step", "has no step"),
    ('party = "merchant"', 'party = "courier"', "party", "unknown party"),
    ('reminders = ["1h"]', 'reminders = ["1wd"]', "reminders", "reminder offsets"),
    ('reminders = ["1h"]', 'remind = ["1h"]', "remind", "unknown key 'remind'"),
])
def test_semantic_error_names_file_line_and_reason(tmp_path: Path, bad: str, good: str,
                                                   key: str, reason: str) -> None:
    second = GOOD_RULE.format(duration="48h").replace("exchange.", "exchange2.").replace(
        '"exchange"', '"return_refund"')
    text = _set_file("acme", "v1", "2026-01-01", second, GOOD_RULE.format(duration="48h"))
    text_lines = text.splitlines()
    # break the second rule (the first one is fine), so the line must be found in its block
    target = max(i for i, line in enumerate(text_lines) if line == bad)
    text_lines[target] = good
    error = _error(tmp_path, "\n".join(text_lines) + "\n")
    assert error.line == target + 1, str(error)
    assert reason in str(error)
    assert str(error).startswith(f"{error.path}:{target + 1}: ")


def test_default_set_must_cover_every_step(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "default.toml").write_text(
        _set_file("default", "1", "2000-01-01", GOOD_RULE.format(duration="48h")),
        encoding="utf-8")
    with pytest.raises(RuleFileError, match="has no rule for kind"):
        RuleBook.load(folder)


def test_duplicate_set_version_is_refused(tmp_path: Path) -> None:
    text = _set_file("acme", "v1", "2026-01-01", GOOD_RULE.format(duration="48h"))
    folder = _book_folder(tmp_path, a=text, b=text)
    with pytest.raises(RuleFileError, match="also defined"):
        RuleBook.load(folder)


def test_missing_ruleset_header_is_refused(tmp_path: Path) -> None:
    error = _error(tmp_path, GOOD_RULE.format(duration="48h"))
    assert "[ruleset]" in str(error)
