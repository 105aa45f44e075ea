"""Numbers that lie: NaN, infinities, 1e308, negative durations, strings and bools in every
numeric field of every event type, of remote-control and worker-hook replies, of publisher
hook events, of host process samples and of the RabbitMQ management API's queue items.

Whatever comes in, the PRODUCTION renderer (``StateCollector.render``, what /metrics serves)
writes only finite samples, counters never go backwards between two renders, and every
refused number is counted in ``celery_exporter_events_malformed_total``."""
from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from celery_health_exporter.hooks.protocol import PUBLISHER_EVENT_FORMAT, PUBLISHER_EVENT_TYPE
from celery_health_exporter.metrics import StateCollector
from celery_health_exporter.sources.rabbitmq import queue_stats
from celery_health_exporter.state import events as readers
from celery_health_exporter.state.hosts import ProcessSample, WorkerCommand
from celery_health_exporter.state.model import CHILD_TASK_BUCKETS, ClusterState
from celery_health_exporter.state.queues import QueuesSnapshot

SETTINGS = settings(max_examples=80, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INF, NAN = float("inf"), float("nan")
# Refused wherever a number is read (a utcoffset of -1 hour is fine, so it is not in here).
ALWAYS_BAD = [INF, -INF, NAN, 1e308, -1e308, 2 ** 1100, "12.5", "nan", True, False, [], {}, [1.0], {"v": 1}]
BAD = ALWAYS_BAD + [-1, -0.5, 2 ** 64]
NOW = time.time()
hostile = st.sampled_from(BAD) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2 ** 80), 2 ** 80)


def maybe(good):
    """A field's value: good, absent (None), or hostile."""
    return good | st.none() | hostile


TIMESTAMP = st.floats(-5, 5).map(lambda d: NOW + d)
EVENT_FIELDS = {
    "timestamp": maybe(TIMESTAMP),
    "utcoffset": maybe(st.integers(-14, 14)),
    "runtime": maybe(st.floats(0, 100)),
    "freq": maybe(st.floats(0.5, 10)),
    "active": maybe(st.integers(0, 10)),
    "processed": maybe(st.integers(0, 1000)),
    "pid": maybe(st.integers(1, 4)),
}
PUBLISHER_FIELDS = {
    "publishes": maybe(st.integers(0, 100)),
    "retries": maybe(st.integers(0, 10)),
    "retry_policy_exceeded": maybe(st.integers(0, 3)),
    "interval": maybe(st.floats(1, 60)),
    "pid": maybe(st.integers(1, 4)),
    "failures": st.dictionaries(st.sampled_from(["ConnectionError", "OSError"]), maybe(st.integers(0, 5)),
                                max_size=2),
    "hook_errors": st.dictionaries(st.sampled_from(["ship", "wrap"]), maybe(st.integers(0, 5)), max_size=2),
    "duration": st.builds(lambda counts, total: {"bounds": [0.1, 1.0], "counts": counts, "sum": total},
                          st.lists(maybe(st.integers(0, 50)), min_size=3, max_size=3), maybe(st.floats(0, 100))),
}
TASK_TYPES = ["task-sent", "task-received", "task-started", "task-succeeded", "task-failed", "task-retried",
              "task-revoked", "task-rejected"]
WORKER_TYPES = ["worker-online", "worker-heartbeat", "worker-offline"]


def celery_event(kind):
    base = {"type": st.just(kind), "hostname": st.sampled_from(["celery@a", "celery@b"])}
    if kind.startswith("task-"):
        base.update(uuid=st.sampled_from(["u-1", "u-2", "u-3"]), name=st.just("tasks.add"),
                    routing_key=st.just("q1"), exception=st.just("ValueError('x')"))
    return st.fixed_dictionaries(base, optional=EVENT_FIELDS)


publisher_event = st.fixed_dictionaries(
    {"type": st.just(PUBLISHER_EVENT_TYPE), "format": st.just(PUBLISHER_EVENT_FORMAT),
     "hostname": st.sampled_from(["api", "beat"]), "instance": st.sampled_from(["i-1", "i-2"]),
     "timestamp": maybe(TIMESTAMP), "utcoffset": st.just(0)},
    optional=PUBLISHER_FIELDS)
any_event = st.sampled_from(TASK_TYPES + WORKER_TYPES).flatmap(celery_event) | publisher_event

# Remote control, the worker hook, the host agent, the management API: (kind, payload)
stats_reply = st.fixed_dictionaries({}, optional={
    "uptime": maybe(st.integers(0, 10 ** 6)), "prefetch_count": maybe(st.integers(0, 16)), "pid": maybe(st.just(1)),
    "pool": st.fixed_dictionaries({}, optional={"max-concurrency": maybe(st.integers(1, 8)),
                                                "max-tasks-per-child": maybe(st.integers(0, 100)),
                                                "processes": st.lists(maybe(st.integers(2, 9)), max_size=3)})})
conf_reply = st.fixed_dictionaries({}, optional={"worker_max_memory_per_child": maybe(st.integers(0, 10 ** 6)),
                                                 "worker_max_tasks_per_child": maybe(st.integers(0, 100))})
active_reply = st.lists(st.fixed_dictionaries({"id": st.just("u-9")}, optional={"time_start": maybe(TIMESTAMP)}),
                        max_size=2)
hook_reply = st.fixed_dictionaries({"pid": maybe(st.just(1))}, optional={
    "replacements": st.dictionaries(st.sampled_from(["memory", "tasks", "signal"]), maybe(st.integers(0, 9)),
                                    max_size=2),
    "child_tasks": st.fixed_dictionaries({"counts": st.lists(maybe(st.integers(0, 9)),
                                                             min_size=len(CHILD_TASK_BUCKETS) + 1,
                                                             max_size=len(CHILD_TASK_BUCKETS) + 1),
                                          "sum": maybe(st.integers(0, 500))}),
    "child_peak_rss_bytes": maybe(st.integers(0, 2 ** 30)), "max_tasks_per_child": maybe(st.integers(0, 9)),
    "max_memory_per_child_bytes": maybe(st.integers(0, 2 ** 30)), "revoked": maybe(st.integers(0, 9)),
    "revoked_limit": maybe(st.integers(0, 50000))})
process = st.builds(
    lambda pid, create, rss, cpu: ProcessSample(pid, 1 if pid == 10 else 10, 10, create,
                                                WorkerCommand("celery@a", "prefork"), rss, cpu),
    st.sampled_from([10, 11, 12]), st.just(NOW - 100.0) | hostile, maybe(st.integers(0, 2 ** 30)) | hostile,
    st.floats(0, 100) | hostile)
queue_item = st.fixed_dictionaries({"name": st.just("q1")}, optional={
    "messages_ready": maybe(st.integers(0, 100)), "messages_unacknowledged": maybe(st.integers(0, 100)),
    "consumers": maybe(st.integers(0, 5)), "consumer_utilisation": maybe(st.floats(0, 1)),
    "message_stats": st.fixed_dictionaries({}, optional={k: maybe(st.integers(0, 10 ** 6))
                                                         for k in ("publish", "deliver_get", "redeliver", "ack")})})
action = (any_event.map(lambda e: ("event", e))
          | st.tuples(st.just("stats"), stats_reply) | st.tuples(st.just("conf"), conf_reply)
          | st.tuples(st.just("active"), active_reply) | st.tuples(st.just("hook"), hook_reply)
          | st.tuples(st.just("scan"), st.lists(process, max_size=3))
          | st.tuples(st.just("queues"), queue_item))


# ------------------------------------------------------------------ helpers

def fresh_state() -> ClusterState:
    state = ClusterState(utcoffset=0.0, runtime_buckets=(0.1, 1, 10), queue_wait_buckets=(0.1, 1, 10))
    state.broker.configure(kind="amqp", broker="amqp://test")
    return state


def perform(state: ClusterState, kind: str, payload, now: float) -> None:
    """What each source does with what it received (sources/*.py), with the state lock held."""
    with state.lock:
        if kind == "event":
            state.apply(payload, now)
        elif kind == "stats":
            state.apply_stats("celery@a", payload, now)
        elif kind == "conf":
            state.apply_conf("celery@a", payload)
        elif kind == "active":
            state.apply_active_reserved("celery@a", payload, [], now)
        elif kind == "hook":
            state.apply_hook("celery@a", payload, now)
        elif kind == "scan":
            state.hosts.apply_scan(payload, {1, 10, 11, 12}, now)
        elif kind == "queues":
            stats = queue_stats(payload, state.count_malformed)
            if stats is not None:
                state.broker.replace(QueuesSnapshot({"q1": stats}, now))


# Counters that may go down by contract: a worker's processed count restarts with its process; the
# broker's own message counters are passed through and restart when a queue is declared again.
RESETTING = ("celery_worker_tasks_processed_total", "celery_queue_messages_")


def scrape(collector: StateCollector, monotonic: set | None = None) -> dict:
    """The production renderer's text, parsed by prometheus_client; every sample must be finite.
    ``monotonic`` collects the keys of samples that must never go down (counters, histogram counts)."""
    text = collector.render()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert math.isfinite(s.value), f"{s.name}{s.labels} = {s.value}"
            key = (s.name, tuple(sorted(s.labels.items())))
            samples[key] = s.value
            if (monotonic is not None and family.type in ("counter", "histogram") and not s.name.endswith("_sum")
                    and not s.name.startswith(RESETTING)):
                monotonic.add(key)
    for family in parse_openmetrics(collector.render(openmetrics=True) + "# EOF\n"):
        for s in family.samples:
            assert math.isfinite(s.value), f"openmetrics {s.name}{s.labels} = {s.value}"
    return samples


def malformed(samples: dict) -> float:
    return sum(v for (name, _), v in samples.items() if name == "celery_exporter_events_malformed_total")


# ------------------------------------------------------------------ properties


@SETTINGS
@given(st.lists(st.lists(action, min_size=1, max_size=6), min_size=1, max_size=4))
def test_whatever_numbers_come_in_every_sample_is_finite_and_counters_only_grow(batches):
    state = fresh_state()
    collector = StateCollector(state, [], prefix="celery_")
    counters: set = set()
    before = scrape(collector, counters)
    now = time.time()
    for batch in batches:
        for kind, payload in batch:
            now += 0.01
            perform(state, kind, payload, now)
        after = scrape(collector, counters)
        for key, value in before.items():
            if key in counters:
                assert key in after, f"{key} disappeared after {batch!r}"
                assert after[key] >= value, f"{key} went from {value} to {after[key]} after {batch!r}"
        assert malformed(after) == sum(state.malformed.values())
        assert set(state.malformed) <= set(readers.NUMBER_REASONS) | {"publisher_duration"}
        before = after
    # the model holds no non-finite number either: the renderer's last-line guard never fired
    assert collector.nonfinite_dropped == 0


def reads(kind: str) -> list[str]:
    """The numeric fields a Celery event of ``kind`` is read for (besides timestamp and utcoffset)."""
    if kind in ("worker-online",):
        return ["pid", "processed", "freq"]
    if kind == "worker-heartbeat":
        return ["pid", "processed", "freq", "active"]
    if kind in ("task-succeeded", "task-failed"):
        return ["runtime"]
    return []


@SETTINGS
@given(st.sampled_from(TASK_TYPES + WORKER_TYPES), st.data())
def test_one_bad_number_in_any_field_is_counted_and_the_event_still_applies(kind, data):
    fields = ["timestamp", "utcoffset"] + reads(kind)
    field = data.draw(st.sampled_from(fields))
    bad = data.draw(st.sampled_from(ALWAYS_BAD if field == "utcoffset" else BAD))
    event = {"type": kind, "hostname": "celery@a", "uuid": "u-1", "name": "tasks.add", "timestamp": NOW,
             "utcoffset": 0, "runtime": 0.5, "freq": 2.0, "active": 1, "processed": 3, "pid": 7}
    event[field] = bad
    state = fresh_state()
    collector = StateCollector(state, [], prefix="celery_")
    perform(state, "event", event, time.time())
    samples = scrape(collector)
    assert malformed(samples) == 1, (field, bad, state.malformed)
    reason = {"timestamp": "bad_timestamp", "utcoffset": "bad_utcoffset", "runtime": "bad_duration",
              "freq": "bad_duration", "active": "bad_count", "processed": "bad_count", "pid": "bad_count"}[field]
    assert state.malformed == {reason: 1}
    assert samples[("celery_exporter_events_total", (("type", kind),))] == 1
    if kind.startswith("worker-") and kind != "worker-offline":
        assert samples[("celery_worker_up", (("hostname", "celery@a"),))] == 1
    if kind == "task-succeeded":
        labels = (("hostname", "celery@a"), ("name", "unknown"), ("queue_name", "unknown"))
        assert samples[("celery_task_succeeded_total", labels)] == 1
        assert samples[("celery_task_runtime_count", labels)] == (0 if field == "runtime" else 1)


# ------------------------------------------------------------------ the issue's own cases


def test_a_runtime_of_1e308_does_not_poison_the_runtime_sum():
    state = fresh_state()
    collector = StateCollector(state, [], prefix="celery_")
    now = time.time()
    for i, runtime in enumerate((1e308, INF, NAN, "12", -3.0, 0.5)):
        perform(state, "event", {"type": "task-succeeded", "uuid": f"u-{i}", "hostname": "celery@a",
                                 "timestamp": now, "utcoffset": 0, "runtime": runtime}, now)
    samples = scrape(collector)
    labels = (("hostname", "celery@a"), ("name", "unknown"), ("queue_name", "unknown"))
    assert samples[("celery_task_succeeded_total", labels)] == 6
    assert samples[("celery_task_runtime_count", labels)] == 1
    assert samples[("celery_task_runtime_sum", labels)] == 0.5
    assert samples[("celery_exporter_events_malformed_total", (("reason", "bad_duration"),))] == 5


def test_a_utcoffset_of_1e308_does_not_make_the_lag_sum_infinite():
    state = fresh_state()
    collector = StateCollector(state, [], prefix="celery_")
    now = time.time()
    for offset in (1e308, -1e308, INF, 25, "x"):
        perform(state, "event", {"type": "worker-heartbeat", "hostname": "celery@a", "timestamp": now,
                                 "utcoffset": offset}, now + 1.0)
    samples = scrape(collector)
    assert samples[("celery_exporter_event_lag_seconds_count", ())] == 5  # taken with our own utcoffset
    assert samples[("celery_exporter_event_lag_seconds_sum", ())] == pytest.approx(5.0)
    assert samples[("celery_exporter_events_malformed_total", (("reason", "bad_utcoffset"),))] == 5


def test_a_forged_heartbeat_interval_cannot_keep_a_dead_worker_up_for_ever():
    state = fresh_state()
    now = time.time()
    perform(state, "event", {"type": "worker-heartbeat", "hostname": "celery@a", "timestamp": now, "utcoffset": 0,
                             "freq": 1e308}, now)
    assert state.workers["celery@a"].freq == 2.0 and state.malformed == {"bad_duration": 1}
    state.tick(now + 60)
    assert not state.workers["celery@a"].up


def test_a_bad_cumulative_number_in_a_hook_reply_drops_the_reply_and_keeps_counters_exact():
    state = fresh_state()
    now = time.time()
    perform(state, "event", {"type": "worker-online", "hostname": "celery@a", "timestamp": now, "utcoffset": 0}, now)
    good = {"pid": 1, "replacements": {"memory": 2}, "child_tasks": {"counts": [1] * 10, "sum": 30},
            "child_peak_rss_bytes": 100}
    perform(state, "hook", good, now)
    for bad in ({**good, "replacements": {"memory": INF}}, {**good, "replacements": {"memory": "x"}},
                {**good, "child_tasks": {"counts": [1] * 9 + [NAN], "sum": 30}},
                {**good, "child_tasks": {"counts": [1] * 10, "sum": 1e308}}):
        perform(state, "hook", bad, now)
    perform(state, "hook", {**good, "replacements": {"memory": 3}, "child_peak_rss_bytes": -5}, now)
    worker = state.workers["celery@a"]
    assert worker.child_replacements["memory"] == 3  # 2, then one more: nothing from the bad replies
    assert worker.child_tasks.count == 10 and worker.child_tasks.sum == 30
    assert worker.child_peak_rss == 100  # a bad gauge keeps the last good one
    assert state.malformed == {"bad_count": 5}


def test_a_bad_publisher_total_keeps_the_last_good_one_instead_of_counting_twice():
    state = fresh_state()
    now = time.time()

    def publish(**fields):
        perform(state, "event", {"type": PUBLISHER_EVENT_TYPE, "format": PUBLISHER_EVENT_FORMAT, "hostname": "api",
                                 "instance": "i-1", "timestamp": now, "utcoffset": 0, **fields}, now)
    publish(publishes=100)
    publish(publishes="lots")  # read as 0 it would look like a new run: 100 folded away, then counted again
    publish(publishes=INF)
    publish(publishes=105)
    assert state.publishers.totals()["api"].publishes == 105
    assert state.malformed == {"bad_count": 2}


def test_remote_control_replies_with_absurd_numbers_drop_those_numbers_only():
    state = fresh_state()
    now = time.time()
    perform(state, "event", {"type": "worker-online", "hostname": "celery@a", "timestamp": now, "utcoffset": 0}, now)
    perform(state, "stats", {"uptime": INF, "prefetch_count": NAN, "pid": 1e308,
                             "pool": {"max-concurrency": 4, "max-tasks-per-child": -1, "processes": [2, 3]}}, now)
    worker = state.workers["celery@a"]
    assert worker.start_time is not None and math.isfinite(worker.start_time)  # from worker-online
    assert worker.prefetch_count is None and worker.max_concurrency == 4 and worker.max_tasks_per_child == 0
    perform(state, "conf", {"worker_max_memory_per_child": 2 ** 60}, now)  # KiB: beyond 2**53 bytes
    assert worker.max_memory_per_child == 0
    perform(state, "active", [{"id": "x", "time_start": -INF}, {"id": "y", "time_start": now - 30}], now)
    assert worker.inspect_oldest_start == now - 30
    assert state.malformed == {"bad_duration": 1, "bad_count": 4, "bad_timestamp": 1}


def test_management_api_items_with_absurd_numbers():
    refused = []
    stats = queue_stats({"name": "q", "messages_ready": 3, "messages_unacknowledged": INF, "consumers": "2",
                         "consumer_utilisation": 7.5, "message_stats": {"publish": -1, "ack": 2 ** 60,
                                                                        "deliver_get": 4}}, refused.append)
    assert (stats.ready, stats.unacked, stats.consumers, stats.consumer_utilisation) == (3, None, None, None)
    assert (stats.published, stats.acked, stats.delivered, stats.redelivered) == (None, None, 4, 0)
    assert sorted(refused) == ["bad_count"] * 4 + ["bad_number"]
    assert queue_stats({"name": "q", "messages_ready": NAN}, refused.append) is None  # no length: no queue
    assert queue_stats({"name": "q"}) .ready == 0  # absent: a new queue, 0 until its first stats


def test_host_samples_with_absurd_numbers():
    state = fresh_state()
    now = time.time()
    cmd = WorkerCommand("celery@a", "prefork")
    main = ProcessSample(10, 1, 10, now - 100, cmd, rss=1000, cpu=1.0)
    child = ProcessSample(11, 10, 10, now - 50, cmd, rss=2000, cpu=2.0)
    state.hosts.apply_scan([main, child], {1, 10, 11}, now)
    later = [ProcessSample(10, 1, 10, now - 100, cmd, rss=NAN, cpu=INF),
             ProcessSample(11, 10, 10, now - 50, cmd, rss=2500, cpu=3.0),
             ProcessSample(12, 10, 10, INF, cmd, rss=1, cpu=1.0)]  # a create time that is no time: left out
    scan = state.hosts.apply_scan(later, {1, 10, 11, 12}, now + 10)
    assert scan.rss[("celery@a", "main")] == 0 and scan.rss[("celery@a", "child")] == 2500
    assert state.hosts.cpu_seconds[("celery@a", "main")] == 1.0  # the bad reading added nothing
    assert state.hosts.cpu_seconds[("celery@a", "child")] == 3.0
    assert scan.processes[("celery@a", "child")] == 1
    assert state.malformed == {"bad_count": 1, "bad_duration": 1, "bad_timestamp": 1}
    assert all(math.isfinite(v) for v in scrape(StateCollector(state, [], prefix="celery_")).values())


# ------------------------------------------------------------------ the readers


@pytest.mark.parametrize("value", BAD)
def test_count_refuses_and_reports(value):
    reasons = []
    assert readers.count(value, reasons.append) is None
    assert reasons == ["bad_count"]


@pytest.mark.parametrize("value, expected", [(None, None), (0, 0), (3, 3), (3.9, 3), (2 ** 53, 2 ** 53)])
def test_count_accepts(value, expected):
    reasons = []
    assert readers.count(value, reasons.append) == expected and reasons == []


def test_bounds_of_the_other_readers():
    reasons = []
    now = 1_800_000_000.0
    assert readers.duration(readers.MAX_DURATION, reasons.append) == readers.MAX_DURATION
    assert readers.duration(readers.MAX_DURATION * 1.01, reasons.append) is None
    assert readers.interval(0, reasons.append) is None and readers.interval(3601, reasons.append) is None
    assert readers.interval(2, reasons.append) == 2.0
    assert readers.timestamp(now - readers.MAX_EVENT_AGE, now, reasons.append) == now - readers.MAX_EVENT_AGE
    assert readers.timestamp(now - readers.MAX_EVENT_AGE - 1, now, reasons.append) is None
    assert readers.timestamp(now + readers.MAX_CLOCK_AHEAD + 1, now, reasons.append) is None
    assert readers.utcoffset(-14, reasons.append) == -14 and readers.utcoffset(24.5, reasons.append) is None
    assert readers.finite_number(0.5, 0, 1, reasons.append) == 0.5
    assert reasons == ["bad_duration"] * 3 + ["bad_timestamp"] * 2 + ["bad_utcoffset"]


def test_event_timestamp_corrects_then_bounds():
    reasons = []
    now = 1_800_000_000.0
    # a worker two hours east of us (utcoffset -2 vs our 0): Celery's correction
    assert readers.event_timestamp({"timestamp": now, "utcoffset": -2}, now, 0.0, reasons.append) == now + 7200
    assert readers.event_timestamp({"timestamp": now, "utcoffset": 1e308}, now, 0.0, reasons.append) == now
    assert readers.event_timestamp({"timestamp": 1e308, "utcoffset": 0}, now, 0.0, reasons.append) is None
    assert readers.event_timestamp({}, now, 0.0, reasons.append) is None  # absent: not an error
    assert reasons == ["bad_utcoffset", "bad_timestamp"]
