"""The state model, driven by hand-made events: no broker, no I/O."""
import pytest

from celery_health_exporter.state.model import ClusterState, Histogram

T0 = 1_700_000_000.0


def ev(kind, **fields):
    fields.setdefault("timestamp", T0)
    fields.setdefault("utcoffset", 0)
    return {"type": kind, **fields}


@pytest.fixture
def state():
    return ClusterState(worker_timeout=10, purge_offline_after=100, runtime_buckets=(1, 5),
                        queue_wait_buckets=(1, 5), max_tracked_tasks=3, utcoffset=0)


def run_task(state, uuid, *, name="app.add", host="w1@h", queue="q1", outcome="task-succeeded", **extra):
    state.apply(ev("task-sent", uuid=uuid, name=name, queue=queue, hostname="gen1@h"), T0)
    state.apply(ev("task-received", uuid=uuid, name=name, hostname=host, timestamp=T0), T0)
    state.apply(ev("task-started", uuid=uuid, hostname=host, timestamp=T0 + 2), T0 + 2)
    state.apply(ev(outcome, uuid=uuid, hostname=host, timestamp=T0 + 3, **extra), T0 + 3)


def test_task_flow_counts_and_labels(state):
    run_task(state, "a", runtime=0.5)
    run_task(state, "b", outcome="task-failed", exception="mod.CustomError('boom')")
    flow = state.workers["w1@h"].flows[("app.add", "q1")]
    assert (flow.received, flow.started, flow.succeeded) == (2, 2, 1)
    assert flow.failed == {"CustomError": 1}
    assert state.sent == {("app.add", "h", "q1"): 2}  # the publisher gen1@h: its host
    assert flow.queue_wait.count == 2 and flow.queue_wait.sum == pytest.approx(4.0)
    # the failed task had no runtime field: measured from started to failed (1 s)
    assert flow.runtime.count == 2 and flow.runtime.sum == pytest.approx(1.5)
    assert state.tracked_tasks == 0


def test_new_label_set_starts_every_counter_at_zero(state):
    state.apply(ev("task-received", uuid="x", name="app.new", hostname="w1@h"), T0)
    flow = state.workers["w1@h"].flows[("app.new", "unknown")]
    assert (flow.received, flow.succeeded, flow.retried, flow.revoked, flow.rejected) == (1, 0, 0, 0, 0)


def test_queue_learned_from_sent_events_applies_to_later_tasks_without_them(state):
    run_task(state, "a")
    state.apply(ev("task-received", uuid="late", name="app.add", hostname="w1@h"), T0)
    assert state.workers["w1@h"].flows[("app.add", "q1")].received == 2


def test_queue_from_a_worker_that_consumes_one_queue(state):
    state.worker_queues["w1@h"] = frozenset({"only"})
    state.apply(ev("task-received", uuid="x", name="app.other", hostname="w1@h"), T0)
    assert ("app.other", "only") in state.workers["w1@h"].flows


def test_late_retried_event_after_the_retry_finished_keeps_the_task_name(state):
    state.apply(ev("task-received", uuid="r", name="app.flaky", hostname="w1@h"), T0)
    state.apply(ev("task-started", uuid="r", hostname="w1@h"), T0)
    state.apply(ev("task-received", uuid="r", name="app.flaky", hostname="w1@h"), T0)
    state.apply(ev("task-succeeded", uuid="r", hostname="w1@h", runtime=0.1), T0)
    state.apply(ev("task-retried", uuid="r", hostname="w1@h", exception="E()"), T0)
    flows = state.workers["w1@h"].flows
    assert list(flows) == [("app.flaky", "unknown")]
    assert flows[("app.flaky", "unknown")].retried == 1


def test_in_flight_table_is_bounded_and_counts_evictions(state):
    for i in range(5):
        state.apply(ev("task-received", uuid=f"t{i}", name="app.add", hostname="w1@h"), T0)
    assert state.tracked_tasks == 3
    assert state.tracked_evicted == 2
    assert list(state.tasks) == ["t2", "t3", "t4"]


def test_worker_up_offline_timeout_and_purge(state):
    state.apply(ev("worker-online", hostname="w1@h", freq=2, sw_ident="py-celery", sw_ver="5.7.0",
                   sw_sys="Linux"), T0)
    state.apply(ev("worker-heartbeat", hostname="w1@h", freq=2, active=3, processed=10), T0 + 1)
    worker = state.workers["w1@h"]
    assert worker.up and worker.active == 3 and worker.processed == 10
    state.tick(T0 + 11)
    assert worker.up
    state.tick(T0 + 11.5)
    assert not worker.up and worker.down_since == T0 + 11.5
    state.apply(ev("worker-heartbeat", hostname="w1@h", freq=2), T0 + 12)
    assert worker.up and worker.active == 3  # a reply to the heartbeat command carries no counts
    state.apply(ev("worker-offline", hostname="w1@h"), T0 + 13)
    assert not worker.up and worker.active == 0
    state.tick(T0 + 113)
    assert "w1@h" in state.workers
    state.tick(T0 + 113.5)
    assert "w1@h" not in state.workers


def test_slow_heartbeat_workers_get_two_intervals(state):
    state.apply(ev("worker-heartbeat", hostname="slow@h", freq=30), T0)
    state.tick(T0 + 50)
    assert state.workers["slow@h"].up
    state.tick(T0 + 61)
    assert not state.workers["slow@h"].up


@pytest.mark.parametrize("event, reason", [
    ({"hostname": "x"}, "missing_type"),
    ("just a string", "not_an_object"),
    ({"type": "task-started", "hostname": "w"}, "missing_uuid"),
    ({"type": "worker-heartbeat"}, "missing_hostname"),
    ({"type": "task-received", "uuid": "u", "name": "n"}, "missing_hostname"),
])
def test_malformed_events_are_counted_not_raised(state, event, reason):
    state.apply(event, T0)
    assert state.malformed == {reason: 1}


def test_wrong_types_in_fields_are_ignored_not_trusted(state):
    state.apply(ev("worker-heartbeat", hostname="w1@h", freq="fast", active="3", processed=None,
                   timestamp="yesterday"), T0)
    worker = state.workers["w1@h"]
    assert worker.up and worker.freq == 2.0 and worker.active is None
    state.apply(ev("task-succeeded", uuid="u", hostname="w1@h", runtime="1.5"), T0)
    assert state.workers["w1@h"].flows[("unknown", "unknown")].runtime.count == 0


def test_event_lag_is_corrected_with_the_senders_utcoffset(state):
    # A sender whose utcoffset says 2 hours west of us (Celery's sign): adjust_timestamp
    # takes 2 h off its timestamp.
    state.apply(ev("worker-heartbeat", hostname="w1@h", utcoffset=2, timestamp=T0 + 7200 - 3), T0)
    assert state.event_lag.count == 1 and state.event_lag.sum == pytest.approx(3.0)


def test_event_types_are_bounded(state):
    for i in range(200):
        state.apply({"type": f"custom-{i}"}, T0)
    assert len(state.events_by_type) <= 65
    assert state.events_by_type["other"] > 0


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((1.0, 5.0))
    for v in (0.5, 1.0, 3, 7):
        h.observe(v)
    assert h.cumulative() == [("1.0", 2), ("5.0", 3), ("+Inf", 4)]
    assert h.count == 4 and h.sum == pytest.approx(11.5)


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"])
def test_local_utcoffset_has_celerys_sign_so_same_zone_events_need_no_correction(zone, monkeypatch):
    import time

    from celery.utils.time import utcoffset

    from celery_health_exporter.state.events import adjusted_timestamp
    from celery_health_exporter.state.model import local_utcoffset

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        assert local_utcoffset() == utcoffset()
        # a worker in the same zone: its timestamp is used as it is
        event = {"timestamp": T0, "utcoffset": utcoffset()}
        assert adjusted_timestamp(event, local_utcoffset()) == T0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
