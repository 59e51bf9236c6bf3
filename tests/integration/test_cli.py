"""The `aftersales` command as users run it: help, `case show`, a broken rule file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.intake.processor import IntakeProcessor
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def aftersales(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aftersales_cli.cli", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command() -> None:
    out = aftersales("--help").stdout
    for command in ("db", "run", "publish", "case", "schemas", "simulate"):
        assert command in out
    assert "show" in aftersales("case", "--help").stdout
    for service in ("intake", "timer", "resolver", "notifier", "all"):
        assert service in aftersales("run", "--help").stdout


def test_case_show_prints_the_case_its_timeline_and_pending_deadlines(
    db: Database, database_url: str
) -> None:
    opened_at = datetime.now(UTC) - timedelta(hours=1)
    IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)),
                    NotificationPolicy.load(None), {"emails": [], "phones": []},
                    64 * 1024).process([json.dumps({
        "event_id": "cli-1", "type": "case.opened", "occurred_at": opened_at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": "O1", "case_id": "AS-CLI",
        "data": {"kind": "exchange", "amount_fen": 12900,
                 "merchant": {"email": "merchant@example.com", "phone": "13912345678"}},
    }).encode()])
    env = {"AFTERSALES_DATABASE_URL": database_url}

    shown = aftersales("case", "show", "AS-CLI", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["case"]["step"] == "merchant_response"
    assert [e["type"] for e in doc["timeline"] if e["what"] == "event"] == ["case.opened"]
    notifications = [e for e in doc["timeline"] if e["what"] == "notification"]
    assert notifications and all(e["party"] == "merchant" for e in notifications)
    deadline = next(d for d in doc["pending_deadlines"] if d["purpose"] == "deadline")
    assert deadline["step"] == "merchant_response"
    assert deadline["action"] == "auto_approve"
    assert datetime.fromisoformat(deadline["due_at"]) == opened_at + timedelta(hours=48)

    text = aftersales("case", "show", "AS-CLI", env=env).stdout
    assert "merchant_response" in text and "auto_approve" in text
    # Personal data is masked in what ops print and paste.
    assert "13912345678" not in text + shown.stdout
    assert "merchant@example.com" not in text + shown.stdout

    missing = aftersales("case", "show", "NO-SUCH-CASE", env=env)
    assert missing.returncode == 1 and "no case" in missing.stdout


def test_a_broken_rule_file_is_refused_at_start_naming_file_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[meta]\nset = "kuaishou"\nversion = "2022-09-30"\n\n[[rule]]\nid = \n')
    started = aftersales("run", "intake", env={"AFTERSALES_RULES": str(rules)})
    assert started.returncode == 2
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(rules) in lines[0] and ":6" in lines[0]


def test_a_rule_file_saved_as_gbk_is_refused_at_start_naming_the_file(tmp_path: Path) -> None:
    # Before, the UnicodeDecodeError escaped as a traceback from the real process.
    rules = tmp_path / "rules.toml"
    rules.write_bytes('[ruleset]\nname = "kuaishou"\nversion = "快手一版"\n'.encode("gbk"))
    started = aftersales("run", "intake", env={"AFTERSALES_RULES": str(rules)})
    assert started.returncode == 2
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in started.stderr
    assert str(rules) in lines[0] and "UTF-8" in lines[0]
