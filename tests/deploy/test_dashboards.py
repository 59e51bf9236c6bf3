"""Grafana provisioning and dashboards: structure, variables, and that every query only
names metrics the project defines (or standard process_/up/scrape_/rabbitmq_ ones)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from deploy_helpers import DEPLOY, REPO, load_by_path

GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
STANDARD = re.compile(r"^(up|process_[a-z_]+|scrape_[a-z_]+|rabbitmq_[a-z0-9_]+)$")


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in DASHBOARDS}


def test_both_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARDS} >= {"overview.json", "service.json"}


def test_dashboards_are_generated_and_fresh() -> None:
    builder = load_by_path("aftersales_grafana_build", GRAFANA / "build_dashboards.py")
    for name, text in builder.render().items():
        assert (GRAFANA / "dashboards" / name).read_text(encoding="utf-8") == text, (
            f"{name} is out of date: run python deploy/grafana/build_dashboards.py"
        )


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_have_datasource_and_queries(path: Path, queries: ModuleType) -> None:
    dash = json.loads(path.read_text(encoding="utf-8"))
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in queries.iter_panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    panels = [p for p in queries.iter_panels(dash) if p["type"] not in ("row", "text")]
    assert len(panels) >= 8
    for panel in panels:
        title = panel["title"]
        assert panel.get("datasource"), title
        assert panel["datasource"]["type"] == "prometheus", title
        targets = panel.get("targets") or []
        assert targets, f"{title}: no target"
        for target in targets:
            assert target.get("expr", "").strip(), f"{title}: empty expr"
            assert target.get("datasource"), f"{title}: target without datasource"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, title


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_variable_is_defined_and_used(path: Path, queries: ModuleType) -> None:
    dash = json.loads(path.read_text(encoding="utf-8"))
    names = queries.variable_names(dash)
    assert {"datasource", "platform", "kind"} <= set(names)
    text_without_templating = json.dumps({k: v for k, v in dash.items() if k != "templating"})
    # a variable counts as used by the panels or by another variable's query
    other_vars = json.dumps(dash["templating"]["list"])
    used = queries.variables_in(text_without_templating)
    for name in names:
        assert name in used or f"${name}" in other_vars.replace(f'"name": "{name}"', ""), (
            f"variable {name} unused"
        )
    builtins = set(queries.BUILTINS)
    assert used - set(names) - builtins == set(), "undefined variables referenced"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["definition"].startswith("label_values("), var["name"]
            if var.get("includeAll"):
                assert var["allValue"] == ".*", var["name"]


def test_variables_are_matched_with_regex(queries: ModuleType) -> None:
    """`=~"$var"` everywhere so that substituting `.*` (the All value) selects all."""
    for q in queries.all_queries():
        for m in re.finditer(r'(\w+)\s*(=~|!=|!~|=)\s*"[^"]*\$', q.raw):
            assert m.group(2) == "=~", f"{q.dashboard}/{q.panel}: {m.group(0)}"


def test_every_metric_in_an_expr_is_defined(queries: ModuleType, yaml_mod: ModuleType) -> None:
    from shared.metrics import all_metric_names

    known: set[str] = set()
    for n in all_metric_names():
        known |= {n, n + "_bucket", n + "_sum", n + "_count"}
    rules = yaml_mod.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    known |= {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = [(f"{q.dashboard}/{q.panel}", q.expr) for q in queries.all_queries()]
    exprs += [(f"{d}/${v}", q) for d, v, q in queries.variable_queries()]
    seen: set[str] = set()
    for where, expr in exprs:
        names = queries.metric_names(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr))
        assert names, f"{where}: no metric found in {expr}"
        for name in names:
            assert name in known or STANDARD.match(name), f"{where}: unknown metric {name}"
        seen |= names
    # the overview shows what ops asked for
    for needed in (
        "aftersales_open_cases", "aftersales_oldest_open_case_timestamp_seconds",
        "aftersales_sla_steps_total", "aftersales_decisions_total",
        "aftersales_notifications_total", "aftersales_timer_lateness_seconds_bucket",
        "aftersales_outbox_unpublished", "aftersales_events_rejected_total",
        "aftersales_actor_messages_total", "aftersales_actor_duration_seconds_bucket",
        "process_resident_memory_bytes", "process_cpu_seconds_total", "up",
    ):  # fmt: skip
        assert needed in seen, needed


def test_metric_name_extraction(queries: ModuleType) -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, actor) (rate(a_bucket{job=~"x", le=~"1(\\\\.0)?"}'
        "[$__rate_interval]))) / on() group_left(kind) b:rec:rate5m offset 5m > bool 1e3"
    )
    assert queries.metric_names(queries.substitute(expr)) == {"a_bucket", "b:rec:rate5m"}
    assert queries.substitute('x{a=~"$platform", b=~"${kind}"}[$__range]') == (
        'x{a=~".*", b=~".*"}[1h]'
    )
    assert queries.substitute('x{job=~"aftersales-$service"}', {"service": "timer"}) == (
        'x{job=~"aftersales-timer"}'
    )


def test_all_exprs_parse_with_promtool(promtool: str, queries: ModuleType, tmp_path: Path) -> None:
    """Every panel query, variables substituted, is valid PromQL (as a recording rule)."""
    rules = [
        {"record": f"dashboard:check:{i}", "expr": q.expr}
        for i, q in enumerate(queries.all_queries())
    ]
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_provisioning(yaml_mod: ModuleType) -> None:
    ds = yaml_mod.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml_mod.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())
    provider = prov["providers"][0]
    assert provider["type"] == "file"
    compose = (DEPLOY / "docker-compose.yml").read_text()
    # compose mounts the dashboards folder where the provider looks
    assert provider["options"]["path"] in compose
    assert (REPO / "deploy/grafana/dashboards").is_dir()
