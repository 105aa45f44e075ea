"""One source of truth: the rules, the runbook table and the findings all come from thresholds.py.

- The generated files (deploy/prometheus/alerts.yaml, the Helm chart's copy, the "Thresholds" table
  of docs/runbooks.md) are what `python -m celery_health_exporter.rules --write` makes now.
- Every finding that stands for an alert fires exactly past that alert's threshold (just below it:
  nothing) and carries the alert's name and severity; moving a threshold in thresholds.py moves the
  finding's boundary with it (the findings read it, they do not copy it).
"""
from __future__ import annotations

import dataclasses
import shutil
import time

import pytest
import yaml

from celery_health_exporter import findings, rules, thresholds
from celery_health_exporter.findings import KIND_ALERT, diagnose, histogram_quantile
from celery_health_exporter.state.hosts import ProcessSample, WorkerCommand
from celery_health_exporter.state.model import ClusterState
from celery_health_exporter.state.publishers import EVENT_TYPE
from celery_health_exporter.state.queues import QueuesSnapshot, QueueStats

from .events import T0, W, ev


# ------------------------------------------------------------------------------ generated files
def test_generated_files_are_current():
    for path, text in rules.outputs().items():
        assert path.read_text() == text, (
            f"{path.relative_to(rules.ROOT)} differs from thresholds.py: run python -m celery_health_exporter.rules "
            "--write")


def test_the_rules_carry_the_thresholds_severity_for_and_numbers():
    doc = yaml.safe_load(rules.ALERTS_FILE.read_text())
    shipped = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert list(shipped) == [a.name for a in thresholds.ALERTS]
    for a in thresholds.ALERTS:
        rule = shipped[a.name]
        assert rule["labels"] == {"severity": a.severity}
        assert rule["for"] == a.for_
        group = next(g["name"] for g in doc["groups"] if rule in g["rules"])
        assert group == a.group
        for value in a.values.values():
            text = rules._number(value) if not isinstance(value, str) else value
            assert text in rule["expr"], (a.name, value)


def _replace_alert(monkeypatch, name: str, **values) -> thresholds.Alert:
    old = thresholds.alert(name)
    new = dataclasses.replace(old, values={**old.values, **values})
    alerts = tuple(new if a.name == name else a for a in thresholds.ALERTS)
    monkeypatch.setattr(thresholds, "ALERTS", alerts)
    monkeypatch.setattr(thresholds, "BY_NAME", {a.name: a for a in alerts})
    return new


def test_check_and_write_follow_a_changed_threshold(tmp_path, monkeypatch, capsys):
    for attr in ("ALERTS_FILE", "CHART_COPY", "RUNBOOKS_FILE"):
        copy = tmp_path / attr
        shutil.copy(getattr(rules, attr), copy)
        monkeypatch.setattr(rules, attr, copy)
    monkeypatch.setattr(rules, "ROOT", tmp_path)
    assert rules.main(["--check"]) == 0
    _replace_alert(monkeypatch, "CeleryWorkerRestartLoop", restarts=7)
    assert rules.main(["--check"]) == 1
    assert "ALERTS_FILE is not what thresholds.py makes" in capsys.readouterr().err
    assert rules.main(["--write"]) == 0
    assert rules.main(["--check"]) == 0
    written = yaml.safe_load(rules.ALERTS_FILE.read_text())
    loop = next(r for g in written["groups"] for r in g["rules"] if r["alert"] == "CeleryWorkerRestartLoop")
    assert loop["expr"] == "increase(celery_worker_restarts_total[15m]) >= 7"
    assert rules.CHART_COPY.read_text() == rules.ALERTS_FILE.read_text()
    assert "| CeleryWorkerRestartLoop | `>= 7` restarts in `[15m]` |" in rules.RUNBOOKS_FILE.read_text()


def test_a_template_and_its_values_must_match(monkeypatch):
    _replace_alert(monkeypatch, "CeleryWorkerRestartLoop", unused=1)
    with pytest.raises(KeyError, match="no template of rules.py uses"):
        rules.document()
    monkeypatch.undo()
    monkeypatch.setitem(rules.RULES, "CeleryWorkerStalled",
                        dataclasses.replace(rules.RULES["CeleryWorkerStalled"], expr="x > ${nowhere}"))
    with pytest.raises(KeyError, match="does not define"):
        rules.document()


def test_every_alert_has_one_rule_and_the_table_a_row():
    assert set(rules.RULES) == set(thresholds.BY_NAME)
    # alerts.yaml's header promises it: each rule says what happens when its series disappear
    assert [name for name, rule in rules.RULES.items() if not rule.comment.strip()] == []
    table = rules.runbook_table().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in table] == [a.name for a in thresholds.ALERTS]
    assert all(a.severity in thresholds.SEVERITIES for a in thresholds.ALERTS)


def test_each_finding_kind_is_the_one_thresholds_names():
    named = {}
    for a in thresholds.ALERTS:
        assert a.finding, f"{a.name}: say how the findings evaluate it, or 'none: why'"
        kind = a.finding.split(":", 1)[0]
        if kind != "none":
            named[kind] = a.name
    assert named == KIND_ALERT


def test_durations():
    assert thresholds.seconds("15m") == 900 and thresholds.seconds("1h30m") == 5400 and thresholds.seconds(60) == 60
    with pytest.raises(ValueError):
        thresholds.seconds("15 minutes")
    assert rules._words("1h") == "1 hour" and rules._words("15m") == "15 minutes" and rules._dur(3600) == "1h"


# ------------------------------------------------------------------------- findings at the edge
def fresh():
    s = ClusterState(worker_timeout=10, stall_after=60, lost_task_grace=5, utcoffset=0)
    s.broker.configure(kind="redis", broker="redis://x/0")
    s.broker.replace(QueuesSnapshot(queues={}, taken_at=T0))
    return s


def alive(state, host=W, pid=100, now=T0):
    state.apply(ev("worker-heartbeat", hostname=host, pid=pid, freq=2, active=0, processed=0, sw_ver="5.7.0",
                   timestamp=now), now)


def restarts(n):
    s = fresh()
    alive(s, pid=1)
    for i in range(n):
        s.apply(ev("worker-online", pid=2 + i, freq=2), T0 + 1 + i)
    return s, T0 + n + 1


def unclean(n):  # a new pid while the old process was up: a restart and an unclean shutdown each
    return restarts(n)


def unrecoverable(n):  # n crashes of the main process reported by the worker hook
    s = fresh()
    alive(s)
    for i in range(n):
        s.apply(ev("exporter-worker-unrecoverable", exception="TypeError", unpicklable="BadError", exit_code=0),
                T0 + i)
    return s, T0 + n


def running_for(age):
    s = fresh()
    alive(s)
    s.apply(ev("task-received", uuid="t", name="app.slow"), T0)
    s.apply(ev("task-started", uuid="t"), T0)
    return s, T0 + age


def recycled(replacements, per_child):
    s = fresh()
    alive(s)
    counts = [0] * 10
    counts[0] = replacements
    s.apply_hook(W, {"pid": 100, "replacements": {"tasks": replacements},
                     "child_tasks": {"counts": counts, "sum": per_child * replacements},
                     "max_tasks_per_child": 1, "max_memory_per_child_bytes": 0}, T0)
    return s, T0


def revoked(count, limit=50_000):
    s = fresh()
    alive(s)
    s.apply_revoked_count(W, count, limit, T0)
    return s, T0


def expired(n):
    s = fresh()
    alive(s)
    for i in range(n):
        s.apply(ev("task-sent", uuid=f"e{i}", name="app.x", queue="mail"), T0)
        s.apply(ev("task-revoked", uuid=f"e{i}", expired=True), T0)
    return s, T0


def queue(ready, consumers):
    s = fresh()
    s.broker.replace(QueuesSnapshot(queues={"q": QueueStats(ready=ready, consumers=consumers)}, taken_at=T0))
    return s, T0


def unknown_consumers(waited):
    """Redis, no successful remote-control poll: the consumer count is unknown; a task sent to q
    `waited` seconds ago has not started."""
    s = fresh()
    s.apply(ev("task-sent", uuid="w", name="app.x", queue="q"), T0)
    s.broker.replace(QueuesSnapshot(queues={"q": QueueStats(ready=3)}, taken_at=T0 + waited,
                                    consumers_from_workers=True))
    return s, T0 + waited


def unacked(fraction):
    s = fresh()
    s.broker.replace(QueuesSnapshot(queues={"q": QueueStats(ready=0, oldest_unacked_at=T0 - fraction * 1000)},
                                    taken_at=T0, visibility_timeout=1000))
    return s, T0


def lost(n):
    s = fresh()
    alive(s)
    for i in range(n):
        s.apply(ev("task-received", uuid=f"l{i}", name="app.pay"), T0)
        s.apply(ev("task-started", uuid=f"l{i}"), T0)
    s.tick(T0 + 11)  # the worker times out
    s.tick(T0 + 17)  # and the grace has passed
    return s, T0 + 17


def fail_rate(failed, succeeded):
    s = fresh()
    alive(s)
    for i in range(failed + succeeded):
        s.apply(ev("task-received", uuid=f"f{i}", name="app.sync"), T0)
        s.apply(ev("task-started", uuid=f"f{i}"), T0)
        if i < failed:
            s.apply(ev("task-failed", uuid=f"f{i}", exception="ValueError('x')"), T0)
        else:
            s.apply(ev("task-succeeded", uuid=f"f{i}", runtime=0.1), T0)
    return s, T0


def unpicklable(n):
    s = fresh()
    alive(s)
    for i in range(n):
        s.apply(ev("task-retried", uuid=f"u{i}", exception="UnpickleableExceptionWrapper('m', 'BadError', (), '')"),
                T0)
    return s, T0


def published(retries=0, exceeded=0):
    s = fresh()
    s.apply({"type": EVENT_TYPE, "hostname": "web1", "instance": "i1", "timestamp": T0, "utcoffset": 0,
             "publishes": 100, "retries": retries, "retry_policy_exceeded": exceeded, "failures": {}}, T0)
    return s, T0


CMD = WorkerCommand(W, "prefork")


def orphans(n):
    s = fresh()
    now = time.time()
    children = [ProcessSample(11 + i, 10, 10, now - 100, CMD, rss=1000, cpu=1.0) for i in range(n)]
    s.hosts.apply_scan([ProcessSample(10, 1, 10, now - 200, CMD, rss=1000, cpu=1.0), *children],
                       {1, 10, *(c.pid for c in children)}, now)
    left = [ProcessSample(c.pid, 1, 10, c.create_time, CMD, rss=1000, cpu=1.0) for c in children]
    s.hosts.apply_scan(left, {1, *(c.pid for c in children)}, now + 60)  # the main process is gone
    return s, T0


def child_memory(fraction, limit=200 * 2 ** 20):
    s = fresh()
    alive(s)
    s.apply_hook(W, {"pid": 100, "replacements": {}, "max_tasks_per_child": 0,
                     "max_memory_per_child_bytes": limit}, T0)
    now = time.time()
    s.hosts.apply_scan([ProcessSample(10, 1, 10, now - 200, CMD, rss=1000, cpu=1.0),
                        ProcessSample(11, 10, 10, now - 100, CMD, rss=int(fraction * limit), cpu=1.0)],
                       {1, 10, 11}, now)
    return s, T0


def source_down(down):
    s = fresh()
    if down:
        s.broker.fail("connection refused")
    return s, T0


def lagging(seconds_late):
    s = fresh()
    for _ in range(thresholds.FINDINGS_ONLY["event_lag_min_events"]):
        s.event_lag.observe(seconds_late)
    return s, T0


BEAT_ENTRY = {"entry": "nightly", "task": "app.nightly", "schedule": "every 10 seconds", "next": T0 + 10,
              "period": 10.0}


def beat_event(kind, instance="b1", label="beat-1", **fields):
    return {"type": kind, "hostname": label, "instance": instance, "timestamp": T0, "utcoffset": 0, "interval": 1,
            **fields}


def beats(up, down=0):
    """``up`` beat processes reporting, ``down`` more that stopped cleanly."""
    s = fresh()
    for i in range(up + down):
        s.apply(beat_event("exporter-beat", instance=f"b{i}", label=f"beat-{i}", entries=[BEAT_ENTRY]), T0)
    for i in range(up, up + down):
        s.apply(beat_event("exporter-beat-offline", instance=f"b{i}", label=f"beat-{i}"), T0)
    return s, T0


def missed(n):
    """The entry's due times (every 10 s from T0 + 10) pass the grace with no send: ``n`` of them."""
    s, _ = beats(1)
    now = T0 + 10 + s.beat.missed_grace + 10 * (n - 1) + 0.5 if n else T0 + 1
    s.tick(now)
    return s, now


def periodic_failures(n):
    s, _ = beats(1)
    alive(s)
    sends = [{"entry": "nightly", "task": "app.nightly", "id": f"p{i}", "due": T0, "sent": T0, "next": T0 + 10,
              "period": 10.0, "seq": i + 1} for i in range(n + 1)]
    s.apply(beat_event("exporter-beat-sent", sends=sends), T0)
    s.apply(ev("task-succeeded", uuid=f"p{n}", runtime=0.1), T0)  # an earlier run that succeeded
    for i in range(n):
        s.apply(ev("task-failed", uuid=f"p{i}", exception="ValueError('x')"), T0)
    return s, T0


def internal(errors):
    """``errors`` bugs contained by the events source (counted outside the state)."""
    return fresh(), T0, {"events": errors, "inspect": 0, "scrape": 0}


def _value(alert, key):
    return thresholds.alert(alert)[key]


# kind -> (the state just inside the threshold, the state just past it)
EDGES = {
    "restart_loop": lambda: (restarts(_value("CeleryWorkerRestartLoop", "restarts") - 1),
                             restarts(_value("CeleryWorkerRestartLoop", "restarts"))),
    "unclean_shutdown": lambda: (unclean(_value("CeleryWorkerUncleanShutdown", "shutdowns")),
                                 unclean(_value("CeleryWorkerUncleanShutdown", "shutdowns") + 1)),
    "unrecoverable_error": lambda: (unrecoverable(_value("CeleryWorkerUnrecoverableError", "count")),
                                    unrecoverable(_value("CeleryWorkerUnrecoverableError", "count") + 1)),
    "task_running_long": lambda: (running_for(_value("CeleryTaskRunningTooLong", "age")),
                                  running_for(_value("CeleryTaskRunningTooLong", "age") + 1)),
    "recycle_storm": lambda: (recycled(_value("CeleryWorkerChildRecycleStorm", "replacements"),
                                       _value("CeleryWorkerChildRecycleStorm", "tasks_per_child")),
                              recycled(_value("CeleryWorkerChildRecycleStorm", "replacements"),
                                       _value("CeleryWorkerChildRecycleStorm", "tasks_per_child") - 0.5)),
    "child_memory_near_limit": lambda: (child_memory(_value("CeleryWorkerChildMemoryNearLimit", "ratio")),
                                        child_memory(_value("CeleryWorkerChildMemoryNearLimit", "ratio") + 0.01)),
    "revoked_near_limit": lambda: (revoked(int(_value("CeleryWorkerRevokedSetNearLimit", "ratio") * 50_000)),
                                   revoked(int(_value("CeleryWorkerRevokedSetNearLimit", "ratio") * 50_000) + 1)),
    "tasks_expired": lambda: (expired(_value("CeleryTasksExpiring", "expired")),
                              expired(_value("CeleryTasksExpiring", "expired") + 1)),
    "queue_without_consumer": lambda: (queue(0, 0), queue(1, 0)),
    "queue_consumers_unknown": lambda: (
        unknown_consumers(thresholds.alert("CeleryQueueConsumersUnknown").seconds("window") - 1),
        unknown_consumers(thresholds.alert("CeleryQueueConsumersUnknown").seconds("window"))),
    "unacked_near_visibility": lambda: (unacked(_value("CeleryQueueUnackedNearVisibilityTimeout", "ratio")),
                                        unacked(_value("CeleryQueueUnackedNearVisibilityTimeout", "ratio") + 0.01)),
    "tasks_lost": lambda: (lost(_value("CeleryTasksLost", "lost")), lost(_value("CeleryTasksLost", "lost") + 1)),
    # percent = 100 x failed / runs: exactly the threshold, then just above it
    "task_high_fail_rate": lambda: (fail_rate(1, round(100 / _value("CeleryTaskHighFailRate", "percent")) - 1),
                                    fail_rate(1, round(100 / _value("CeleryTaskHighFailRate", "percent")) - 2)),
    "unpicklable_exception": lambda: (unpicklable(_value("CeleryTaskUnpicklableException", "count")),
                                      unpicklable(_value("CeleryTaskUnpicklableException", "count") + 1)),
    "publish_retries": lambda: (published(retries=_value("CeleryPublishRetries", "retries")),
                                published(retries=_value("CeleryPublishRetries", "retries") + 1)),
    "publish_policy_exceeded": lambda: (published(exceeded=_value("CeleryPublishRetryPolicyExceeded", "count")),
                                        published(exceeded=_value("CeleryPublishRetryPolicyExceeded", "count") + 1)),
    "orphaned_processes": lambda: (orphans(_value("CeleryOrphanedWorkerProcesses", "processes")),
                                   orphans(_value("CeleryOrphanedWorkerProcesses", "processes") + 1)),
    "queue_source_down": lambda: (source_down(False), source_down(True)),
    # every event in the bucket just above the lag: the quantile lands inside it, above the lag
    "event_lag": lambda: (lagging(_value("CeleryExporterEventLagHigh", "lag") * 0.9),
                          lagging(_value("CeleryExporterEventLagHigh", "lag") * 1.5)),
    "internal_errors": lambda: (internal(_value("CeleryExporterInternalErrors", "errors")),
                                internal(_value("CeleryExporterInternalErrors", "errors") + 1)),
    "worker_stalled": None,  # the exporter's --stall-after, not a threshold of thresholds.py
    "beat_down": lambda: (beats(1), beats(0, down=1)),
    "periodic_task_missed": lambda: (missed(_value("CeleryPeriodicTaskMissed", "missed")),
                                     missed(_value("CeleryPeriodicTaskMissed", "missed") + 1)),
    "duplicate_schedulers": lambda: (beats(_value("CeleryBeatDuplicateSchedulers", "instances")),
                                     beats(_value("CeleryBeatDuplicateSchedulers", "instances") + 1)),
    "periodic_task_failing": lambda: (periodic_failures(_value("CeleryPeriodicTaskFailing", "failures") - 1),
                                      periodic_failures(_value("CeleryPeriodicTaskFailing", "failures"))),
}


def _of_kind(state_now, kind):
    state, now, *errors = state_now  # and the internal errors per source, where given
    return [f for f in diagnose(state, now, internal_errors=errors[0] if errors else None)
            if f.kind == kind and f.alert]


def test_every_paging_kind_has_an_edge_case():
    assert set(EDGES) == set(KIND_ALERT)


@pytest.mark.parametrize("kind", sorted(k for k, v in EDGES.items() if v), ids=str)
def test_a_finding_fires_exactly_past_its_alerts_threshold(kind):
    inside, past = EDGES[kind]()
    assert _of_kind(inside, kind) == [], "a finding inside the rule's threshold"
    found = _of_kind(past, kind)
    assert len(found) == 1, f"no {kind} finding past the rule's threshold"
    alert = thresholds.alert(KIND_ALERT[kind])
    assert (found[0].alert, found[0].severity) == (alert.name, alert.severity)


# A changed threshold moves the finding with it: (kind, alert, value key, new value).
MOVED = [
    ("restart_loop", "CeleryWorkerRestartLoop", "restarts", 5),
    ("task_running_long", "CeleryTaskRunningTooLong", "age", 120),
    ("tasks_expired", "CeleryTasksExpiring", "expired", 3),
    ("publish_retries", "CeleryPublishRetries", "retries", 2),
    ("revoked_near_limit", "CeleryWorkerRevokedSetNearLimit", "ratio", 0.5),
    ("event_lag", "CeleryExporterEventLagHigh", "lag", 30),
    ("recycle_storm", "CeleryWorkerChildRecycleStorm", "replacements", 20),
    ("queue_consumers_unknown", "CeleryQueueConsumersUnknown", "window", "1h"),
    ("internal_errors", "CeleryExporterInternalErrors", "errors", 2),
]


@pytest.mark.parametrize("kind, alert, key, value", MOVED, ids=[m[0] for m in MOVED])
def test_a_moved_threshold_moves_the_finding(monkeypatch, kind, alert, key, value):
    _replace_alert(monkeypatch, alert, **{key: value})
    inside, past = EDGES[kind]()
    assert _of_kind(inside, kind) == []
    assert len(_of_kind(past, kind)) == 1


def test_a_changed_severity_is_the_findings_too(monkeypatch):
    old = thresholds.alert("CeleryOrphanedWorkerProcesses")
    new = dataclasses.replace(old, severity="critical")
    monkeypatch.setattr(thresholds, "BY_NAME", {**thresholds.BY_NAME, old.name: new})
    (found,) = _of_kind(orphans(1), "orphaned_processes")
    assert found.severity == "critical"


def test_revoked_limit_unknown_is_celerys_default_and_zero_is_unlimited():
    assert _of_kind(revoked(45_000, limit=None), "revoked_near_limit")[0].summary.endswith(
        "(Celery default assumed).")
    assert _of_kind(revoked(45_000, limit=0), "revoked_near_limit") == []


def test_expired_below_the_alert_is_only_said():
    state, now = expired(1)
    (found,) = [f for f in diagnose(state, now) if f.kind == "tasks_expired"]
    assert (found.severity, found.alert) == ("info", "")


def test_event_lag_quantile_is_prometheus_histogram_quantile():
    # deploy/prometheus/tests/exporter.yaml: every event 5-10 s late; promtool says p99 = 9.95 s
    cumulative = [("0.1", 0), ("1.0", 0), ("5.0", 0), ("10.0", 100), ("+Inf", 100)]
    assert histogram_quantile(0.99, cumulative) == pytest.approx(9.95)
    assert histogram_quantile(0.5, [("1.0", 10), ("+Inf", 20)]) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.99, [("1.0", 0), ("+Inf", 0)]) is None


def test_findings_read_the_thresholds_module():
    assert findings.thresholds is thresholds


def test_docs_findings_kinds_table_has_the_alerts_severity():
    text = (rules.ROOT / "docs" / "findings.md").read_text().split("## Kinds", 1)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| `")]
    paging = {row[0].strip("`"): row for row in rows if row[2] != "—"}
    assert set(paging) == set(KIND_ALERT)
    for kind, (_, severity, alert, _when) in paging.items():
        assert alert == KIND_ALERT[kind]
        assert severity == thresholds.alert(alert).severity, kind
