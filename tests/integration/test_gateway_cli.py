"""`aftersales run gateway` refuses bad settings and broken mapping files at start, with
one line naming them (no broker or database needed to show it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.gateway.mapping import MAPPINGS_DIR

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run_gateway(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aftersales_cli.cli", "run", "gateway"], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)


def test_run_help_names_the_gateway() -> None:
    out = subprocess.run([sys.executable, "-m", "aftersales_cli.cli", "run", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    assert "gateway" in out


@pytest.mark.parametrize("name, value", [
    ("AFTERSALES_GATEWAY_PORT", "0"),
    ("AFTERSALES_GATEWAY_MAX_BODY_BYTES", "12"),
    ("AFTERSALES_GATEWAY_MAPPINGS", "/nonexistent/folder"),
])
def test_a_bad_setting_stops_it_naming_the_setting(name: str, value: str) -> None:
    done = run_gateway({name: value})
    assert done.returncode == 2
    assert name in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_broken_mapping_file_stops_it_naming_the_file(tmp_path: Path) -> None:
    for path in MAPPINGS_DIR.glob("*.toml"):
        shutil.copy(path, tmp_path / path.name)
    broken = tmp_path / "kuaishou.toml"
    broken.write_text(broken.read_text(encoding="utf-8").replace(
        'events = ["refund.completed"]', 'events = ["refund.complete"]'), encoding="utf-8")
    done = run_gateway({"AFTERSALES_GATEWAY_MAPPINGS": str(tmp_path)})
    assert done.returncode == 2
    assert "kuaishou.toml" in done.stderr and "refund.complete" in done.stderr, done.stderr
