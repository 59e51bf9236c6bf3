"""Collectors that read on scrape: the backlog gauges (from a query the timer passes in) and
the process metrics of a whole process tree (Linux /proc)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import (
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.metrics.catalog import BACKLOG_SPECS, PROCESS_SPECS

log = logging.getLogger("shared.metrics")


Timestamp = datetime | float | int | None


def _epoch(value: Timestamp) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("backlog timestamps must be timezone-aware")
        return value.timestamp()
    return float(value)


@dataclass(frozen=True)
class BacklogSnapshot:
    """What the backlog query returns (one consistent read of PostgreSQL).

    Suggested SQL (the lead owns it):
      open_cases:          SELECT platform, kind, step, count(*) FROM cases
                           WHERE status='open' GROUP BY 1,2,3
      pending_deadlines:   SELECT step, purpose, count(*) FROM deadlines
                           WHERE status='pending' GROUP BY 1,2
      overdue_deadlines / oldest_overdue_deadline_at:
                           SELECT count(*), min(due_at) FROM deadlines
                           WHERE status IN ('pending','dispatched') AND due_at <= now()
      oldest_open_case_at: SELECT min(opened_at) FROM cases WHERE status='open'
      outbox_unpublished / oldest_unpublished_outbox_at:
                           SELECT count(*), min(created_at) FROM outbox
                           WHERE published_at IS NULL
      notifications_pending: SELECT channel, count(*) FROM notifications
                           WHERE status IN ('pending','deferred') GROUP BY 1
    Timestamps are aware datetimes or Unix seconds; None = nothing of that kind.
    """

    open_cases: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    pending_deadlines: Mapping[tuple[str, str], int] = field(default_factory=dict)
    oldest_open_case_at: Timestamp = None
    oldest_overdue_deadline_at: Timestamp = None
    overdue_deadlines: int | None = None
    outbox_unpublished: int = 0
    oldest_unpublished_outbox_at: Timestamp = None
    notifications_pending: Mapping[str, int] = field(default_factory=dict)
    calendar_covered_until: Timestamp = None
    estimated_deadlines: int | None = None

    @classmethod
    def from_rows(
        cls,
        *,
        open_cases: Iterable[tuple[str, str, str, int]] = (),
        pending_deadlines: Iterable[tuple[str, str, int]] = (),
        notifications_pending: Iterable[tuple[str, int]] = (),
        **scalars: Any,
    ) -> BacklogSnapshot:
        """Build from plain result rows (``(platform, kind, step, n)``, ``(step,
        purpose, n)``, ``(channel, n)``) plus the scalar fields as keywords."""
        return cls(
            open_cases={(p, k, s): int(n) for p, k, s, n in open_cases},
            pending_deadlines={(s, pu): int(n) for s, pu, n in pending_deadlines},
            notifications_pending={c: int(n) for c, n in notifications_pending},
            **scalars,
        )


class BacklogCollector(Collector):
    """Yields the backlog gauges from ``query_fn()`` on every scrape.

    ``query_fn`` returns a :class:`BacklogSnapshot` (or a mapping accepted by
    :meth:`BacklogSnapshot.from_rows`). If it raises, only
    ``aftersales_backlog_query_ok 0`` is exposed (never a failed scrape) and the error is
    logged. Register it on the registry of the metrics server of the timer service:
    ``start_metrics_server(port, "timer", collectors=[BacklogCollector(fn)])``.

    Every timer replica exposes the same values: aggregate with ``max``, not ``sum``.
    """

    def __init__(self, query_fn: Callable[[], BacklogSnapshot | Mapping[str, Any]]) -> None:
        self._query_fn = query_fn
        self._lock = threading.Lock()  # one DB query at a time, even with parallel scrapes

    def describe(self) -> Iterator[Metric]:
        for spec in BACKLOG_SPECS:
            yield GaugeMetricFamily(spec.name, spec.doc, labels=spec.labels)

    def _snapshot(self) -> BacklogSnapshot:
        raw = self._query_fn()
        if isinstance(raw, BacklogSnapshot):
            return raw
        return BacklogSnapshot.from_rows(**dict(raw))

    def collect(self) -> Iterator[Metric]:
        docs = {s.name: s for s in BACKLOG_SPECS}

        def family(name: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, docs[name].doc, labels=labels)

        started = time.perf_counter()
        try:
            with self._lock:
                snap = self._snapshot()
        except Exception:
            log.exception("backlog query failed")
            ok = family("aftersales_backlog_query_ok")
            ok.add_metric([], 0.0)
            yield ok
            return
        took = time.perf_counter() - started

        fam = family("aftersales_open_cases", ("platform", "kind", "step"))
        for (platform, kind, step), n in sorted(snap.open_cases.items()):
            fam.add_metric([platform, kind, step], float(n))
        yield fam

        fam = family("aftersales_pending_deadlines", ("step", "purpose"))
        for (step, purpose), n in sorted(snap.pending_deadlines.items()):
            fam.add_metric([step, purpose], float(n))
        yield fam

        if snap.overdue_deadlines is not None:
            fam = family("aftersales_overdue_deadlines")
            fam.add_metric([], float(snap.overdue_deadlines))
            yield fam

        for name, ts in (
            ("aftersales_oldest_open_case_timestamp_seconds", snap.oldest_open_case_at),
            ("aftersales_oldest_overdue_deadline_timestamp_seconds",
             snap.oldest_overdue_deadline_at),
            ("aftersales_oldest_unpublished_outbox_timestamp_seconds",
             snap.oldest_unpublished_outbox_at),
            ("aftersales_calendar_covered_until_timestamp_seconds",
             snap.calendar_covered_until),
        ):  # fmt: skip
            fam = family(name)
            epoch = _epoch(ts)
            if epoch is not None:
                fam.add_metric([], epoch)
            yield fam

        fam = family("aftersales_outbox_unpublished")
        fam.add_metric([], float(snap.outbox_unpublished))
        yield fam

        if snap.estimated_deadlines is not None:
            fam = family("aftersales_pending_deadlines_estimated")
            fam.add_metric([], float(snap.estimated_deadlines))
            yield fam

        fam = family("aftersales_notifications_pending", ("channel",))
        for channel, n in sorted(snap.notifications_pending.items()):
            fam.add_metric([channel], float(n))
        yield fam

        fam = family("aftersales_backlog_query_seconds")
        fam.add_metric([], took)
        yield fam
        fam = family("aftersales_backlog_query_ok")
        fam.add_metric([], 1.0)
        yield fam


# --------------------------------------------------------------------------------------
# Process metrics of a whole process tree
# --------------------------------------------------------------------------------------
def _children_map(proc: Path) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
        rest = text[text.rfind(")") + 2 :].split()
        if len(rest) > 1:
            children.setdefault(int(rest[1]), []).append(int(stat.parent.name))
    return children


def process_tree(root: int, proc: Path = Path("/proc")) -> list[int]:
    """``root`` and all its descendants (Linux /proc); [root] where /proc is missing."""
    if not proc.is_dir():
        return [root]
    children = _children_map(proc)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _const(pid: int) -> Callable[[], int]:
    return lambda: pid


class ProcessTreeCollector(Collector):
    """The standard ``process_*`` metrics summed over the serving process and all its
    descendants (Dramatiq workers), for multi-process mode where the default
    ``ProcessCollector`` would only see the serving process. ``process_start_time_seconds``
    is the root's; ``process_max_fds`` the root's limit."""

    _SUM = frozenset({
        "process_virtual_memory_bytes", "process_resident_memory_bytes",
        "process_cpu_seconds_total", "process_open_fds",
    })  # fmt: skip
    _ROOT = frozenset({"process_start_time_seconds", "process_max_fds"})

    def __init__(self, service: str, root_pid: int | None = None) -> None:
        self._service = service
        self._root = root_pid if root_pid is not None else os.getpid()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed set: skip the registry's duplicate-name check

    def collect(self) -> Iterator[Metric]:
        pids = process_tree(self._root)
        totals: dict[str, float] = {}
        families: dict[str, Metric] = {}
        for pid in pids:
            collector = ProcessCollector(pid=_const(pid), registry=None)
            for fam in collector.collect():
                families.setdefault(fam.name, fam)
                for sample in fam.samples:
                    if sample.name in self._SUM:
                        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                    elif sample.name in self._ROOT and pid == self._root:
                        totals[sample.name] = sample.value
        for fam_name, fam in families.items():
            out = Metric(fam_name, fam.documentation, fam.type)
            for sample_name in sorted({s.name for s in fam.samples}):
                if sample_name in totals:
                    out.add_sample(sample_name, {}, totals[sample_name])
            if out.samples:
                yield out
        count = GaugeMetricFamily(
            "aftersales_service_processes", PROCESS_SPECS[0].doc, labels=["service"]
        )
        count.add_metric([self._service], float(len(pids)))
        yield count


