"""`aftersales rules list` and `aftersales rules check PATH`, run as the console script's
entry point (no services needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aftersales_cli.cli import main

RULE = """[ruleset]
name = "acme"
version = "v1"
effective = 2026-01-01
source = "our shop platform"

[[rule]]
id = "exchange.merchant_response"
kind = "exchange"
step = "merchant_response"
party = "merchant"
duration = "{duration}"
on_timeout = "auto_approve"
"""


def test_check_accepts_a_good_file_and_says_what_it_adds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "acme.toml"
    good.write_text(RULE.format(duration="24h"))
    assert main(["rules", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "ok, 1 version(s) of 1 set(s)" in out and "acme v1 (effective 2026-01-01): adds" in out


def test_check_names_file_and_line_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "good.toml").write_text(RULE.format(duration="24h"))
    bad = folder / "bad.toml"
    bad.write_text(RULE.format(duration="24 hours").replace('"acme"', '"other"'))
    assert main(["rules", "check", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}:12: bad duration '24 hours'")


def test_list_shows_shipped_and_user_sets_with_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    user = tmp_path / "rules"
    user.mkdir()
    (user / "acme.toml").write_text(RULE.format(duration="24h"))
    shipped_default = Path(__file__).resolve().parents[2] / "shared" / "rules" / "default.toml"
    (user / "default.toml").write_text(shipped_default.read_text(encoding="utf-8"))
    monkeypatch.setenv("AFTERSALES_RULES", str(user))
    assert main(["rules", "list", "--json"]) == 0
    rows = {(r["set"], r["version"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows[("acme", "v1")]["origin"] == "user"
    assert rows[("default", "1")]["origin"] == "user"
    assert rows[("default", "1")]["overrides"].endswith("shared/rules/default.toml")
    assert rows[("kuaishou", "2022-09-30")]["origin"] == "shipped"  # never dropped
