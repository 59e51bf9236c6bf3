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

# Prints the process's niceness after yield_cpu(7), then its autogroup file as it reads.
_PROBE = """
import os
from shared.runtime import yield_cpu
yield_cpu(7)
print(os.nice(0))
print(open("/proc/self/autogroup").read(), end="")
"""


def _group_niceness(text: str) -> int | None:
    """The niceness in an autogroup file ("/autogroup-85 nice 0"). A process in the root
    autogroup (the session of PID 1, where CI runs the suite) reads an empty file, and
    that group has no niceness of its own: None."""
    return int(text.rsplit("nice", 1)[1]) if text.strip() else None


def _probe(new_session: bool) -> tuple[int, int | None]:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, check=True,
                         capture_output=True, text=True, start_new_session=new_session,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    niceness, group = out.split("\n", 1)
    return int(niceness), _group_niceness(group)


def _own_group_niceness() -> int | None:
    return _group_niceness(AUTOGROUP.read_text())


def test_an_autogroup_file_reads_as_its_niceness_or_none_for_the_root_group() -> None:
    assert _group_niceness("/autogroup-85 nice -3\n") == -3
    assert _group_niceness("") is None


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
