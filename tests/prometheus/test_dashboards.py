"""The Grafana dashboards of grafana/: structure, variables, units, and every query parsed by a
real Prometheus after template substitution."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import GRAFANA_DIR
from .test_rules import (
    COUNTER_FUNCTIONS,
    allowed_series,
    counter_function_misuse,
    function_arguments,
    metric_names,
    unguarded_divisions,
)

EXPECTED_DASHBOARDS = {
    "overview.json": ("celery-health-overview", "Celery / Overview"),
    "workers.json": ("celery-health-workers", "Celery / Workers"),
    "queues-and-broker.json": ("celery-health-queues", "Celery / Queues and broker"),
    "failure-modes.json": ("celery-health-failure-modes", "Celery / Failure modes"),
    "publishers-and-hosts.json": ("celery-health-publishers-hosts", "Celery / Publishers and hosts"),
}
DS_UIDS = {"${datasource}", "$datasource"}
NO_DATASOURCE_PANELS = {"row", "text"}
# Grafana's built-in interval variables, then every other $var / ${var} / ${var:format} -> ".*"
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "__range_s": "3600",
                     "__interval_ms": "60000"}


def substitute(expr: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return GRAFANA_INTERVALS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def load_dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA_DIR.glob("*.json"))}


DASHBOARDS = load_dashboards()


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every target of every panel."""
    return [
        (name, panel["title"], target["expr"])
        for name, dash in DASHBOARDS.items()
        for panel in all_panels(dash)
        for target in panel.get("targets", [])
    ]


def variable_selectors() -> list[tuple[str, str, str]]:
    """(dashboard, variable, series selector) of every label_values(selector, label) variable."""
    out = []
    for name, dash in DASHBOARDS.items():
        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
            assert m, f"{name} ${var['name']}: not a label_values(selector, label) query: {query}"
            out.append((name, var["name"], m.group(1)))
    return out


QUERIES = panel_queries()


def test_the_five_dashboards_exist_with_stable_uids():
    assert set(DASHBOARDS) == set(EXPECTED_DASHBOARDS)
    for name, (uid, title) in EXPECTED_DASHBOARDS.items():
        dash = DASHBOARDS[name]
        assert dash["uid"] == uid
        assert dash["title"] == title
        assert 36 <= dash["schemaVersion"] <= 41
        assert "celery-health-exporter" in dash["tags"]


@pytest.mark.parametrize("name", sorted(EXPECTED_DASHBOARDS))
def test_template_variables(name):
    variables = {v["name"]: v for v in DASHBOARDS[name]["templating"]["list"]}
    assert {"datasource", "job", "queue", "worker"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    definitions = {k: v["query"]["query"] for k, v in variables.items() if v["type"] == "query"}
    assert re.fullmatch(r"label_values\(celery_queue_length\b.*, queue_name\)", definitions["queue"])
    assert re.fullmatch(r"label_values\(celery_\w+\b.*, hostname\)", definitions["worker"])
    assert re.fullmatch(r"label_values\(celery_\w+\b.*, job\)", definitions["job"])
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] in DS_UIDS
            assert var.get("allValue") == ".*"


@pytest.mark.parametrize("name", sorted(EXPECTED_DASHBOARDS))
def test_panels_have_title_datasource_and_unit(name):
    panels = all_panels(DASHBOARDS[name])
    assert len(panels) >= 10
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    data_panels = 0
    for panel in panels:
        assert panel.get("title", "").strip(), f"panel {panel['id']} has no title"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        if panel["type"] in NO_DATASOURCE_PANELS:
            continue
        data_panels += 1
        assert panel["datasource"]["uid"] in DS_UIDS, panel["title"]
        assert panel["datasource"]["type"] == "prometheus"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in DS_UIDS, panel["title"]
            assert target["expr"].strip()
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
    assert data_panels >= 8


def test_failure_modes_have_a_graph_and_a_text_per_row():
    panels = DASHBOARDS["failure-modes.json"]["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    assert len(rows) >= 10
    topics = " ".join(p["title"].lower() for p in panels if p["type"] == "row")
    for topic in ("restart", "stalled", "recycle", "memory", "revoked", "unpicklable", "orphan",
                  "visibility", "consumers", "publish", "lost"):
        assert topic in topics, f"no row about {topic}"
    for start, end in zip(rows, rows[1:] + [len(panels)]):
        kinds = sorted(p["type"] for p in panels[start + 1 : end])
        assert kinds == ["text", "timeseries"], (panels[start]["title"], kinds)
        text = next(p for p in panels[start + 1 : end] if p["type"] == "text")
        content = text["options"]["content"]
        assert "What it means" in content and "What to do" in content, panels[start]["title"]


def test_overview_shows_what_the_issue_lists():
    titles = " | ".join(p["title"].lower() for p in all_panels(DASHBOARDS["overview.json"]))
    for words in ("workers up", "workers down", "throughput", "failure rate", "runtime", "queue wait",
                  "queue length", "firing alerts"):
        assert words in titles, words


def test_every_query_uses_only_contract_metrics():
    assert len(QUERIES) >= 100
    used = set()
    for dash, title, expr in QUERIES:
        names = metric_names(substitute(expr))
        assert names, f"{dash} / {title}: selects no metric"
        used |= names
    used |= {n for _d, _v, sel in variable_selectors() for n in metric_names(substitute(sel))}
    assert used - allowed_series() == set()
    assert len(used) >= 50


def test_rate_only_over_counters_and_divisions_guarded():
    rates = 0
    for dash, title, expr in QUERIES:
        expr = substitute(expr)
        assert counter_function_misuse(expr) == [], f"{dash} / {title}"
        assert unguarded_divisions(expr) == [], f"{dash} / {title}"
        rates += len(function_arguments(expr, COUNTER_FUNCTIONS))
    assert rates >= 50


def test_substitution():
    assert substitute('rate(x{job=~"$job", q=~"${queue}"}[$__rate_interval])') == 'rate(x{job=~".*", q=~".*"}[1m])'
    assert substitute('increase(x{w=~"${worker:regex}"}[$__range])') == 'increase(x{w=~".*"}[1h])'


@pytest.mark.integration
def test_prometheus_rejects_a_bad_query(prometheus):
    """The parse check below is not vacuous."""
    assert prometheus.parse_error("sum(rate(x[5m])") is not None
    assert prometheus.parse_error('rate(x{job=~"$job"}[$__rate_interval])') is not None
    assert prometheus.parse_error("sum(rate(x_total[5m]))") is None


@pytest.mark.integration
def test_every_panel_query_parses_in_prometheus(prometheus):
    errors = {}
    for dash, title, expr in QUERIES:
        error = prometheus.parse_error(substitute(expr))
        if error:
            errors[f"{dash} / {title}: {substitute(expr)}"] = error
    assert errors == {}
    assert len(QUERIES) >= 100


@pytest.mark.integration
def test_every_variable_selector_parses_in_prometheus(prometheus):
    selectors = variable_selectors()
    assert len(selectors) >= 3 * len(EXPECTED_DASHBOARDS)
    errors = {}
    for dash, var, selector in selectors:
        error = prometheus.parse_error(substitute(selector))
        if error:
            errors[f"{dash} ${var}: {selector}"] = error
    assert errors == {}
