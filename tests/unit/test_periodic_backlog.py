"""The backlog gauges' reader: its figures, its failures, and how often it reads when a
read is slow (a large backlog must not keep the database busy counting it)."""

from __future__ import annotations

import pytest

from shared.db.backlog import WAIT_PER_READ, PeriodicBacklog


class SlowRead:
    """A read that takes `took` seconds of a fake clock, or raises."""

    def __init__(self) -> None:
        self.now = 0.0
        self.took = 0.1
        self.fails = False
        self.reads = 0

    def clock(self) -> float:
        return self.now

    def __call__(self) -> int:
        self.now += self.took
        self.reads += 1
        if self.fails:
            raise RuntimeError("database away")
        return self.reads


def test_a_quick_read_waits_the_interval_and_a_slow_one_proportionally_longer() -> None:
    read = SlowRead()
    backlog = PeriodicBacklog(read, interval_s=10.0, clock=read.clock)
    assert backlog.read_and_rest() == 10.0
    assert backlog() == 1
    read.took = 2.0  # a read of a large backlog
    assert backlog.read_and_rest() == pytest.approx(2.0 * WAIT_PER_READ)
    assert backlog() == 2
    assert WAIT_PER_READ >= 10  # the reads take at most a tenth of the time


def test_a_failed_read_is_reported_not_served_stale() -> None:
    read = SlowRead()
    backlog = PeriodicBacklog(read, interval_s=10.0, clock=read.clock)
    with pytest.raises(RuntimeError, match="not read yet"):
        backlog()
    backlog.read_and_rest()
    read.fails = True
    backlog.read_and_rest()
    with pytest.raises(RuntimeError, match="database away"):
        backlog()
    read.fails = False
    backlog.read_and_rest()
    assert backlog() == 3
