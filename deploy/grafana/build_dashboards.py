#!/usr/bin/env python3
"""Generate deploy/grafana/dashboards/{overview,service}.json.

The JSON files are the artifact Grafana loads; this script is their source. After an
edit run ``python deploy/grafana/build_dashboards.py`` (tests/deploy/test_dashboards.py
fails while the JSON is out of date). Standard library only.

Conventions:
- every panel uses the ``datasource`` variable;
- template variables are matched with ``=~`` and their "All" value is ``.*``, so
  :mod:`queries` can substitute ``.*`` for them;
- backlog gauges are exposed identically by every timer replica: ``max by (...)`` first,
  then ``sum``;
- histogram ``le`` values are matched as ``le=~"172800(\\.0)?"`` (prometheus_client writes
  ``172800.0``, Prometheus 3 normalises to ``172800``).
"""

# ruff: noqa: E501  (PromQL strings read better unbroken)
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

DS = {"type": "prometheus", "uid": "${datasource}"}
PK = 'platform=~"$platform", kind=~"$kind"'
SVC = 'job=~"aftersales-$service"'

# Rule deadlines used as histogram boundaries (shared.metrics.DEADLINE_BUCKETS).
H24 = "86400"
H48 = "172800"


def le(seconds: str) -> str:
    return f'le=~"{seconds}(\\\\.0)?"'


class Board:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        self.y += 1

    def panel(
        self,
        kind: str,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        w: int = 8,
        h: int = 8,
        description: str = "",
        stack: bool = False,
        thresholds: list[tuple[float | None, str]] | None = None,
        decimals: int | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> None:
        defaults: dict[str, Any] = {"unit": unit}
        if decimals is not None:
            defaults["decimals"] = decimals
        if minimum is not None:
            defaults["min"] = minimum
        if maximum is not None:
            defaults["max"] = maximum
        if thresholds:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"color": c, "value": v} for v, c in thresholds],
            }
        options: dict[str, Any]
        if kind == "stat":
            options = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "area",
                "textMode": "auto",
            }
        else:
            options = {
                "legend": {
                    "displayMode": "table",
                    "placement": "bottom",
                    "calcs": ["lastNotNull", "max"],
                },
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
            defaults["custom"] = {
                "drawStyle": "line",
                "fillOpacity": 20 if stack else 5,
                "lineWidth": 1,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                "showPoints": "never",
            }
        self.panels.append(
            {
                "type": kind,
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": self._place(w, h),
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": options,
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": DS,
                        "expr": expr,
                        "legendFormat": legend,
                        "range": True,
                        "instant": False,
                    }
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )

    def dashboard(
        self, uid: str, title: str, variables: list[dict[str, Any]], links: list[dict[str, Any]]
    ) -> dict[str, Any]:
        for i, p in enumerate(self.panels, start=1):
            p["id"] = i
        return {
            "uid": uid,
            "title": title,
            "tags": ["aftersales"],
            "timezone": "browser",
            "schemaVersion": 39,
            "version": 1,
            "editable": True,
            "graphTooltip": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "annotations": {"list": []},
            "links": links,
            "templating": {"list": variables},
            "panels": self.panels,
        }


def datasource_var() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
    }


def query_var(
    name: str, label: str, query: str, *, multi: bool = True, include_all: bool = True,
    regex: str = "",
) -> dict[str, Any]:  # fmt: skip
    var: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-query"},
        "refresh": 2,  # on time range change
        "regex": regex,
        "sort": 1,
        "multi": multi,
        "includeAll": include_all,
        "current": {},
        "hide": 0,
    }
    if include_all:
        var["allValue"] = ".*"
    return var


PLATFORM_VAR = query_var("platform", "Platform", "label_values(aftersales_open_cases, platform)")
KIND_VAR = query_var(
    "kind", "Kind", 'label_values(aftersales_open_cases{platform=~"$platform"}, kind)'
)


def overview() -> dict[str, Any]:
    b = Board()
    open_cases = f"max by (platform, kind, step) (aftersales_open_cases{{{PK}}})"
    open_all_kinds = 'max by (platform, kind, step) (aftersales_open_cases{platform=~"$platform"})'

    b.row("Backlog")
    b.panel("stat", "Open cases", [(f"sum({open_cases})", "open")], w=4, h=5)
    b.panel(
        "stat", "Oldest open case age",
        [("time() - min(aftersales_oldest_open_case_timestamp_seconds)", "age")],
        unit="s", w=5, h=5,
        description="Since the oldest open case was opened (all platforms and kinds). "
        "Alert AftersalesOldestOpenCaseTooOld at 60 days.",
        thresholds=[(None, "green"), (30 * 86400, "orange"), (60 * 86400, "red")],
    )  # fmt: skip
    b.panel(
        "stat", "Oldest overdue deadline",
        [("time() - min(aftersales_oldest_overdue_deadline_timestamp_seconds)", "overdue for")],
        unit="s", w=5, h=5,
        description="A deadline past due and not yet fired; empty = none. The timer "
        "normally fires within a second. Alert AftersalesTimerOverdueDeadlines at 5 min.",
        thresholds=[(None, "green"), (60, "orange"), (300, "red")],
    )  # fmt: skip
    b.panel(
        "stat", "Repair share of open cases",
        [(
            f'sum(max by (platform, kind, step) (aftersales_open_cases{{platform=~"$platform", '
            f'kind=~"repair|onsite_repair"}})) / sum({open_all_kinds})',
            "repairs",
        )],
        unit="percentunit", w=5, h=5,
        description="Repairs (寄修, 上门维修) are cheaper than returns and exchanges.",
    )  # fmt: skip
    b.panel(
        "stat", "Services up",
        [('sum(up{job=~"aftersales-.+"})', "up"), ('count(up{job=~"aftersales-.+"})', "expected")],
        w=5, h=5,
    )  # fmt: skip
    b.panel(
        "timeseries", "Open cases by kind and step",
        [(f"sum by (kind, step) ({open_cases})", "{{kind}} / {{step}}")],
        w=12, h=9, stack=True,
    )  # fmt: skip
    b.panel(
        "timeseries", "Pending deadlines by step and purpose",
        [("max by (step, purpose) (aftersales_pending_deadlines)", "{{step}} ({{purpose}})")],
        w=12, h=9, stack=True,
    )  # fmt: skip

    b.row("SLA")
    steps = f"aftersales_sla_steps_total{{{PK}}}"
    met = f'aftersales_sla_steps_total{{result="met", {PK}}}'
    b.panel(
        "stat", "SLA compliance (time range)",
        [(f"sum(increase({met}[$__range])) / sum(increase({steps}[$__range]))", "met")],
        unit="percentunit", w=6, h=8, decimals=2,
        description="Share of ended steps whose party acted before the deadline. SLO 99 %.",
        thresholds=[(None, "red"), (0.95, "orange"), (0.99, "green")],
    )  # fmt: skip
    b.panel(
        "timeseries", "SLA compliance by step (1 h)",
        [(
            f"sum by (step) (rate({met}[1h])) / sum by (step) (rate({steps}[1h]))",
            "{{step}}",
        )],
        unit="percentunit", w=9, h=8, minimum=0, maximum=1,
    )  # fmt: skip
    b.panel(
        "timeseries", "Missed deadlines by step and party (per hour)",
        [(
            f'sum by (step, party) (increase(aftersales_sla_steps_total{{result="missed", {PK}}}[1h]))',
            "{{step}} / {{party}}",
        )],
        w=9, h=8, stack=True,
    )  # fmt: skip
    b.panel(
        "timeseries", "Error-budget burn rate (1 = on budget)",
        [
            ("aftersales:sla_step_miss_ratio:rate1h / 0.01", "1h"),
            ("aftersales:sla_step_miss_ratio:rate6h / 0.01", "6h"),
            ("aftersales:sla_step_miss_ratio:rate3d / 0.01", "3d"),
        ],
        w=8, h=8,
        description="Recording rules of deploy/prometheus/alerts.yml (all platforms). "
        "Pages at 14.4 (1h) and 6 (6h).",
    )  # fmt: skip
    ttfr = "aftersales_time_to_first_response_seconds"
    ttr = "aftersales_time_to_resolution_seconds"
    b.panel(
        "timeseries", "Merchant first response within 24 h / 48 h",
        [
            (
                f"sum(rate({ttfr}_bucket{{{le(H24)}, {PK}}}[1h])) / sum(rate({ttfr}_count{{{PK}}}[1h]))",
                "within 24 h",
            ),
            (
                f"sum(rate({ttfr}_bucket{{{le(H48)}, {PK}}}[1h])) / sum(rate({ttfr}_count{{{PK}}}[1h]))",
                "within 48 h",
            ),
        ],
        unit="percentunit", w=8, h=8, minimum=0, maximum=1,
        description="Bucket boundaries sit on the rule deadlines, so these shares are exact.",
    )  # fmt: skip
    b.panel(
        "timeseries", "Time to resolution p50 / p90 by kind",
        [
            (f"histogram_quantile(0.5, sum by (kind, le) (rate({ttr}_bucket{{{PK}}}[6h])))",
             "p50 {{kind}}"),
            (f"histogram_quantile(0.9, sum by (kind, le) (rate({ttr}_bucket{{{PK}}}[6h])))",
             "p90 {{kind}}"),
        ],
        unit="s", w=8, h=8,
        description="Interpolated between deadline buckets (1h … 30d): coarse by design.",
    )  # fmt: skip

    b.row("Decisions and notifications")
    b.panel(
        "timeseries", "Automatic decisions by type (per hour)",
        [(
            f"sum by (type) (increase(aftersales_decisions_total{{{PK}}}[1h]))",
            "{{type}}",
        )],
        w=12, h=8, stack=True,
    )  # fmt: skip
    b.panel(
        "timeseries", "Notifications by channel and outcome",
        [(
            "sum by (channel, outcome) (rate(aftersales_notifications_total[$__rate_interval]))",
            "{{channel}} {{outcome}}",
        )],
        unit="ops", w=12, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "Notifications waiting by channel",
        [("max by (channel) (aftersales_notifications_pending)", "{{channel}}")],
        w=8, h=7,
    )  # fmt: skip
    b.panel(
        "timeseries", "Outbox: unpublished rows and publish rate",
        [
            ("max(aftersales_outbox_unpublished)", "unpublished"),
            ("sum(rate(aftersales_decisions_published_total[$__rate_interval]))",
             "published / s"),
        ],
        w=8, h=7,
    )  # fmt: skip
    b.panel(
        "timeseries", "Outbox publish time p99",
        [(
            "histogram_quantile(0.99, sum by (le) (rate(aftersales_outbox_publish_seconds_bucket[$__rate_interval])))",
            "p99",
        )],
        unit="s", w=8, h=7,
    )  # fmt: skip

    b.row("Timer and intake")
    b.panel(
        "timeseries", "Timer lateness p50 / p99",
        [
            ("histogram_quantile(0.5, sum by (le) (rate(aftersales_timer_lateness_seconds_bucket[$__rate_interval])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(aftersales_timer_lateness_seconds_bucket[$__rate_interval])))", "p99"),
        ],
        unit="s", w=8, h=8,
        description="Dispatch time minus due_at. Alert AftersalesTimerLate: p99 > 1 s for 5 min.",
    )  # fmt: skip
    b.panel(
        "timeseries", "Timer: fired by purpose, stale",
        [
            ("sum by (purpose) (rate(aftersales_timer_fired_total[$__rate_interval]))", "{{purpose}}"),
            ("sum(rate(aftersales_timer_stale_total[$__rate_interval]))", "stale"),
        ],
        unit="ops", w=8, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "Inbound events by outcome",
        [(
            'sum by (outcome) (rate(aftersales_events_received_total{platform=~"$platform"}[$__rate_interval]))',
            "{{outcome}}",
        )],
        unit="ops", w=8, h=8, stack=True,
    )  # fmt: skip
    b.panel(
        "timeseries", "Rejected events by reason",
        [(
            "sum by (reason) (increase(aftersales_events_rejected_total[$__rate_interval]))",
            "{{reason}}",
        )],
        w=12, h=8, stack=True,
        description="Moved unchanged to the queue aftersales.events.rejected (reason in a header).",
    )  # fmt: skip
    b.panel(
        "timeseries", "RabbitMQ: messages ready per queue",
        [("sum by (queue) (rabbitmq_queue_messages_ready)", "{{queue}}")],
        w=12, h=8,
        description="From RabbitMQ's own Prometheus plugin (port 15692, /metrics/per-object). "
        "For the broker itself use RabbitMQ's published Grafana dashboards "
        "(RabbitMQ-Overview).",
    )  # fmt: skip

    return b.dashboard(
        "aftersales-overview",
        "After-sales overview",
        [datasource_var(), PLATFORM_VAR, KIND_VAR],
        [{"title": "Service detail", "type": "link", "url": "/d/aftersales-service",
          "keepTime": True, "includeVars": False}],
    )  # fmt: skip


def service() -> dict[str, Any]:
    b = Board()
    act = 'service=~"$service"'
    b.row("Process")
    b.panel("stat", "Up", [(f"sum(up{{{SVC}}})", "up")], w=4, h=5,
            thresholds=[(None, "red"), (1, "green")])  # fmt: skip
    b.panel("stat", "Processes", [(f"sum(aftersales_service_processes{{{act}}})", "processes")],
            w=4, h=5, description="Metrics server and its worker processes, all copies.")  # fmt: skip
    b.panel(
        "stat", "Version", [(f"count by (version) (aftersales_build_info{{{SVC}}})", "{{version}}")],
        w=4, h=5,
    )  # fmt: skip
    b.panel(
        "stat", "Scrape duration", [(f"max(scrape_duration_seconds{{{SVC}}})", "scrape")],
        unit="s", w=4, h=5,
    )  # fmt: skip
    b.panel(
        "stat", "Open file descriptors", [(f"sum(process_open_fds{{{SVC}}})", "fds")],
        w=8, h=5,
    )  # fmt: skip
    b.panel(
        "timeseries", "Resident memory (process tree)",
        [(f"sum by (instance) (process_resident_memory_bytes{{{SVC}}})", "{{instance}}")],
        unit="bytes", w=12, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "CPU (process tree)",
        [(f"sum by (instance) (rate(process_cpu_seconds_total{{{SVC}}}[$__rate_interval]))",
          "{{instance}}")],
        unit="percentunit", w=12, h=8, description="1 = one full core.",
    )  # fmt: skip

    b.row("Dramatiq actors")
    msgs = "aftersales_actor_messages_total"
    b.panel(
        "timeseries", "Messages by actor and outcome",
        [(f"sum by (actor, outcome) (rate({msgs}{{{act}}}[$__rate_interval]))",
          "{{actor}} {{outcome}}")],
        unit="ops", w=12, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "Errors and retries by actor",
        [
            (f'sum by (actor) (rate({msgs}{{{act}, outcome="error"}}[$__rate_interval]))',
             "{{actor}} error"),
            (f'sum by (actor) (rate({msgs}{{{act}, outcome="retry"}}[$__rate_interval]))',
             "{{actor}} retry"),
        ],
        unit="ops", w=12, h=8,
    )  # fmt: skip
    dur = "aftersales_actor_duration_seconds_bucket"
    b.panel(
        "timeseries", "Actor duration p50 / p95 / p99",
        [
            (f"histogram_quantile({q}, sum by (actor, le) (rate({dur}{{{act}}}[$__rate_interval])))",
             f"p{int(q * 100)} {{{{actor}}}}")
            for q in (0.5, 0.95, 0.99)
        ],
        unit="s", w=24, h=8,
    )  # fmt: skip

    b.row("What this service does (empty where it does not apply)")
    b.panel(
        "timeseries", "intake: events by type and outcome",
        [(
            f'sum by (type, outcome) (rate(aftersales_events_received_total{{{SVC}, platform=~"$platform"}}[$__rate_interval]))',
            "{{type}} {{outcome}}",
        )],
        unit="ops", w=8, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "intake: batch time p50 / p99",
        [
            (f"histogram_quantile({q}, sum by (le) (rate(aftersales_intake_batch_seconds_bucket{{{SVC}}}[$__rate_interval])))",
             f"p{int(q * 100)}")
            for q in (0.5, 0.99)
        ],
        unit="s", w=8, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "Decisions and SLA steps recorded here",
        [
            (f"sum by (type) (rate(aftersales_decisions_total{{{SVC}, {PK}}}[$__rate_interval]))",
             "decision {{type}}"),
            (f"sum by (result) (rate(aftersales_sla_steps_total{{{SVC}, {PK}}}[$__rate_interval]))",
             "steps {{result}}"),
        ],
        unit="ops", w=8, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "timer: lateness p99 and backlog query time",
        [
            (f"histogram_quantile(0.99, sum by (le) (rate(aftersales_timer_lateness_seconds_bucket{{{SVC}}}[$__rate_interval])))",
             "lateness p99"),
            (f"max(aftersales_backlog_query_seconds{{{SVC}}})", "backlog query"),
        ],
        unit="s", w=8, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "resolver: outbox publish p99 and stale deadlines",
        [
            (f"histogram_quantile(0.99, sum by (le) (rate(aftersales_outbox_publish_seconds_bucket{{{SVC}}}[$__rate_interval])))",
             "publish p99 (s)"),
            (f"sum(rate(aftersales_timer_stale_total{{{SVC}}}[$__rate_interval]))",
             "stale / s"),
        ],
        w=8, h=8,
    )  # fmt: skip
    b.panel(
        "timeseries", "notifier: notifications by channel and outcome",
        [(
            f"sum by (channel, outcome) (rate(aftersales_notifications_total{{{SVC}}}[$__rate_interval]))",
            "{{channel}} {{outcome}}",
        )],
        unit="ops", w=8, h=8,
    )  # fmt: skip

    service_var = query_var(
        "service", "Service", 'label_values(up{job=~"aftersales-.+"}, job)',
        multi=False, include_all=False, regex="/^aftersales-(.+)$/",
    )  # fmt: skip
    return b.dashboard(
        "aftersales-service",
        "After-sales service",
        [datasource_var(), service_var, PLATFORM_VAR, KIND_VAR],
        [{"title": "Overview", "type": "link", "url": "/d/aftersales-overview",
          "keepTime": True, "includeVars": False}],
    )  # fmt: skip


DASHBOARDS = {"overview.json": overview, "service.json": service}


def render() -> dict[str, str]:
    return {
        name: json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, text in render().items():
        path = OUT / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
