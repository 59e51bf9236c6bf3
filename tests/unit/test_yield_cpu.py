"""`yield_cpu`: the notifier's lower CPU priority must hold against services started in
sessions of their own, which Linux's autogroups would otherwise schedule as equals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runtime import yield_cpu

ROOT = Path(__file__).resolve().parents[2]
AUTOGROUP = Path("/proc/self/autogroup")

# Prints the process's niceness and its session's autogroup niceness after yield_cpu(7).
_PROBE = """
import os, re
from shared.runtime import yield_cpu
yield_cpu(7)
group = open("/proc/self/autogroup").read()
print(os.nice(0), re.search(r"nice (-?\\d+)", group).group(1))
"""


def _probe(new_session: bool) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, check=True,
                         capture_output=True, text=True, start_new_session=new_session,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    niceness, group = out.split()
    return int(niceness), int(group)


def _own_group_niceness() -> int:
    return int(AUTOGROUP.read_text().rsplit("nice", 1)[1])


def test_a_session_leader_lowers_its_sessions_autogroup_too() -> None:
    if not AUTOGROUP.exists():
        pytest.fail("this kernel has no autogroups (/proc/self/autogroup): the test "
                    "needs one that does, as the machines that run the services have")
    base = os.nice(0)
    assert _probe(new_session=True) == (base + 7, base + 7)


def test_a_process_in_anothers_session_leaves_that_sessions_autogroup_alone() -> None:
    if not AUTOGROUP.exists():
        pytest.fail("this kernel has no autogroups (/proc/self/autogroup)")
    before = _own_group_niceness()
    niceness, group = _probe(new_session=False)
    assert niceness == os.nice(0) + 7
    assert group == before == _own_group_niceness()


def test_without_autogroups_niceness_alone_is_set(tmp_path: Path) -> None:
    # Run in a child: niceness cannot be raised back in this process.
    code = ("import os; from shared.runtime import yield_cpu; "
            f"yield_cpu(3, autogroup={str(tmp_path / 'absent' / 'autogroup')!r}); "
            "print(os.nice(0))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert int(out) == os.nice(0) + 3


def test_zero_changes_nothing() -> None:
    before = os.nice(0), _own_group_niceness() if AUTOGROUP.exists() else None
    yield_cpu(0)
    assert (os.nice(0), _own_group_niceness() if AUTOGROUP.exists() else None) == before
