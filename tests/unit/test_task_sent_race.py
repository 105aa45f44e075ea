"""A task's task-sent (publisher's connection) and its worker's events arrive in either
order. A terminal event that names no task, for a task not known yet, waits up to
task_sent_grace for the task-sent that names it, then counts under "unknown"."""
import pytest

from celery_health_exporter.state import tasks
from celery_health_exporter.state.model import ClusterState

from .events import T0, W, ev

GRACE = 10.0
PUBLISHER = "web@h"


@pytest.fixture
def state():
    s = ClusterState(worker_timeout=1000, utcoffset=0, task_sent_grace=GRACE)
    s.apply(ev("worker-online", pid=1), T0)
    return s


def sent(uuid, name="app.report", queue="reports", at=T0):
    return ev("task-sent", uuid=uuid, name=name, queue=queue, hostname=PUBLISHER, timestamp=at)


def revoked_expired(uuid, at=T0):
    return ev("task-revoked", uuid=uuid, expired=True, terminated=False, signum=None, timestamp=at)


def flow_counts(state, attribute):
    return {key: getattr(flow, attribute) for key, flow in state.workers[W].flows.items() if getattr(flow, attribute)}


def test_an_expired_task_discarded_before_its_task_sent_arrives_is_attributed_to_its_name(state):
    state.apply(revoked_expired("t1"), T0 + 1)
    state.tick(T0 + 2)
    assert state.expired == {} and flow_counts(state, "revoked") == {}  # waiting for its task-sent
    state.apply(sent("t1"), T0 + 3)
    assert state.expired == {("app.report", "reports"): 1}
    assert flow_counts(state, "revoked") == {("app.report", "reports"): 1}
    assert "t1" not in state.tasks  # no record left waiting in the queue for ever
    assert state.broker.oldest_unstarted(state, T0 + 100) == {}
    assert state.unattributed == {} and state.unattributed_terminal_events == 0


def test_without_a_task_sent_within_the_grace_it_counts_as_unknown_once(state):
    state.apply(revoked_expired("t2"), T0 + 1)
    state.tick(T0 + 1 + GRACE - 0.1)
    assert state.expired == {}
    state.tick(T0 + 1 + GRACE + 0.1)
    assert state.expired == {("unknown", "unknown"): 1}
    assert state.unattributed_terminal_events == 1
    state.apply(sent("t2"), T0 + 30)  # far too late: the counter does not move back or twice
    assert state.expired == {("unknown", "unknown"): 1}
    assert state.sent == {("app.report", "h", "reports"): 1}


def test_a_task_whose_name_and_queue_are_known_is_counted_at_once(state):
    state.apply(sent("earlier", name="app.x", queue="q"), T0)  # routes app.x to q
    state.apply(ev("task-received", uuid="t3", name="app.x"), T0)
    state.apply(ev("task-started", uuid="t3"), T0)
    state.apply(ev("task-succeeded", uuid="t3", runtime=0.5), T0 + 1)
    assert state.unattributed == {}
    assert sum(flow_counts(state, "succeeded").values()) == 1


def test_events_of_a_held_task_wait_behind_it_in_order_until_its_task_sent(state):
    state.apply(ev("task-retried", uuid="t4", exception="ConnectionError()"), T0)
    state.apply(ev("task-received", uuid="t4", name="app.fetch"), T0 + 1)  # the retry's message
    state.apply(ev("task-failed", uuid="t4", exception="ConnectionError()"), T0 + 2)
    assert flow_counts(state, "retried") == {} and flow_counts(state, "received") == {}
    state.apply(sent("t4", name="app.fetch", queue="feeds"), T0 + 3)  # the retry's task-sent
    assert flow_counts(state, "retried") == {("app.fetch", "feeds"): 1}
    assert flow_counts(state, "received") == {("app.fetch", "feeds"): 1}
    assert sum(flow.failed.get("ConnectionError", 0) for flow in state.workers[W].flows.values()) == 1
    assert state.unattributed == {} and "t4" not in state.tasks


def test_memory_is_bounded_the_oldest_held_event_counts_at_once(state, monkeypatch):
    monkeypatch.setattr(tasks, "MAX_UNATTRIBUTED", 3)
    for i in range(5):
        state.apply(revoked_expired(f"b{i}"), T0)
    assert len(state.unattributed) == 3
    assert state.expired == {("unknown", "unknown"): 2}
    assert state.unattributed_terminal_events == 2


def test_grace_zero_counts_at_once():
    state = ClusterState(utcoffset=0, task_sent_grace=0)
    state.apply(revoked_expired("z"), T0)
    assert state.expired == {("unknown", "unknown"): 1}


def test_a_task_received_before_its_task_sent_counts_under_the_queue_of_the_task_sent(state):
    state.apply(sent("earlier", name="app.other", queue="other"), T0)  # publishers send task-sent
    state.apply(ev("task-received", uuid="r1", name="app.report"), T0 + 1)
    state.apply(ev("task-started", uuid="r1"), T0 + 1)
    state.apply(ev("task-succeeded", uuid="r1", runtime=0.1), T0 + 2)
    assert flow_counts(state, "received") == {}  # its queue is on the way
    state.apply(sent("r1"), T0 + 3)
    assert flow_counts(state, "received") == {("app.report", "reports"): 1}
    assert flow_counts(state, "succeeded") == {("app.report", "reports"): 1}
    assert "r1" not in state.tasks and state.unattributed == {}
    # the queue of app.report is now known: the next one is counted at once
    state.apply(ev("task-received", uuid="r2", name="app.report"), T0 + 4)
    assert flow_counts(state, "received") == {("app.report", "reports"): 2}


def test_a_task_name_whose_publishers_send_no_task_sent_waits_once(state):
    state.apply(ev("task-received", uuid="n1", name="app.report"), T0)
    assert flow_counts(state, "received") == {}
    state.tick(T0 + GRACE + 0.1)
    assert flow_counts(state, "received") == {("app.report", "unknown"): 1}
    state.apply(ev("task-received", uuid="n2", name="app.report"), T0 + 20)  # counted at once now
    assert flow_counts(state, "received") == {("app.report", "unknown"): 2}
    state.apply(ev("task-received", uuid="n3", name="app.other"), T0 + 21)  # another name still waits
    assert flow_counts(state, "received") == {("app.report", "unknown"): 2}


def test_a_received_task_whose_task_sent_never_comes_counts_under_unknown_after_the_grace(state):
    state.apply(sent("earlier", name="app.other", queue="other"), T0)
    state.apply(ev("task-received", uuid="r3", name="app.report"), T0 + 1)
    state.tick(T0 + 1 + GRACE + 0.1)
    assert flow_counts(state, "received") == {("app.report", "unknown"): 1}
    assert state.unattributed_terminal_events == 1
