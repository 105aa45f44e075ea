"""Flower's metrics (state/flower.py, metrics/flower.py) against Flower's own bookkeeping.

The same events go into Flower 2.2.0's ``flower.events.EventsState`` (the real package, its
Prometheus families in prometheus_client's default registry) and into the exporter's model
with ``FlowerState``; both /metrics are parsed and compared series by series. Then the places
where the exporter deliberately differs (docs/dashboards-and-alerts.md, Migrating from Flower).
"""
import itertools
import math
import uuid

import pytest
from flower.events import EventsState
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_health_exporter.metrics import StateCollector
from celery_health_exporter.state.cardinality import CardinalityCaps
from celery_health_exporter.state.flower import FlowerState
from celery_health_exporter.state.model import ClusterState

T0 = 1_700_000_000.0


class Both:
    """One event stream into Flower's EventsState and into ours; worker names unique to the test
    (Flower's metrics are one process-wide set)."""

    def __init__(self, caps=None, **state_options):
        self.run = uuid.uuid4().hex[:8]
        self.flower = EventsState(max_tasks_in_memory=10_000)
        self.state = ClusterState(utcoffset=0, caps=caps, **state_options)
        self.state.flower = FlowerState(self.state)
        self.clock = itertools.count(1)
        self.now = T0

    def host(self, name: str) -> str:
        return f"{name}-{self.run}@h"

    def send(self, kind: str, host: str, at: float, **fields) -> dict:
        event = {"type": kind, "hostname": self.host(host), "timestamp": T0 + at, "utcoffset": 0,
                 "local_received": T0 + at, "clock": next(self.clock), **fields}
        self.now = max(self.now, T0 + at)
        self.flower.event(dict(event))
        with self.state.lock:
            self.state.apply(dict(event), self.now)
        return event

    def task(self, kind: str, host: str, at: float, task_id: str, **fields) -> dict:
        return self.send(kind, host, at, uuid=f"{task_id}-{self.run}", **fields)

    def ours(self, now: float | None = None) -> dict:
        with self.state.lock:  # what the exporter's ticker does
            self.state.tick(now or self.now)
            self.state.flower.expire(now or self.now)
        return samples(StateCollector(self.state, []).render(), self.run)

    def theirs(self) -> dict:
        return samples(generate_latest(REGISTRY).decode(), self.run)


def samples(text: str, run: str) -> dict:
    """{(sample name, sorted labels): value} of the flower_* series of this run's workers."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("flower_") and not s.name.endswith("_created") and run in s.labels["worker"]:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def cluster_day(both: Both) -> None:
    """A publisher and two workers: successes, a failure, a retry, a revoke before start, a
    rejection, an ETA task, a task whose earlier events were never seen, heartbeats."""
    both.send("worker-online", "w1", 0, freq=2.0)
    both.send("worker-heartbeat", "w1", 0.1, freq=2.0, active=0, processed=0)
    both.send("worker-heartbeat", "w2", 0.1, freq=2.0, active=0, processed=0)
    for task_id, name, eta in (("t1", "app.a", None), ("t2", "app.a", None), ("t3", "app.b", "2023-11-14T22:13:30"),
                               ("t4", "app.a", None), ("t5", "app.c", None), ("t6", "app.d", None)):
        both.task("task-sent", "gen42", 0.2, task_id, name=name, eta=eta, queue="celery")
    both.task("task-received", "w1", 1.0, "t1", name="app.a", eta=None)
    both.task("task-received", "w1", 1.5, "t2", name="app.a", eta=None)
    both.task("task-received", "w1", 1.5, "t3", name="app.b", eta="2023-11-14T22:13:30")
    both.task("task-received", "w1", 1.6, "t4", name="app.a", eta=None)
    both.task("task-started", "w1", 2.0, "t1")
    both.task("task-succeeded", "w1", 2.3, "t1", runtime=0.3, result="None")
    both.task("task-started", "w1", 4.0, "t2")
    both.task("task-failed", "w1", 4.2, "t2", exception="ValueError('x')", traceback="")
    both.task("task-revoked", "w1", 4.3, "t4", terminated=False, signum=None, expired=False)
    both.task("task-started", "w1", 5.0, "t3")
    both.task("task-succeeded", "w1", 6.2, "t3", runtime=1.2, result="None")
    # a retry: the same id received again
    both.task("task-received", "w2", 5.0, "t5", name="app.c", eta=None)
    both.task("task-started", "w2", 5.5, "t5")
    both.task("task-retried", "w2", 5.6, "t5", exception="CustomError('again')", traceback="")
    both.task("task-received", "w2", 6.0, "t5", name="app.c", eta=None)
    both.task("task-started", "w2", 7.5, "t5")
    both.task("task-succeeded", "w2", 7.6, "t5", runtime=0.05, result="'done'")
    both.task("task-received", "w2", 7.7, "t6", name="app.d", eta=None)
    both.task("task-rejected", "w2", 7.8, "t6", requeue=False)
    both.task("task-received", "w2", 7.9, "t7", name="app.a", eta=None)  # still waits at the end
    both.task("task-started", "w2", 8.0, "t8")  # its task-received came before we listened: no name
    both.task("task-succeeded", "w2", 8.1, "t8", runtime=0.01, result="None")
    both.send("worker-heartbeat", "w1", 8.2, freq=2.0, active=2, processed=3)
    both.send("worker-heartbeat", "w2", 8.2, freq=2.0, active=1, processed=3)


def test_same_series_and_values_as_flower():
    both = Both()
    cluster_day(both)
    ours, theirs = both.ours(), both.theirs()
    assert ours == theirs
    # what the comparison above covered (it would pass on two empty pages otherwise)
    w1, w2, gen = both.host("w1"), both.host("w2"), both.host("gen42")
    assert value(ours, "flower_events_total", worker=gen, type="task-sent", task="app.a") == 3
    assert value(ours, "flower_events_total", worker=w2, type="task-started", task="") == 1
    assert value(ours, "flower_task_prefetch_time_seconds", worker=w1, task="app.a") == 0  # t2 failed
    assert value(ours, "flower_worker_prefetched_tasks", worker=w1, task="app.a") == 0
    assert value(ours, "flower_worker_prefetched_tasks", worker=w2, task="app.a") == 1  # t7
    assert value(ours, "flower_worker_prefetched_tasks", worker=w2, task="app.d") == 0  # rejected
    assert value(ours, "flower_worker_prefetched_tasks", worker=w1, task="app.b") is None  # an ETA task
    assert value(ours, "flower_task_runtime_seconds_count", worker=w1, task="app.b") == 1
    assert value(ours, "flower_task_runtime_seconds_bucket", worker=w1, task="app.b", le="2.5") == 1
    assert value(ours, "flower_task_runtime_seconds_bucket", worker=w1, task="app.b", le="1.0") == 0
    assert value(ours, "flower_worker_number_of_currently_executing_tasks", worker=w1) == 2
    assert value(ours, "flower_worker_online", worker=w2) == 1
    assert len(ours) >= 60


def test_prefetch_time_while_a_task_runs_is_its_wait():
    both = Both()
    both.send("worker-heartbeat", "w1", 0, freq=2.0, active=0)
    both.task("task-received", "w1", 1.0, "t1", name="app.a", eta=None)
    both.task("task-received", "w1", 1.0, "t2", name="app.a", eta=None)
    both.task("task-started", "w1", 1.1, "t1")
    both.task("task-succeeded", "w1", 3.1, "t1", runtime=2.0)
    both.task("task-started", "w1", 3.2, "t2")
    ours = both.ours()
    assert ours == both.theirs()
    assert value(ours, "flower_task_prefetch_time_seconds", worker=both.host("w1"), task="app.a") == pytest.approx(2.2)


def test_worker_offline_empties_its_buffer_where_flower_keeps_it():
    both = Both()
    both.send("worker-heartbeat", "w1", 0, freq=2.0, active=1)
    both.task("task-received", "w1", 1.0, "t1", name="app.a", eta=None)
    both.send("worker-offline", "w1", 2.0, freq=2.0)
    ours, theirs = both.ours(), both.theirs()
    w1 = both.host("w1")
    assert value(ours, "flower_worker_online", worker=w1) == value(theirs, "flower_worker_online", worker=w1) == 0
    # a warm shutdown hands its reserved tasks back to the broker and finishes the running ones
    assert value(theirs, "flower_worker_prefetched_tasks", worker=w1, task="app.a") == 1
    assert value(ours, "flower_worker_prefetched_tasks", worker=w1, task="app.a") == 0
    assert value(theirs, "flower_worker_number_of_currently_executing_tasks", worker=w1) == 1
    assert value(ours, "flower_worker_number_of_currently_executing_tasks", worker=w1) == 0


def test_a_worker_silent_past_the_timeout_is_offline_where_flower_says_online():
    both = Both(worker_timeout=10.0, purge_offline_after=600.0)
    both.send("worker-heartbeat", "w1", 0, freq=2.0, active=1)
    both.task("task-received", "w1", 1.0, "t1", name="app.a", eta=None)
    w1 = both.host("w1")
    assert value(both.ours(T0 + 5), "flower_worker_online", worker=w1) == 1
    ours = both.ours(T0 + 20)  # SIGKILL: no worker-offline, heartbeats stop
    assert value(both.theirs(), "flower_worker_online", worker=w1) == 1
    assert value(ours, "flower_worker_online", worker=w1) == 0
    assert value(ours, "flower_worker_number_of_currently_executing_tasks", worker=w1) == 0
    assert value(ours, "flower_worker_prefetched_tasks", worker=w1, task="app.a") == 0
    # it comes back (same node name, new process): online again, its buffer starts empty
    both.send("worker-online", "w1", 30, freq=2.0)
    both.send("worker-heartbeat", "w1", 30.1, freq=2.0, active=0)
    ours = both.ours(T0 + 30.2)
    assert value(ours, "flower_worker_online", worker=w1) == 1
    assert value(ours, "flower_worker_prefetched_tasks", worker=w1, task="app.a") == 0


def test_series_of_a_gone_worker_and_publisher_are_purged():
    both = Both(worker_timeout=10.0, purge_offline_after=60.0)
    both.send("worker-heartbeat", "w1", 0, freq=2.0, active=0)
    both.task("task-sent", "gen7", 0.5, "t1", name="app.a", eta=None, queue="celery")
    both.task("task-received", "w1", 1.0, "t1", name="app.a", eta=None)
    assert {dict(labels)["worker"] for _name, labels in both.ours(T0 + 2)} == {both.host("w1"), both.host("gen7")}
    flower = both.state.flower
    assert set(flower.labels) == {both.host("w1"), both.host("gen7")}
    both.ours(T0 + 50)  # the worker is down (timeout), not purged yet
    assert set(flower.labels) == {both.host("w1"), both.host("gen7")}
    assert both.ours(T0 + 200) == {}  # the model purged the worker; the publisher was silent as long
    assert flower.labels == {}
    assert both.host("gen7") not in flower.publisher_cap.values  # its slot is free again
    assert value(both.theirs(), "flower_worker_online", worker=both.host("w1")) == 1  # Flower keeps it


def test_nothing_is_purged_while_the_exporter_receives_no_events():
    both = Both(worker_timeout=10.0, purge_offline_after=60.0)
    both.task("task-sent", "gen7", 0.5, "t1", name="app.a", eta=None, queue="celery")
    both.state.events_interrupted(T0 + 1)
    both.ours(T0 + 500)
    assert set(both.state.flower.labels) == {both.host("gen7")}


def test_label_values_are_capped_like_ours():
    both = Both(caps=CardinalityCaps(workers=1, publishers=1, task_names=1))
    for n in (1, 2):
        both.send("worker-heartbeat", f"w{n}", 0, freq=2.0, active=0)
        both.task("task-sent", f"gen{n}", 0.5, f"t{n}", name=f"app.n{n}", eta=None, queue="celery")
        both.task("task-received", f"w{n}", 1.0, f"t{n}", name=f"app.n{n}", eta=None)
    text = StateCollector(both.state, []).render()
    assert 'celery_exporter_label_values_folded_total{label="flower_publisher"} 1' in text.splitlines()
    ours = samples(text.replace('"other"', f'"other-{both.run}"'), both.run)
    workers = {dict(labels)["worker"] for _name, labels in ours}
    tasks = {dict(labels).get("task") for _name, labels in ours} - {None}
    assert workers == {both.host("w1"), both.host("gen1"), f"other-{both.run}"}
    assert tasks == {"app.n1", f"other-{both.run}"}


def test_tasks_in_flight_are_bounded():
    state = ClusterState(utcoffset=0, max_tracked_tasks=10)
    flower = FlowerState(state)
    for n in range(50):
        state.apply({"type": "task-received", "uuid": f"u{n}", "name": "app.a", "hostname": "w@h",
                     "timestamp": T0, "utcoffset": 0}, T0)
    assert len(flower.tasks) == 10 and flower.evicted == 40


def test_absent_without_the_flag_and_named_without_the_prefix():
    state = ClusterState(utcoffset=0)
    state.apply({"type": "worker-heartbeat", "hostname": "w@h", "timestamp": T0, "utcoffset": 0, "active": 0}, T0)
    assert "flower_" not in StateCollector(state, []).render()
    state.flower = FlowerState(state)
    state.apply({"type": "worker-heartbeat", "hostname": "w@h", "timestamp": T0, "utcoffset": 0, "active": 0}, T0)
    text = StateCollector(state, [], prefix="acme_").render()
    assert 'flower_worker_online{worker="w@h"} 1' in text.splitlines()
    assert "acme_worker_up" in text and "acme_flower" not in text


def test_runtime_buckets_are_flowers_default():
    from flower.options import options

    from celery_health_exporter.state.flower import RUNTIME_BUCKETS

    assert list(RUNTIME_BUCKETS) + [math.inf] == list(options.task_runtime_metric_buckets)


def test_the_daemon_builds_it_with_the_flag_and_its_ticker_moves_it_in_time():
    from celery_health_exporter.app import Ticker, build_state
    from celery_health_exporter.config import Config
    from tests.harness import wait_for

    assert getattr(build_state(Config(broker_url="redis://127.0.0.1/0")), "flower", None) is None
    state = build_state(Config(broker_url="redis://127.0.0.1/0", flower_metrics=True, purge_offline_after=0.05))
    with state.lock:
        state.apply({"type": "task-sent", "uuid": "u1", "name": "app.a", "hostname": "gen1@h", "queue": "celery",
                     "timestamp": T0, "utcoffset": 0}, T0)
    assert set(state.flower.labels) == {"gen1@h"}
    ticker = Ticker(state, interval=0.01).start()
    try:
        wait_for(lambda: not state.flower.labels, 10, message="the silent publisher purged by the ticker")
    finally:
        ticker.stop()
