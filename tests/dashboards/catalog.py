"""What the dashboards and alerts query, and which exporters exist yet.

Expressions are read from the shipped files (Grafana JSON, rules.yml), so renaming a metric in the
code or in a file breaks the tests. Each metric an expression names belongs either to an exporter
the tests run live (its names are read from its /metrics) or to PENDING, the agreed names
of exporters that do not run in the tests yet. An expression is queried only when
all its metrics are live; the rest are reported as skipped, naming the missing exporter.

When an exporter lands: start it in tests/dashboards/conftest.py (`live` fixture: add its scrape job
and metrics URL) and delete its names here. A PENDING name that shows up on a live exporter fails
the tests, so the list cannot go stale silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import REPO

DASHBOARDS = REPO / "dashboards"
GRAFANA_JSON = sorted((DASHBOARDS / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_YML = DASHBOARDS / "prometheus" / "prometheus.yml"
RULES_YML = DASHBOARDS / "prometheus" / "rules.yml"
DATASOURCE_UID = "mujina-prometheus"


# metric name -> who will export it (and its scrape job in prometheus.yml); every exporter runs in the
# tests today, so nothing is pending
PENDING: dict[str, str] = {}
# Scrape jobs of prometheus.yml whose exporters do not run in the tests yet.
PENDING_JOBS: dict[str, str] = {}

# What Grafana substitutes for its variables when the query runs; the tests substitute the same.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

_METRIC_RE = re.compile(r"\bmujina_[a-z0-9_]+\b")
_VAR_RE = re.compile(r"\$\{?(\w+)")
_LABEL_VALUES_RE = re.compile(r"^label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)$")


@dataclass(frozen=True)
class Expr:
    where: str   # "overview.json: panel 'Active workers' A" or "rules.yml: MujinaNoActiveWorkers"
    promql: str  # ready for the Prometheus HTTP API (variables substituted)

    @property
    def metrics(self) -> set[str]:
        return set(_METRIC_RE.findall(self.promql))


def _substitute(expr: str, variables: dict[str, str], where: str) -> str:
    for name, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    left = _VAR_RE.findall(expr)
    if left:
        raise AssertionError(f"{where}: unknown variable(s) {left} in {expr!r}: define them in the dashboard's "
                             "templating or in GRAFANA_VARS")
    return expr


def dashboard_exprs(path: Path) -> list[Expr]:
    """Every panel target's expr and every query variable of one Grafana dashboard JSON."""
    doc = json.loads(path.read_text())
    variables, out = {}, []
    for v in doc.get("templating", {}).get("list", []):
        # A multi-value variable set to "All" becomes its allValue regex.
        variables[v["name"]] = v.get("allValue") or ".*"
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = _LABEL_VALUES_RE.match(q)
            assert m, f"{path.name}: variable {v['name']}: only label_values(METRIC, LABEL) is understood, got {q!r}"
            # label_values(m, l) lists the values of l on m's series: the same series `count by (l) (m)` counts.
            out.append(Expr(f"{path.name}: variable ${v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    for panel in _panels(doc["panels"]):
        for t in panel.get("targets", []):
            where = f"{path.name}: panel {panel['title']!r} {t['refId']}"
            out.append(Expr(where, _substitute(t["expr"], variables, where)))
    return out


def _panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # panels collapsed inside a row


def _bool_comparisons(expr: str) -> str:
    """`a > b` filters series out; `a > bool b` keeps every series (as 0 or 1). Rewrites every
    comparison outside label matchers and strings, so an alert's expression returns its series
    whether or not it fires."""
    out, i, depth, quote = [], 0, 0, None
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                out.append(expr[i:i + 2])
                i += 2
                continue
            quote = None if ch == quote else quote
        elif ch in "\"'`":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0 and ch in "<>=!":
            op = expr[i:i + 2] if expr[i:i + 2] in ("==", "!=", ">=", "<=") else ch
            if op in ("==", "!=", ">=", "<=", ">", "<"):
                out.append(op)
                i += len(op)
                if not re.match(r"\s*bool\b", expr[i:]):
                    out.append(" bool")
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def rule_exprs() -> list[Expr]:
    """Every alert's expression from rules.yml, with comparisons made `bool` (see _bool_comparisons)."""
    doc = yaml.safe_load(RULES_YML.read_text())
    return [Expr(f"rules.yml: {r['alert']}", _bool_comparisons(r["expr"].strip()))
            for g in doc["groups"] for r in g["rules"]]


def all_exprs() -> list[Expr]:
    return [e for path in GRAFANA_JSON for e in dashboard_exprs(path)] + rule_exprs()


def scrape_names(metrics_text: str) -> set[str]:
    """Series names in a Prometheus text exposition (the part of each sample line before `{` or ' ')."""
    return {re.split(r"[{\s]", line, maxsplit=1)[0] for line in metrics_text.splitlines()
            if line and not line.startswith("#")}
