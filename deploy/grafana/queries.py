#!/usr/bin/env python3
"""The PromQL of the Grafana dashboards, ready to run against a real Prometheus.

Standard library only; importable by path (``deploy/`` is not a package)::

    import importlib.util
    spec = importlib.util.spec_from_file_location("queries", "deploy/grafana/queries.py")
    queries = importlib.util.module_from_spec(spec); spec.loader.exec_module(queries)
    for q in queries.all_queries():          # template variables -> ".*"
        ... GET /api/v1/query?query=q.expr ...

or ``python deploy/grafana/queries.py [--var service=timer]`` prints one query a line.

All dashboard variables are matched with ``=~`` and have ``.*`` as their "All" value, so
substituting ``.*`` selects everything. Grafana's built-ins are replaced too:
``$__rate_interval`` / ``$__interval`` -> ``1m``, ``$__range`` -> ``1h`` (override with the
arguments).
"""

import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"

BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
}

_VAR = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]|\$(\w+)")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file name, e.g. "overview.json"
    panel: str  # panel title
    ref_id: str
    raw: str  # as written in the dashboard
    expr: str  # variables substituted


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.json"))
    }


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", []) or []


def variable_names(dashboard: Mapping[str, Any]) -> list[str]:
    return [v["name"] for v in dashboard.get("templating", {}).get("list", [])]


def variables_in(text: str) -> set[str]:
    """Names of the variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``) used in text."""
    return {next(g for g in m.groups() if g) for m in _VAR.finditer(text)}


def substitute(
    expr: str,
    values: Mapping[str, str] | None = None,
    *,
    default: str = ".*",
    builtins: Mapping[str, str] | None = None,
) -> str:
    """Replace template variables by ``values[name]``, Grafana built-ins by ``builtins``
    (default :data:`BUILTINS`), anything else by ``default``."""
    values = values or {}
    builtins = {**BUILTINS, **(builtins or {})}

    def repl(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name in values:
            return values[name]
        if name in builtins:
            return builtins[name]
        return default

    return _VAR.sub(repl, expr)


def panel_queries(
    name: str,
    dashboard: Mapping[str, Any],
    values: Mapping[str, str] | None = None,
    *,
    default: str = ".*",
) -> list[PanelQuery]:
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []) or []:
            raw = target.get("expr", "")
            if not raw:
                continue
            out.append(
                PanelQuery(
                    dashboard=name,
                    panel=panel.get("title", ""),
                    ref_id=target.get("refId", ""),
                    raw=raw,
                    expr=substitute(raw, values, default=default),
                )
            )
    return out


def all_queries(
    values: Mapping[str, str] | None = None,
    *,
    default: str = ".*",
    directory: Path = DASHBOARD_DIR,
) -> list[PanelQuery]:
    """Every panel query of every dashboard, variables substituted."""
    out: list[PanelQuery] = []
    for name, dashboard in load_dashboards(directory).items():
        out.extend(panel_queries(name, dashboard, values, default=default))
    return out


def variable_queries(directory: Path = DASHBOARD_DIR) -> list[tuple[str, str, str]]:
    """``(dashboard, variable, query)`` of every ``label_values(...)`` variable."""
    out = []
    for name, dashboard in load_dashboards(directory).items():
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                q = var.get("query")
                text = q.get("query", "") if isinstance(q, dict) else str(q or "")
                out.append((name, var["name"], text))
    return out


# ----------------------------------------------------------------------- PromQL names
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(\s*\()?")
_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
        "group_right", "offset", "bool", "inf", "nan", "atan2", "start", "end",
    }
)  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names an expression selects. Function names, keywords,
    label names and label values are left out."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def main(argv: list[str]) -> int:
    values: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg == "--var":
            key, _, value = next(args).partition("=")
            values[key] = value
    for q in all_queries(values):
        print(q.expr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
