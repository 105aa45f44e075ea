"""The findings engine on hand-made states: each finding, its numbers, and silence when healthy."""
import pytest

from celery_health_exporter.findings import diagnose
from celery_health_exporter.state.model import ClusterState
from celery_health_exporter.state.publishers import EVENT_TYPE
from celery_health_exporter.state.queues import QueuesSnapshot, QueueStats

from .events import T0, W, ev

W2 = "w2@h"


@pytest.fixture
def state():
    s = ClusterState(worker_timeout=10, stall_after=60, lost_task_grace=5, utcoffset=0)
    s.broker.configure(kind="redis", broker="redis://x/0")
    s.broker.replace(QueuesSnapshot(queues={}, taken_at=T0))
    return s


def alive(state, host=W, pid=100, now=T0, **extra):
    state.apply(ev("worker-heartbeat", hostname=host, pid=pid, freq=2, active=0, processed=0,
                   sw_ver="5.7.0", timestamp=now, **extra), now)
    state.apply(ev("task-received", hostname=host, uuid=f"seed-{host}-{now}", name="app.seed"), now)
    state.apply(ev("task-succeeded", hostname=host, uuid=f"seed-{host}-{now}", runtime=1), now)


def kinds(findings):
    return {f.kind: f for f in findings}


def test_a_healthy_cluster_has_no_findings(state):
    alive(state)
    alive(state, W2)
    assert diagnose(state, T0 + 1) == []


def test_restart_loop_and_unclean_shutdowns(state):
    alive(state, pid=1)
    for pid in (2, 3):
        state.apply(ev("worker-online", pid=pid, freq=2), T0 + pid)
    found = kinds(diagnose(state, T0 + 5))
    assert "restart_loop" not in found  # 2 restarts: the rule's 3 not reached
    assert "2 time(s)" in found["unclean_shutdown"].summary
    state.apply(ev("worker-online", pid=4, freq=2), T0 + 4)
    found = kinds(diagnose(state, T0 + 5))
    assert "restarted 3 times" in found["restart_loop"].summary
    assert found["restart_loop"].severity == "critical" and found["restart_loop"].alert == "CeleryWorkerRestartLoop"


def test_stalled_worker_and_long_running_task_with_its_peers(state):
    alive(state)
    state.apply(ev("task-received", uuid="h", name="app.seed"), T0)
    state.apply(ev("task-started", uuid="h"), T0)
    state.apply(ev("worker-heartbeat", pid=100, freq=2, active=1, processed=1), T0 + 1)
    found = kinds(diagnose(state, T0 + 90))
    assert found["worker_stalled"].subject == W and "for 90s" in found["worker_stalled"].summary
    assert "task_running_long" not in found  # the rule's hour has not passed
    found = kinds(diagnose(state, T0 + 3601))
    assert "running for 3601s (1.0s on average)" in found["task_running_long"].summary


def test_recycle_storm_names_the_memory_limit_below_the_child_peak(state):
    alive(state)
    state.apply_hook(W, {"pid": 100, "replacements": {"memory": 12}, "child_peak_rss_bytes": 240 * 2 ** 20,
                         "child_tasks": {"counts": [0, 0, 12, 0, 0, 0, 0, 0, 0, 0], "sum": 40},
                         "max_tasks_per_child": 0, "max_memory_per_child_bytes": 200 * 2 ** 20}, T0)
    storm = kinds(diagnose(state, T0))["recycle_storm"]
    assert "every 3.3 tasks" in storm.summary
    assert "max_memory_per_child (200 MB) is below what a child uses while a child peaks at 240 MB" in storm.summary


def test_recycle_storm_from_max_tasks_per_child(state):
    alive(state)
    state.apply_hook(W, {"pid": 100, "replacements": {"tasks": 10},
                         "child_tasks": {"counts": [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], "sum": 20},
                         "max_tasks_per_child": 2, "max_memory_per_child_bytes": 0}, T0)
    assert "max_tasks_per_child is 2" in kinds(diagnose(state, T0))["recycle_storm"].summary


def test_normal_recycling_is_not_a_storm(state):
    alive(state)
    state.apply_hook(W, {"pid": 100, "replacements": {"tasks": 5},
                         "child_tasks": {"counts": [0, 0, 0, 0, 0, 0, 0, 5, 0, 0], "sum": 2500},
                         "max_tasks_per_child": 500, "max_memory_per_child_bytes": 0}, T0)
    assert "recycle_storm" not in kinds(diagnose(state, T0))


def test_revoked_set_near_limit_and_mingle_cost(state):
    for i in range(10):
        alive(state, f"w{i}@h", pid=i + 1)
        state.apply_revoked_count(f"w{i}@h", 45_000, 50_000, T0)
    found = kinds(diagnose(state, T0))
    assert "45000 ids of at most 50000" in found["revoked_near_limit"].summary
    assert "10 workers hold 450000 revoked ids" in found["mingle_revoked"].summary
    assert "172 MB" in found["mingle_revoked"].summary  # 10 x 450000 x 40 B


def test_queue_black_hole_and_unacked_near_visibility_timeout(state):
    alive(state)
    state.remote_control_polled(T0, valid_for=60)
    state.worker_queues[W] = frozenset({"default"})
    state.broker.replace(QueuesSnapshot(
        queues={"default": QueueStats(ready=5, oldest_unacked_at=T0 - 3000),
                "legacy": QueueStats(ready=7)},
        taken_at=T0, visibility_timeout=3600, consumers_from_workers=True))
    found = kinds(diagnose(state, T0))
    assert found["queue_without_consumer"].summary == \
        "Queue legacy holds 7 ready message(s) and no worker consumes it."
    assert "unacknowledged for 3000s; the visibility timeout is 3600s" in found["unacked_near_visibility"].summary


def test_no_broker_poller_is_said(state):
    plain = ClusterState(utcoffset=0)
    assert kinds(diagnose(plain, T0))["no_queue_source"].severity == "info"


def test_prefetch_hoarding(state):
    alive(state)
    alive(state, W2, pid=200)
    for i in range(5):
        state.apply(ev("task-received", uuid=f"r{i}", name="app.x"), T0)
    assert "w1@h holds 5 tasks it has not started while w2@h sit idle" in \
        kinds(diagnose(state, T0))["prefetch_hoarding"].summary


def test_lost_unpicklable_expired_old_celery_and_no_task_events(state):
    alive(state)
    state.apply(ev("task-received", uuid="l", name="app.pay"), T0)
    state.apply(ev("task-started", uuid="l"), T0)
    state.tick(T0 + 11)
    state.tick(T0 + 17)
    state.apply(ev("task-retried", uuid="u", exception="UnpickleableExceptionWrapper('m', 'BadError', (), '')"),
                T0 + 17)
    state.apply(ev("task-revoked", uuid="e", expired=True), T0 + 17)
    state.apply(ev("worker-heartbeat", hostname="old@h", pid=5, freq=2, sw_ver="5.2.7"), T0)
    state.apply(ev("worker-heartbeat", hostname="old@h", pid=5, freq=2, sw_ver="5.2.7"), T0 + 100)
    state.tick(T0 + 100)  # the retried and revoked tasks never got their task-sent: counted as unknown
    found = kinds(diagnose(state, T0 + 100))
    assert found["tasks_lost"].summary.startswith("1 app.pay task(s)")
    assert "BadError" in found["unpicklable_exception"].summary
    assert found["tasks_expired"].summary.startswith("1 task(s) of queue ")
    assert found["tasks_expired"].severity == "info" and found["tasks_expired"].alert == ""  # 1 <= 100
    assert found["old_celery"].subject == "old@h"
    assert found["no_task_events"].subject == "old@h"


def test_publisher_retries_and_policy_overrun(state):
    state.apply({"type": EVENT_TYPE, "hostname": "web1", "instance": "i1", "timestamp": T0, "utcoffset": 0,
                 "publishes": 100, "retries": 17, "retry_policy_exceeded": 2, "failures": {"OperationalError": 1}},
                T0)
    found = kinds(diagnose(state, T0))
    assert "web1 retried publishing 17 time(s) for 100 publish(es); 1 failed for good" in \
        found["publish_retries"].summary
    assert "2 publish(es) beyond" in found["publish_policy_exceeded"].summary


def test_findings_are_worst_first(state):
    alive(state)
    state.apply(ev("task-revoked", uuid="e", expired=True), T0)
    state.broker.replace(QueuesSnapshot(queues={"q": QueueStats(ready=1, consumers=0)}, taken_at=T0))
    severities = [f.severity for f in diagnose(state, T0)]
    assert severities == sorted(severities, key=["critical", "warning", "info"].index)
    assert severities[0] == "critical" and severities[-1] == "info"


def test_internal_errors_per_source_say_what_was_skipped(state):
    found = [f for f in diagnose(state, T0, internal_errors={"events": 2, "inspect": 0, "scrape": 1})
             if f.kind == "internal_errors"]
    assert [(f.id, f.subject, f.alert) for f in found] == [
        ("internal_errors:events", "events", "CeleryExporterInternalErrors"),
        ("internal_errors:scrape", "scrape", "CeleryExporterInternalErrors")]
    events, scrape = found
    assert "contained 2 bug(s) in its events source" in events.summary
    assert "a Celery event" in events.why and "traceback" in events.fix
    assert "celery_exporter_scrape_collector_success" in scrape.why


def test_every_source_says_what_its_bugs_skip():
    import importlib
    import pkgutil

    from celery_health_exporter import sources
    from celery_health_exporter.findings import SKIPPED
    from celery_health_exporter.sources.base import Source

    for module in pkgutil.iter_modules(sources.__path__):
        importlib.import_module(f"{sources.__name__}.{module.name}")

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    names = {cls.name for cls in subclasses(Source) if cls.name != Source.name}  # QueuePoller: a base
    assert len(names) >= 5
    assert names | {"scrape", "tick"} == set(SKIPPED)


def test_the_daemon_and_doctor_count_the_bugs_of_sources_and_metrics_areas(state, monkeypatch):
    """The counts the findings get are the ones /metrics serves (a bug injected into a real source
    and into a real metrics area)."""
    from celery_health_exporter.app import diagnose_now, internal_errors
    from celery_health_exporter.metrics import StateCollector, beat
    from celery_health_exporter.sources.base import Source

    source = Source()
    with source.bugs_contained("a test step"):
        raise KeyError("injected bug")

    def broken(ctx):
        raise RuntimeError("injected bug: beat area")
        yield

    monkeypatch.setattr(beat, "collect", broken)
    collector = StateCollector(state, [source])
    served = {labels[0]: value for definition, labels, value in collector.samples()
              if definition.name == "exporter_internal_errors"}
    assert internal_errors([source], collector.bugs) == served == {"source": 1, "scrape": 1}
    assert internal_errors([source]) == {"source": 1}  # doctor: no scrapes

    class Config:
        no_task_events_hint_after = 60.0

    found = diagnose_now(state, Config(), T0, errors=internal_errors([source], collector.bugs))
    assert sorted(f.id for f in found if f.kind == "internal_errors") == ["internal_errors:scrape",
                                                                          "internal_errors:source"]
