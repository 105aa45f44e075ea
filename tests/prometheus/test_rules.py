"""The shipped alert rules: promtool check/test, a lint for common mistakes, runbook links.

This module also holds the metric-name contract of issues 2-5 (CONTRACT_METRICS) and the small
PromQL helpers that tests/prometheus/test_dashboards.py reuses.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from .conftest import ALERTS_FILE, RULE_TESTS_DIR, RUNBOOKS_FILE, PrometheusConfig, override_rules

# --------------------------------------------------------------------------------------------
# The contract: every metric the exporter exposes (issues 2, 3, 4, 5), with the default prefix.
# Histograms are listed by base name; HISTOGRAMS gives their _bucket/_sum/_count series.
CONTRACT_METRICS = {
    # issue 2 - task flow (celery-mixin names)
    "celery_task_sent_total",
    "celery_task_received_total",
    "celery_task_started_total",
    "celery_task_succeeded_total",
    "celery_task_retried_total",
    "celery_task_revoked_total",
    "celery_task_rejected_total",
    "celery_task_failed_total",
    "celery_task_runtime",
    "celery_task_queue_wait_time",
    # issue 2 - workers
    "celery_worker_up",
    "celery_worker_tasks_active",
    "celery_worker_info",
    "celery_worker_heartbeat_age_seconds",
    "celery_worker_tasks_processed_total",
    # issue 2 - exporter itself
    "celery_exporter_events_total",
    "celery_exporter_event_lag_seconds",
    "celery_exporter_source_up",
    "celery_exporter_source_last_success_timestamp_seconds",
    "celery_exporter_broker_reconnects_total",
    "celery_exporter_tracked_tasks",
    "celery_exporter_tracked_tasks_evicted_total",
    # issue 15 - the exporter's own failures and bugs
    "celery_exporter_source_failures_total",
    "celery_exporter_internal_errors_total",
    # issue 3 - worker failures
    "celery_worker_start_time_seconds",
    "celery_worker_restarts_total",
    "celery_worker_unclean_shutdowns_total",
    "celery_worker_unrecoverable_errors_total",
    "celery_worker_prefetched_tasks",
    "celery_worker_oldest_active_task_age_seconds",
    "celery_task_active_oldest_age_seconds",
    "celery_worker_stalled",
    "celery_worker_pool_processes",
    "celery_worker_pool_max_concurrency",
    "celery_worker_prefetch_count",
    "celery_worker_child_replacements_total",
    "celery_worker_child_tasks",
    "celery_worker_child_peak_rss_bytes",
    "celery_worker_max_tasks_per_child",
    "celery_worker_max_memory_per_child_bytes",
    "celery_worker_revoked_tasks",
    "celery_worker_revoked_tasks_limit",
    "celery_task_expired_total",
    "celery_task_lost_total",
    "celery_task_unpicklable_exceptions_total",
    # issue 4 - broker
    "celery_queue_length",
    "celery_queue_length_by_priority",
    "celery_queue_unacked",
    "celery_queue_oldest_unacked_age_seconds",
    "celery_broker_visibility_timeout_seconds",
    "celery_active_consumer_count",
    "celery_broker_consumers_known",
    "celery_queue_consumer_utilisation",
    "celery_queue_messages_published_total",
    "celery_queue_messages_delivered_total",
    "celery_queue_messages_redelivered_total",
    "celery_queue_messages_acked_total",
    "celery_queue_oldest_unstarted_task_age_seconds",
    "celery_broker_up",
    "celery_broker_connections",
    # issue 5 - host agent and publisher hook
    "celery_host_worker_processes",
    "celery_host_worker_rss_bytes",
    "celery_host_worker_cpu_seconds_total",
    "celery_host_child_rss_min_bytes",
    "celery_host_child_rss_max_bytes",
    "celery_host_child_spawns_total",
    "celery_host_orphaned_processes",
    "celery_host_orphaned_rss_bytes",
    "celery_publish_total",
    "celery_publish_retries_total",
    "celery_publish_failures_total",
    "celery_publish_retry_policy_exceeded_total",
    "celery_publish_duration_seconds",
    # issue 16 - periodic tasks (beat hook)
    "celery_beat_up",
    "celery_beat_instances",
    "celery_beat_entry_runs_total",
    "celery_beat_entry_last_run_timestamp_seconds",
    "celery_beat_entry_next_run_timestamp_seconds",
    "celery_beat_entry_missed_runs_total",
    "celery_beat_duplicate_runs_total",
    "celery_beat_entry_failures_total",
    "celery_beat_entry_send_errors_total",
    "celery_beat_entry_last_run_success",
    "celery_beat_entry_last_run_duration_seconds",
    "celery_beat_entry_info",
    "celery_beat_hook_errors_total",
}
HISTOGRAMS = {
    "celery_task_runtime",
    "celery_task_queue_wait_time",
    "celery_exporter_event_lag_seconds",
    "celery_worker_child_tasks",
    "celery_publish_duration_seconds",
}
# Series not from our contract that queries may use: Prometheus' own ALERTS and `up` (the scrape's
# health, which CeleryExporterDown reads) and the standard process_* metrics of the exporter
# (prometheus_client).
BUILTIN_SERIES = {"ALERTS", "up", "process_resident_memory_bytes", "process_cpu_seconds_total"}


def allowed_series() -> set[str]:
    names = {n for n in CONTRACT_METRICS if n not in HISTOGRAMS}
    for h in HISTOGRAMS:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return names | BUILTIN_SERIES


# The alerts issue 6 asks for (names are ours; CeleryWorkerDown and CeleryTaskHighFailRate are
# also the celery-mixin's), and the two for series that disappear in a failure: the exporter down,
# and consumer counts unknown on Redis.
REQUIRED_ALERTS = {
    "CeleryExporterDown",
    "CeleryQueueConsumersUnknown",
    "CeleryWorkerDown",
    "CeleryWorkerRestartLoop",
    "CeleryWorkerUncleanShutdown",
    "CeleryWorkerUnrecoverableError",
    "CeleryWorkerStalled",
    "CeleryTaskRunningTooLong",
    "CeleryWorkerChildRecycleStorm",
    "CeleryWorkerChildMemoryNearLimit",
    "CeleryWorkerRevokedSetNearLimit",
    "CeleryTasksExpiring",
    "CeleryQueueWithoutConsumers",
    "CeleryQueueBacklogGrowing",
    "CeleryQueueUnackedNearVisibilityTimeout",
    "CeleryTasksLost",
    "CeleryPublishRetries",
    "CeleryPublishRetryPolicyExceeded",
    "CeleryOrphanedWorkerProcesses",
    "CeleryTaskHighFailRate",
    "CeleryTaskUnpicklableException",
    "CeleryExporterNoEvents",
    "CeleryExporterSourceDown",
    "CeleryExporterEventLagHigh",
    # issue 16: periodic tasks
    "CeleryBeatDown",
    "CeleryPeriodicTaskMissed",
    "CeleryBeatDuplicateSchedulers",
    "CeleryPeriodicTaskFailing",
    # issue 15: a poller that keeps failing, and the exporter's own bugs
    "CeleryExporterSourceFlapping",
    "CeleryExporterInternalErrors",
}
RUNBOOK_BASE = "https://github.com/celery-health-exporter/celery-health-exporter/blob/main/docs/runbooks.md#"

# --------------------------------------------------------------------------------------------
# PromQL helpers (regex based: enough for our own expressions; the real parse is Prometheus').
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "bool", "offset", "inf", "nan", "Inf", "NaN",
            # aggregation operators, which can be followed by `by (...)` instead of `(`
            "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
            "bottomk", "topk", "quantile"}
COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")
COUNTER_FUNCTIONS = ("rate", "irate", "increase", "resets")
GAUGE_FUNCTIONS = ("deriv", "delta", "idelta", "predict_linear")


def strip_strings(expr: str) -> str:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"'(?:[^'\\]|\\.)*'", "''", expr)
    return re.sub(r"`[^`]*`", "``", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression."""
    s = strip_strings(expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range / subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        prev = s[m.start() - 1] if m.start() else " "
        if prev.isdigit() or prev == ".":  # 1e3, 5m
            continue
        if s[m.end():].lstrip().startswith("("):  # function or aggregation
            continue
        if m.group(0) in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def _balanced(s: str, open_idx: int) -> str:
    depth = 0
    for i in range(open_idx, len(s)):
        if s[i] == "(":
            depth += 1
        elif s[i] == ")":
            depth -= 1
            if depth == 0:
                return s[open_idx + 1 : i]
    raise ValueError(f"unbalanced parentheses in {s!r}")


def function_arguments(expr: str, functions: tuple[str, ...]) -> list[tuple[str, str]]:
    """(function, argument text) for every call of one of `functions`."""
    s = strip_strings(expr)
    out = []
    for m in re.finditer(r"\b(" + "|".join(functions) + r")\s*\(", s):
        out.append((m.group(1), _balanced(s, m.end() - 1)))
    return out


def counter_function_misuse(expr: str) -> list[str]:
    """rate/irate/increase over non-counters, deriv/delta over counters."""
    problems = []
    for fn, arg in function_arguments(expr, COUNTER_FUNCTIONS):
        for name in metric_names(arg):
            if not name.endswith(COUNTER_SUFFIXES):
                problems.append(f"{fn}() over {name}, which is not a counter")
    for fn, arg in function_arguments(expr, GAUGE_FUNCTIONS):
        for name in metric_names(arg):
            if name.endswith(COUNTER_SUFFIXES):
                problems.append(f"{fn}() over counter {name}: use rate()/increase()")
    return problems


_STOP_WORDS = re.compile(r"(and|or|unless)\b")
_GUARD = re.compile(r"clamp_min\s*\(|>=?\s*\d")


def _right_operand(s: str, start: int) -> str:
    """Text of the right operand of a binary operator whose operator ends at `start`."""
    i = start
    m = re.match(r"\s*(?:bool\s*)?(?:(?:on|ignoring)\s*\([^)]*\)\s*)?(?:(?:group_left|group_right)\s*(?:\([^)]*\))?\s*)?", s[i:])
    i += m.end()
    begin, depth = i, 0
    while i < len(s):
        c = s[i]
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if depth < 0:
                break
        elif depth == 0:
            if c in "+-*/%<>=!" and i > begin:
                break
            if _STOP_WORDS.match(s, i) and (i == 0 or not (s[i - 1].isalnum() or s[i - 1] == "_")):
                break
        i += 1
    return s[begin:i]


def unguarded_divisions(expr: str) -> list[str]:
    """Divisions whose denominator is neither clamp_min(...) nor filtered by `> N` / `>= N`."""
    s = strip_strings(expr)
    problems = []
    for m in re.finditer(r"/", s):
        operand = _right_operand(s, m.end())
        if not _GUARD.search(operand):
            problems.append(f"division by {operand.strip()!r} without a zero guard")
    return problems


# --------------------------------------------------------------------------------------------
def load_alerts() -> list[dict]:
    doc = yaml.safe_load(ALERTS_FILE.read_text())
    return [dict(rule, group=g["name"]) for g in doc["groups"] for rule in g["rules"] if "alert" in rule]


def runbook_anchors() -> set[str]:
    """GitHub's anchors for the headings of docs/runbooks.md."""
    anchors = set()
    for line in RUNBOOKS_FILE.read_text().splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def rule_test_cases() -> list[tuple[str, dict]]:
    cases = []
    for path in sorted(RULE_TESTS_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert [(path.parent / f).resolve() for f in doc["rule_files"]] == [ALERTS_FILE], \
            f"{path.name} must test ../alerts.yaml"
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.append((path.name, case))
    return cases


ALERTS = load_alerts()
ALERT_IDS = [a["alert"] for a in ALERTS]


def test_alert_list_is_the_one_the_issue_asks_for():
    assert len(ALERTS) >= 21
    assert len(set(ALERT_IDS)) == len(ALERT_IDS), "duplicate alert names"
    assert set(ALERT_IDS) == REQUIRED_ALERTS


def test_one_group_per_concern():
    groups = {a["group"] for a in ALERTS}
    assert len(groups) >= 6
    assert all(g.startswith("celery-") for g in groups)


def test_promtool_check_rules(promtool):
    proc = subprocess.run([promtool, "check", "rules", str(ALERTS_FILE)], capture_output=True, text=True, timeout=30)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    m = re.search(r"SUCCESS: (\d+) rules found", output)
    assert m, output
    assert int(m.group(1)) == len(ALERTS)


def test_promtool_test_rules(promtool):
    files = sorted(str(p) for p in RULE_TESTS_DIR.glob("*.yaml"))
    assert len(files) >= 8
    proc = subprocess.run([promtool, "test", "rules", *files], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert output.count("SUCCESS") == len(files), output
    assert "FAILED" not in output


def test_promtool_tests_fail_when_the_rules_never_fire(promtool, tmp_path):
    """Every alert's firing case really depends on its rule: with every expression replaced by
    one that never fires, promtool reports a failure for every alert."""
    mutated = override_rules(ALERTS_FILE, tmp_path, exprs={name: "vector(1) < 0" for name in ALERT_IDS})
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    for path in RULE_TESTS_DIR.glob("*.yaml"):
        (tests_dir / path.name).write_text(path.read_text())
    assert mutated == tmp_path / "alerts.yaml"
    proc = subprocess.run(
        [promtool, "test", "rules", *sorted(str(p) for p in tests_dir.glob("*.yaml"))],
        capture_output=True, text=True, timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    failed = set(re.findall(r"alertname: (\w+), time:", output))
    assert failed == set(ALERT_IDS), sorted(set(ALERT_IDS) - failed)


@pytest.mark.parametrize("alert", ALERTS, ids=ALERT_IDS)
def test_alert_has_for_severity_annotations_and_runbook(alert):
    assert re.fullmatch(r"\d+[smh]", str(alert.get("for", ""))), "every alert needs a for: duration"
    assert alert.get("labels", {}).get("severity") in {"critical", "warning", "info"}
    ann = alert.get("annotations", {})
    assert ann.get("summary", "").strip()
    desc = ann.get("description", "")
    assert "$value" in desc, "the description must give the number"
    assert re.search(r"\$labels\.(hostname|queue_name|name|publisher|instance|source|beat)", desc), \
        "the description must name the worker / queue / task / beat"
    assert ann.get("runbook_url", "").startswith(RUNBOOK_BASE)


def test_runbook_anchors_exist():
    anchors = runbook_anchors()
    assert len(anchors) > len(ALERTS)
    for alert in ALERTS:
        anchor = alert["annotations"]["runbook_url"][len(RUNBOOK_BASE):]
        assert anchor == alert["alert"].lower(), anchor
        assert anchor in anchors, f"docs/runbooks.md has no section #{anchor}"


def test_runbook_thresholds_table_lists_every_alert():
    text = RUNBOOKS_FILE.read_text()
    assert "## Thresholds" in text
    table = text.split("## Thresholds", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| Celery")]
    assert sorted(line.split("|")[1].strip() for line in rows) == sorted(ALERT_IDS)


def test_rate_and_increase_only_over_counters():
    checked = 0
    for alert in ALERTS:
        assert counter_function_misuse(alert["expr"]) == [], alert["alert"]
        checked += len(function_arguments(alert["expr"], COUNTER_FUNCTIONS))
    assert checked >= 15


def test_divisions_are_guarded_against_zero():
    divisions = 0
    for alert in ALERTS:
        assert unguarded_divisions(alert["expr"]) == [], alert["alert"]
        divisions += strip_strings(alert["expr"]).count("/")
    assert divisions >= 5


def test_lint_helpers_catch_mistakes():
    assert counter_function_misuse("rate(celery_queue_length[5m])")
    assert counter_function_misuse("deriv(celery_task_sent_total[5m])")
    assert not counter_function_misuse('sum by (le) (rate(celery_task_runtime_bucket{job=~"a/b"}[5m]))')
    assert unguarded_divisions("a / b > 0.5")
    assert unguarded_divisions("sum(a) / sum by (x) (b) * 100 > 5")
    assert unguarded_divisions("a / on (job) group_left () b")
    assert not unguarded_divisions("a / clamp_min(b, 1)")
    assert not unguarded_divisions("a / (b > 0) > 0.9")
    assert not unguarded_divisions("a / on (job, instance) group_left () (b > 0) > 0.8")
    assert metric_names('histogram_quantile(0.99, sum by (le, job) (rate(x_bucket{a="b"}[5m]))) > 1e3') == {"x_bucket"}
    assert metric_names("a and on (job) b offset 5m or vector(0)") == {"a", "b"}


def test_rule_metrics_belong_to_the_contract():
    used = set().union(*(metric_names(a["expr"]) for a in ALERTS))
    assert len(used) >= 25
    assert used - allowed_series() == set()


def test_every_alert_has_a_firing_and_a_non_firing_case():
    cases = rule_test_cases()
    firing = {case["alertname"] for _f, case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for _f, case in cases if not case.get("exp_alerts")}
    assert firing == set(ALERT_IDS), sorted(set(ALERT_IDS) - firing)
    assert quiet == set(ALERT_IDS), sorted(set(ALERT_IDS) - quiet)
    severities = {a["alert"]: a["labels"]["severity"] for a in ALERTS}
    for fname, case in cases:
        for exp in case.get("exp_alerts") or []:
            labels = exp.get("exp_labels") or {}
            assert labels.get("severity") == severities[case["alertname"]], (fname, case["alertname"])
            assert exp.get("exp_annotations", {}).get("runbook_url", "").endswith("#" + case["alertname"].lower())


@pytest.mark.integration
@pytest.mark.parametrize(
    "prometheus",
    [PrometheusConfig(rule_files=[ALERTS_FILE], evaluation_interval="1s")],
    indirect=True,
    ids=["shipped-rules"],
)
def test_prometheus_loads_and_evaluates_the_rules(prometheus):
    def evaluated():
        rules = [r for g in prometheus.rules() for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = prometheus.wait_for(evaluated, timeout=15)
    assert sorted(r["name"] for r in rules) == sorted(ALERT_IDS)
    assert {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"} == {}
    assert prometheus.firing_alerts() == []  # no data, nothing fires
