"""Small measuring helpers the benchmarks share (their set-up helpers are in
tests/resources.py, shared with the tests)."""

from __future__ import annotations


def pct(values: list[float], q: float) -> float | None:
    """The `q` quantile (0..1) of `values` by nearest rank; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid` in KiB (VmRSS); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
