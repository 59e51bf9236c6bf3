from __future__ import annotations

from pathlib import Path

from shared.domain import RuleBook
from shared.domain.ruledoc import render_rules_markdown

DOC = Path(__file__).resolve().parents[3] / "docs" / "rules.md"


def test_docs_rules_md_is_up_to_date_with_the_rule_files() -> None:
    expected = render_rules_markdown(RuleBook.load(None))
    assert DOC.read_text(encoding="utf-8") == expected, (
        "docs/rules.md is stale: run `python -m shared.domain.ruledoc > docs/rules.md`")


def test_rules_doc_lists_every_rule_of_every_version() -> None:
    book = RuleBook.load(None)
    text = render_rules_markdown(book)
    for name in book.set_names:
        for version in book.versions(name):
            assert f"### {name} — version {version.version}" in text
            for rule in version.rules:
                assert f"| `{rule.id}` | {rule.kind} | `{rule.step}` |" in text
