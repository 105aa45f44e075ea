"""Flower's own Grafana dashboard and Prometheus alerts against this exporter with --flower-metrics.

A real Prometheus scrapes the exporter every second while two real prefork workers on the real
Redis broker run a small workload: successes, failures, a retry, an ETA task, tasks that wait in
a worker's prefetch buffer (concurrency 1, three 2.5 s tasks), then one worker stops (warm
shutdown: worker-offline). Flower's alert file (tests/prometheus/flower/, a bare list of rules)
is wrapped in a group, checked by promtool and evaluated by that Prometheus unchanged.

Then: every query of Flower's dashboard returns data over the run (a query's `or vector(0)`
fallback is taken off first, so that the fallback cannot answer for it), its variables list our
workers' node names and the task names, every alert rule evaluates without error and every alert
went pending (its expression held in Prometheus' rule engine; their `for:` of 2 and 5 minutes are
kept). Last, Flower 2.2.0's own bookkeeping (flower.events.EventsState, fed with the events
Celery's receiver got over the same run) shows the same flower_* series and values as the
exporter's /metrics.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.apps.testapp import client
from tests.harness import EventRecorder, wait_for

from .conftest import PROMTOOL_BIN, PrometheusConfig
from .test_dashboards import GRAFANA_INTERVALS

pytestmark = pytest.mark.integration

FLOWER_DIR = Path(__file__).resolve().parent / "flower"
QUERIES = json.loads((FLOWER_DIR / "dashboard-queries.json").read_text())
ALERTS = yaml.safe_load((FLOWER_DIR / "prometheus-alerts.yaml").read_text())
FALLBACK = re.compile(r"\s+or\s+vector\(0\)\s*$")
SLOW_TASKS, SLOW_SECONDS = 3, 2.5  # waits of 2.5 s in the buffer: TaskPrefetchTimeTooHigh's average passes 1 s


def substitute(expr: str) -> str:
    """Grafana's built-in intervals, and every variable at "All" (the dashboard's allValue .*)."""
    values = {v["name"]: v["allValue"] for v in QUERIES["variables"]}

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return GRAFANA_INTERVALS.get(name) or values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def wrapped_alerts(workdir: Path) -> Path:
    """Flower publishes its rules without `groups:`: the group a user adds around them, nothing else."""
    assert isinstance(ALERTS, list) and all("alert" in rule for rule in ALERTS)
    path = workdir / "flower-alerts.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "flower", "rules": ALERTS}]}, sort_keys=False))
    return path


def flower_samples(text: str, workers: set[str]) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("flower_") and not s.name.endswith("_created") and s.labels["worker"] in workers:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def same(ours: dict, theirs: dict) -> bool:
    return ours.keys() == theirs.keys() and all(math.isclose(ours[k], theirs[k], abs_tol=1e-6) for k in ours)


def test_flowers_dashboard_and_alerts_work_unchanged(redis_broker, make_exporter, make_worker, prometheus_factory,
                                                     tmp_path):
    from flower.events import EventsState
    from prometheus_client import REGISTRY, generate_latest

    run = uuid.uuid4().hex[:6]
    slow_queue, work_queue = f"slow-{run}", f"work-{run}"
    rules = wrapped_alerts(tmp_path)
    check = subprocess.run([PROMTOOL_BIN, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 3 rules found" in check.stdout

    exporter = make_exporter(redis_broker.url, "--flower-metrics", "--inspect-interval", "0", "--no-broker-poll")
    prom = prometheus_factory(PrometheusConfig(rule_files=[rules], scrape_targets=[f"127.0.0.1:{exporter.port}"],
                                               scrape_interval="1s", evaluation_interval="1s"))
    started = time.time()
    buffered = make_worker(redis_broker.url, f"fl1{run}", queues=slow_queue, concurrency=1)
    stopping = make_worker(redis_broker.url, f"fl2{run}", queues=work_queue, concurrency=2)
    recorder = EventRecorder(redis_broker.url).start()
    try:
        online = 'flower_worker_online{worker="%s"}'
        for worker in (buffered, stopping):
            wait_for(lambda: prom.query(online % worker.hostname + " == 1"), 30, 0.5, f"{worker.hostname} online")

        publisher = client(redis_broker.url)
        for seconds in [SLOW_SECONDS] * SLOW_TASKS:
            publisher.send_task("tests.sleep", (seconds,), queue=slow_queue)
        for i in range(8):
            publisher.send_task("tests.add", (i, i), queue=work_queue)
        for _ in range(3):
            publisher.send_task("tests.fail", queue=work_queue)
        publisher.send_task("tests.retry_once", queue=work_queue)
        publisher.send_task("tests.add", (1, 2), queue=work_queue, countdown=1)  # an ETA: no prefetch gauges

        done = 'sum(flower_events_total{type="%s"})'
        wait_for(lambda: prom.query(done % "task-succeeded" + " == 13"), 60, 0.5, "13 successes in Prometheus")
        wait_for(lambda: prom.query(done % "task-failed" + " == 3"), 10, 0.5, "3 failures in Prometheus")
        assert stopping.terminate() == 0  # warm shutdown: worker-offline
        wait_for(lambda: prom.query(online % stopping.hostname + " == 0"), 20, 0.5, f"{stopping.hostname} offline")
        pending = {rule["alert"] for rule in ALERTS}
        wait_for(lambda: {s["metric"]["alertname"] for s in prom.query_range(
            'ALERTS{alertstate="pending"}', started, time.time(), 1)} >= pending, 30, 1, f"{pending} pending")
        end = time.time()

        # the dashboard: every panel's query returns data of its own; the variables list our values
        empty = []
        for panel in QUERIES["panels"]:
            query = FALLBACK.sub("", substitute(panel["expr"]))
            if not prom.query_range(query, started, end, 1):
                empty.append(f'{panel["title"]}: {query}')
        assert empty == []
        assert len(QUERIES["panels"]) == 12
        variables = {v["name"]: re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]).groups()
                     for v in QUERIES["variables"]}
        assert set(variables) == {"worker", "task"}
        assert set(prom.label_values(variables["worker"][1], variables["worker"][0])) == {
            buffered.hostname, stopping.hostname}
        assert {"tests.sleep", "tests.add", "tests.fail", "tests.retry_once"} <= set(
            prom.label_values(variables["task"][1], variables["task"][0]))

        # the alerts: loaded unchanged, evaluated without error, each expression held at some point
        (group,) = [g for g in prom.rules() if g["name"] == "flower"]
        assert [r["name"] for r in group["rules"]] == [rule["alert"] for rule in ALERTS]
        for rule in group["rules"]:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule
        offline = prom.query_range('ALERTS{alertname="CeleryWorkerOffline"}', started, end, 1)
        assert {s["metric"]["worker"] for s in offline} == {stopping.hostname}
        prefetch = prom.query_range('ALERTS{alertname="TaskPrefetchTimeTooHigh"}', started, end, 1)
        assert {(s["metric"]["worker"], s["metric"]["task"]) for s in prefetch} == {(buffered.hostname, "tests.sleep")}
        failing = prom.query_range('ALERTS{alertname="TaskFailureRatioTooHigh"}', started, end, 1)
        assert {s["metric"]["task"] for s in failing} == {"tests.fail"}
    finally:
        recorder.stop()

    # Flower's own bookkeeping of the same events shows the same series
    flower = EventsState(max_tasks_in_memory=10_000)
    for event in recorder.events:
        flower.event(dict(event))
    workers = {event["hostname"] for event in recorder.events}
    assert {buffered.hostname, stopping.hostname} < workers  # and the publisher's node name
    theirs = flower_samples(generate_latest(REGISTRY).decode(), workers)
    ours = flower_samples(exporter.get("/metrics")[1], workers)
    assert same(ours, theirs), json.dumps({"only ours": sorted(map(str, ours.keys() - theirs.keys())),
                                           "only Flower's": sorted(map(str, theirs.keys() - ours.keys())),
                                           "differ": sorted(str((k, ours[k], theirs[k])) for k in ours.keys() & theirs.keys()
                                                            if not math.isclose(ours[k], theirs[k], abs_tol=1e-6))},
                                          indent=1)
