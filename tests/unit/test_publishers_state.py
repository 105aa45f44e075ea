"""The publisher part of the model: hook events summed per publisher, counters that never go back."""
import json
import time

import pytest
from celery import Celery

from celery_health_exporter.hooks.publisher import EVENT_TYPE as HOOK_EVENT_TYPE
from celery_health_exporter.hooks.publisher import PublisherHook
from celery_health_exporter.state.model import ClusterState
from celery_health_exporter.state.publishers import EVENT_TYPE, MAX_EXCEPTION_CLASSES, PublisherState

NOW = 50_000.0
BOUNDS = [0.01, 0.1, 1.0]


def event(publisher="web-1", instance="a", *, publishes=0, retries=0, exceeded=0, failures=None, counts=None,
          total=0.0, interval=15, hook_errors=None, **extra):
    body = {"type": EVENT_TYPE, "hostname": publisher, "timestamp": NOW, "utcoffset": 0, "pid": 4242, "clock": 0,
            "format": 1, "instance": instance, "interval": interval, "publishes": publishes, "retries": retries,
            "retry_policy_exceeded": exceeded, "failures": failures or {}, "hook_errors": hook_errors or {},
            "duration": {"bounds": BOUNDS, "counts": counts or [publishes, 0, 0, 0], "sum": total}}
    body.update(extra)
    return body


def totals(state, publisher="web-1"):
    return state.publishers.totals()[publisher]


@pytest.fixture
def state():
    return ClusterState(utcoffset=0, purge_offline_after=600)


def test_the_handler_is_registered_and_totals_are_kept(state):
    assert HOOK_EVENT_TYPE == EVENT_TYPE
    state.apply(event(publishes=7, retries=4, exceeded=1, failures={"OperationalError": 2},
                      counts=[3, 2, 1, 1], total=2.5), NOW)
    t = totals(state)
    assert (t.publishes, t.retries, t.exceeded, t.failures) == (7, 4, 1, {"OperationalError": 2})
    assert t.duration.cumulative() == [("0.01", 3), ("0.1", 5), ("1.0", 6), ("+Inf", 7)]
    assert (t.duration.count, t.duration.sum) == (7, 2.5)
    assert state.events_by_type[EVENT_TYPE] == 1


def test_processes_of_one_publisher_add_up_and_pids_never_become_labels(state):
    for i in range(500):  # a gunicorn pool recycling its processes
        state.apply(event(instance=f"i{i}", publishes=2, pid=10_000 + i), NOW + i * 0.01)
    assert list(state.publishers.totals()) == ["web-1"]
    assert totals(state).publishes == 1000
    assert state.publishers.instances("web-1") == 500


def test_cumulative_totals_of_one_process_are_not_added_twice(state):
    state.apply(event(publishes=5), NOW)
    state.apply(event(publishes=8), NOW + 15)
    state.apply(event(instance="b", publishes=1), NOW + 15)
    assert totals(state).publishes == 9


def test_a_process_that_exits_keeps_its_counts(state):
    state.apply(event(instance="gone", publishes=10, failures={"OperationalError": 1}), NOW)
    state.apply(event(instance="live", publishes=1), NOW)
    for t in range(1, 40):  # "gone" stops reporting; "live" goes on
        state.apply(event(instance="live", publishes=1 + t), NOW + t * 15)
        state.tick(NOW + t * 15)  # the exporter's timer
    assert state.publishers.instances("web-1") == 1  # retired: memory follows the live processes
    t = totals(state)
    assert (t.publishes, t.failures) == (10 + 40, {"OperationalError": 1})


def test_an_instance_back_after_retirement_is_not_counted_twice(state):
    state.apply(event(instance="slow", publishes=10), NOW)
    state.tick(NOW + 300)  # "slow" is retired by the timer
    state.apply(event(instance="other", publishes=1), NOW + 300)
    assert state.publishers.instances("web-1") == 1
    assert totals(state).publishes == 11
    state.apply(event(instance="slow", publishes=12), NOW + 301)  # its broker came back
    assert totals(state).publishes == 13


def test_totals_that_go_down_are_a_new_run_and_the_sum_never_decreases(state):
    state.apply(event(publishes=10, retries=3), NOW)
    state.apply(event(publishes=2, retries=0), NOW + 15)  # same instance id, fresh counters
    t = totals(state)
    assert (t.publishes, t.retries) == (12, 3)


def test_a_publisher_silent_for_purge_after_disappears(state):
    state.apply(event(publishes=1), NOW)
    state.publishers.expire(NOW + 599)
    assert "web-1" in state.publishers.totals()
    state.publishers.expire(NOW + 601)
    assert state.publishers.totals() == {}


def test_exception_classes_are_bounded_per_publisher(state):
    many = {f"Error{i}": 1 for i in range(MAX_EXCEPTION_CLASSES + 10)}
    state.apply(event(failures=many), NOW)
    failures = totals(state).failures
    assert len(failures) == MAX_EXCEPTION_CLASSES + 1
    assert failures["other"] == 10 and sum(failures.values()) == MAX_EXCEPTION_CLASSES + 10


def test_different_buckets_are_not_mixed(state):
    state.apply(event(instance="a", publishes=1, counts=[1, 0, 0, 0], total=0.001), NOW)
    other = event(instance="b", publishes=1)
    other["duration"] = {"bounds": [0.5, 5.0], "counts": [1, 0, 0], "sum": 0.2}
    state.apply(other, NOW)
    t = totals(state)
    assert t.publishes == 2 and t.duration.count == 1  # b's durations cannot be summed into a's buckets
    assert t.hook_errors == {"exporter_bucket_mismatch": 1}


@pytest.mark.parametrize("change, reason", [
    ({"instance": None}, "publisher_instance"),
    ({"hostname": ""}, "missing_hostname"),
    ({"duration": {"bounds": [1, 0.5], "counts": [0, 0, 0], "sum": 0}}, "publisher_duration"),
    ({"duration": {"bounds": [1], "counts": [0], "sum": 0}}, "publisher_duration"),
    ({"duration": {"bounds": [1], "counts": [0, -1], "sum": 0}}, "publisher_duration"),
    ({"duration": {"bounds": ["x"], "counts": [0, 0], "sum": 0}}, "publisher_duration"),
])
def test_malformed_events_are_counted_not_raised(state, change, reason):
    state.apply(event(publishes=3, **change), NOW)
    assert state.malformed == {reason: 1}
    assert state.publishers.totals() == {}


def test_junk_counts_are_ignored(state):
    state.apply(event(publishes=-5, retries="many", exceeded=float("nan"), counts=[0, 0, 0, 0],
                      failures={"A": -1, "B": True, "": 3, "C": 2}), NOW)
    t = totals(state)
    assert (t.publishes, t.retries, t.exceeded, t.failures) == (0, 0, 0, {"C": 2})


def test_the_hooks_own_event_round_trips(state):
    """The event the hook builds is the one the model reads (format contract, no broker)."""
    app = Celery("roundtrip", broker="memory://", set_as_current=False)
    hook = PublisherHook(app, publisher="api-7", buckets=(0.01, 0.1, 1.0), flush_at_exit=False)
    hook._thread = object()  # no shipping thread: this test only builds the event

    def sender(producer, name, message, retry_policy=None, **kwargs):
        retry_policy["errback"](ConnectionError("lost"), 0)  # kombu calls the policy's errback
        time.sleep(0.05 if name == "ok" else 0)
        if name != "ok":
            raise ConnectionError("down")

    send = hook.wrap(sender)
    send(None, "ok", None)
    with pytest.raises(ConnectionError):
        send(None, "bad", None)
    body = json.loads(json.dumps(hook.event()))
    assert body["type"] == EVENT_TYPE and body["hostname"] == "api-7"
    state.apply(body, body["timestamp"])
    t = totals(state, "api-7")
    assert (t.publishes, t.retries, t.failures) == (2, 2, {"ConnectionError": 1})
    assert t.duration.cumulative() == [("0.01", 1), ("0.1", 2), ("1.0", 2), ("+Inf", 2)]
    assert state.malformed == {}


def test_standalone_state_without_a_cluster():
    publishers = PublisherState(purge_after=10)
    publishers.on_event(event(publishes=1), NOW, NOW)
    assert publishers.totals()["web-1"].publishes == 1
