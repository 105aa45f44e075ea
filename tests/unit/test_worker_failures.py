"""Failure detectors of the state model: restarts, unclean shutdowns, stalls, lost tasks, recycling."""
import pytest

from celery_health_exporter.state.model import ClusterState

from .events import T0, W, ev


@pytest.fixture
def state():
    return ClusterState(worker_timeout=10, purge_offline_after=1000, stall_after=60, lost_task_grace=5,
                        utcoffset=0)


def online(state, now, pid):
    state.apply(ev("worker-online", pid=pid, freq=2, timestamp=now), now)
    state.apply(ev("worker-heartbeat", pid=pid, freq=2, active=0, processed=0, timestamp=now), now)


def test_restart_loop_counts_restarts_and_only_unclean_stops(state):
    worker = None
    online(state, T0, pid=100)                       # first start: not a restart
    state.apply(ev("worker-offline", pid=100), T0 + 5)  # SIGTERM
    online(state, T0 + 10, pid=101)                  # restart 1
    worker = state.workers[W]
    assert (worker.restarts, worker.unclean_shutdowns, worker.up) == (1, 0, True)
    state.tick(T0 + 21)                            # SIGKILL: heartbeats stop
    assert (worker.up, worker.unclean_shutdowns) == (False, 1)
    online(state, T0 + 30, pid=102)                  # restart 2
    state.apply(ev("worker-offline", pid=102), T0 + 35)
    online(state, T0 + 40, pid=103)                  # restart 3
    assert worker.start_time == T0 + 40
    state.tick(T0 + 51)
    assert (worker.restarts, worker.unclean_shutdowns, worker.up) == (3, 2, False)


def test_restart_before_the_timeout_is_seen_from_the_new_pid_and_counted_unclean(state):
    online(state, T0, pid=100)
    state.apply(ev("worker-heartbeat", pid=200, freq=2, active=0, processed=0), T0 + 3)
    worker = state.workers[W]
    assert (worker.restarts, worker.unclean_shutdowns) == (1, 1)


def test_processed_count_reset_is_a_restart_even_with_the_same_pid(state):
    online(state, T0, pid=1)  # containers: pid 1 every time
    state.apply(ev("worker-heartbeat", pid=1, freq=2, active=0, processed=50), T0 + 2)
    state.apply(ev("worker-heartbeat", pid=1, freq=2, active=0, processed=3), T0 + 4)
    assert state.workers[W].restarts == 1


def test_heartbeat_gap_without_a_new_process_is_not_a_restart(state):
    online(state, T0, pid=100)
    state.tick(T0 + 11)
    state.apply(ev("worker-heartbeat", pid=100, freq=2, active=0, processed=0), T0 + 12)
    worker = state.workers[W]
    assert worker.up and worker.restarts == 0 and worker.unclean_shutdowns == 1


def test_hung_task_makes_the_worker_stalled_until_it_restarts(state):
    online(state, T0, pid=100)
    state.apply(ev("task-received", uuid="t1", name="app.hang"), T0 + 1)
    state.apply(ev("task-started", uuid="t1"), T0 + 1)
    for t in range(3, 70, 2):
        state.apply(ev("worker-heartbeat", pid=100, freq=2, active=1, processed=0), T0 + t)
    worker = state.workers[W]
    prefetched, oldest_by_worker, oldest_by_name = state.in_flight()
    assert oldest_by_worker[W] == T0 + 1 and oldest_by_name["app.hang"] == T0 + 1
    assert not state.is_stalled(worker, T0 + 60)
    assert state.is_stalled(worker, T0 + 62)
    online(state, T0 + 80, pid=101)  # restarted: the hung task is gone with the old process
    assert not state.is_stalled(worker, T0 + 200)
    assert state.in_flight()[1] == {}


def test_a_busy_worker_that_finishes_tasks_is_not_stalled(state):
    online(state, T0, pid=100)
    for i in range(0, 100, 10):
        state.apply(ev("task-received", uuid=f"t{i}", name="app.work"), T0 + i)
        state.apply(ev("task-started", uuid=f"t{i}"), T0 + i)
        if i:
            state.apply(ev("task-succeeded", uuid=f"t{i - 10}", runtime=10), T0 + i)
        state.apply(ev("worker-heartbeat", pid=100, freq=2, active=1, processed=i // 10), T0 + i)
    assert not state.is_stalled(state.workers[W], T0 + 95)


def test_an_idle_worker_that_starts_a_task_is_not_instantly_stalled(state):
    online(state, T0, pid=100)
    state.apply(ev("worker-heartbeat", pid=100, freq=2, active=0, processed=0), T0 + 500)
    state.apply(ev("task-started", uuid="t1"), T0 + 501)
    assert not state.is_stalled(state.workers[W], T0 + 502)


def test_tasks_of_a_killed_worker_are_lost_after_the_grace_period(state):
    online(state, T0, pid=100)
    state.apply(ev("task-sent", uuid="t1", name="app.pay", queue="payments", hostname="gen@h"), T0)
    state.apply(ev("task-received", uuid="t1", name="app.pay"), T0)
    state.apply(ev("task-started", uuid="t1"), T0)
    state.apply(ev("task-received", uuid="t2", name="app.pay"), T0)
    state.tick(T0 + 11)  # killed
    assert state.lost == {}
    state.tick(T0 + 15.9)
    assert state.lost == {}
    state.tick(T0 + 16.1)
    assert state.lost == {("app.pay", "payments", "worker_lost"): 2}
    assert state.tracked_tasks == 0


def test_warm_shutdown_loses_only_started_tasks_and_redelivered_ones_are_not_lost(state):
    online(state, T0, pid=100)
    for uuid in ("started", "reserved", "redelivered"):
        state.apply(ev("task-received", uuid=uuid, name="app.x"), T0)
    state.apply(ev("task-started", uuid="started"), T0)
    state.apply(ev("task-started", uuid="redelivered"), T0)
    state.apply(ev("worker-offline", pid=100), T0 + 1)
    state.apply(ev("task-received", uuid="redelivered", name="app.x", hostname="w2@h"), T0 + 2)
    state.tick(T0 + 7)
    assert state.lost == {("app.x", "unknown", "worker_lost"): 1}


def test_expired_and_unpicklable_are_counted(state):
    online(state, T0, pid=100)
    state.apply(ev("task-sent", uuid="e", name="app.old", queue="q", hostname="gen@h"), T0)
    state.apply(ev("task-received", uuid="e", name="app.old"), T0)
    state.apply(ev("task-revoked", uuid="e", expired=True, terminated=False, signum=None), T0)
    state.apply(ev("task-received", uuid="u", name="app.bad"), T0)
    state.apply(ev("task-retried", uuid="u", exception="UnpickleableExceptionWrapper('m', 'BadErr', (), 'x')"), T0)
    assert state.expired == {("app.old", "q"): 1}
    assert state.unpicklable == {("app.bad", "BadErr"): 1}
    assert state.workers[W].flows[("app.old", "q")].revoked == 1


def test_prefetched_counts_received_not_started(state):
    online(state, T0, pid=100)
    for i in range(4):
        state.apply(ev("task-received", uuid=f"t{i}", name="app.x"), T0)
    state.apply(ev("task-started", uuid="t0"), T0)
    assert state.in_flight()[0] == {W: 3}


def test_stats_give_pool_limits_and_a_lower_bound_of_child_replacements(state):
    online(state, T0, pid=100)
    stats = {"pid": 100, "uptime": 30, "prefetch_count": 8,
             "pool": {"max-concurrency": 2, "processes": [11, 12], "max-tasks-per-child": "N/A"}}
    state.apply_stats(W, stats, T0 + 30)
    worker = state.workers[W]
    assert (worker.start_time, worker.pool_processes, worker.max_concurrency) == (T0, 2, 2)
    assert worker.prefetch_count == 8 and worker.max_tasks_per_child == 0
    state.apply_stats(W, {**stats, "pool": {**stats["pool"], "processes": [12, 13]}}, T0 + 60)
    assert worker.child_replacements == {"unknown": 1}
    state.apply_stats(W, {"pid": 100, "uptime": 90, "pool": {"max-concurrency": 1}}, T0 + 90)  # solo pool
    assert worker.pool_processes is None
    state.apply_conf(W, {"worker_max_memory_per_child": 200_000})
    assert worker.max_memory_per_child == 200_000 * 1024


def test_hook_counters_become_deltas_that_survive_a_worker_restart(state):
    online(state, T0, pid=100)
    reply = {"pid": 100, "replacements": {"memory": 3, "tasks": 0}, "child_peak_rss_bytes": 250_000_000,
             "child_tasks": {"counts": [0, 1, 2, 0, 0, 0, 0, 0, 0, 0], "sum": 12},
             "max_tasks_per_child": 0, "max_memory_per_child_bytes": 200 * 1024 * 1024,
             "revoked": 42, "revoked_limit": 50000}
    state.apply_hook(W, reply, T0)
    state.apply_hook(W, reply, T0 + 30)  # same totals: nothing new
    worker = state.workers[W]
    assert worker.child_replacements == {"memory": 3, "tasks": 0, "signal": 0, "error": 0}  # all from the start
    assert worker.child_tasks.count == 3 and worker.child_tasks.sum == 12
    assert (worker.revoked, worker.revoked_limit, worker.limits_from_hook) == (42, 50000, True)
    state.apply_stats(W, {"pid": 100, "pool": {"processes": [1, 2], "max-tasks-per-child": 7}}, T0 + 31)
    assert worker.max_tasks_per_child == 0  # the hook's exact value wins over stats
    # the worker restarted: the hook's totals start again from zero
    state.apply_hook(W, {**reply, "pid": 200, "replacements": {"memory": 1},
                         "child_tasks": {"counts": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0], "sum": 2}}, T0 + 60)
    assert worker.child_replacements["memory"] == 4
    assert worker.child_tasks.count == 4 and worker.child_tasks.sum == 14


def test_cardinality_caps_fold_workers_names_queues_and_exceptions_into_other():
    from celery_health_exporter.state.cardinality import CardinalityCaps

    state = ClusterState(caps=CardinalityCaps(task_names=2, workers=2, queues=2, exceptions=1), utcoffset=0)
    for i in range(50):  # a flood of random worker names with their own pids
        state.apply(ev("worker-heartbeat", hostname=f"rnd{i}@h", pid=i, freq=2, processed=0), T0 + i)
        state.apply(ev("task-sent", hostname="gen@h", uuid=f"t{i}", name=f"app.t{i}", queue=f"q{i}"), T0 + i)
        state.apply(ev("task-received", hostname=f"rnd{i}@h", uuid=f"t{i}", name=f"app.t{i}"), T0 + i)
        state.apply(ev("task-failed", hostname=f"rnd{i}@h", uuid=f"t{i}", exception=f"E{i}()"), T0 + i)
    assert set(state.workers) == {"rnd0@h", "rnd1@h", "other"}
    assert state.workers["other"].restarts == 0  # many pids behind "other" are not restarts
    names = {name for w in state.workers.values() for name, _ in w.flows}
    queues = {queue for w in state.workers.values() for _, queue in w.flows}
    assert names == {"app.t0", "app.t1", "other"} and queues == {"q0", "q1", "other"}
    failed = {exc for w in state.workers.values() for flow in w.flows.values() for exc in flow.failed}
    assert failed == {"E0", "other"}
    assert state.cardinality.hostname.folded == 3 * 48  # heartbeat, received, failed of each folded worker
    assert sum(f.received for w in state.workers.values() for f in w.flows.values()) == 50  # nothing lost


# ---------------------------------------------------------- ghosts of lost terminal events

def started(state, uuid, name, now, hostname=W):
    state.apply(ev("task-received", uuid=uuid, name=name, hostname=hostname, timestamp=now), now)
    state.apply(ev("task-started", uuid=uuid, hostname=hostname, timestamp=now), now)


def beat(state, now, hostname=W):
    state.apply(ev("worker-heartbeat", pid=1, freq=2, active=0, processed=0, hostname=hostname, timestamp=now), now)


def test_a_started_task_its_worker_no_longer_runs_vanishes_once_later_events_arrived(state):
    beat(state, T0)
    started(state, "ghost", "app.slow", T0 + 1)
    started(state, "running", "app.slow", T0 + 1)
    assert state.in_flight()[1][W] == T0 + 1
    # inspect active at T0+20 lists only "running"; the ghost's task-succeeded was lost
    state.apply_active_ids({W: {"running"}}, asked_at=T0 + 20, settle=3)
    beat(state, T0 + 22)  # sent before the answer could have been flushed: not yet
    assert "ghost" in state.tasks and state.tracked_vanished == 0
    beat(state, T0 + 24)
    assert "ghost" not in state.tasks and "running" in state.tasks
    assert state.tracked_vanished == 1 and state.workers[W].running == 1
    # the terminal event still comes (it was only late): counted once, with its name
    state.apply(ev("task-succeeded", uuid="ghost", runtime=2.0, timestamp=T0 + 3), T0 + 30)
    assert state.workers[W].flows[("app.slow", "unknown")].succeeded == 1


def test_tasks_listed_started_after_the_question_or_finished_in_time_stay_counted_once(state):
    beat(state, T0)
    started(state, "listed", "app.a", T0 + 1)
    started(state, "finishing", "app.a", T0 + 1)
    state.apply_active_ids({W: {"listed"}}, asked_at=T0 + 20, settle=3)
    started(state, "newer", "app.a", T0 + 21)  # started after the question: not in its answer
    state.apply(ev("task-succeeded", uuid="finishing", runtime=1.0, timestamp=T0 + 21), T0 + 21)
    beat(state, T0 + 30)
    assert set(state.tasks) == {"listed", "newer"}
    assert state.tracked_vanished == 0
    assert state.workers[W].flows[("app.a", "unknown")].succeeded == 1


def test_workers_that_did_not_answer_keep_their_tasks(state):
    other = "w2@h"
    beat(state, T0)
    beat(state, T0, hostname=other)
    started(state, "mine", "app.a", T0 + 1)
    started(state, "theirs", "app.a", T0 + 1, hostname=other)
    state.apply_active_ids({W: set()}, asked_at=T0 + 20, settle=3)
    beat(state, T0 + 30)
    beat(state, T0 + 30, hostname=other)
    assert set(state.tasks) == {"theirs"} and state.tracked_vanished == 1


def test_a_retry_of_the_same_task_id_started_after_the_question_is_not_dropped(state):
    beat(state, T0)
    started(state, "x", "app.flaky", T0 + 1)
    state.apply_active_ids({W: set()}, asked_at=T0 + 20, settle=3)  # x had failed and asked for a retry...
    state.apply(ev("task-retried", uuid="x", exception="IOError()", timestamp=T0 + 19), T0 + 20)
    started(state, "x", "app.flaky", T0 + 21)  # ...which runs now, with the same id
    beat(state, T0 + 30)
    assert state.tasks["x"].state == "STARTED" and state.tracked_vanished == 0
    assert state.workers[W].running == 1


def test_while_the_exporter_lags_a_ghost_keeps_its_first_deadline(state):
    beat(state, T0)
    started(state, "ghost", "app.slow", T0 + 1)
    # polls every 10 s; the exporter applies the worker's events 30 s late, so the
    # heartbeats it sees are always older than the latest poll's deadline
    for poll in range(5):
        asked = T0 + 20 + 10 * poll
        state.apply_active_ids({W: set()}, asked_at=asked, settle=3)
        beat(state, asked - 30 + 8, hostname=W)
    assert "ghost" not in state.tasks and state.tracked_vanished == 1


# ---------------------------------------------------------- the exporter's own outages

def test_workers_are_not_timed_out_while_the_exporter_receives_no_events(state):
    beat(state, T0)
    started(state, "t1", "app.a", T0 + 1)
    state.events_interrupted(T0 + 5)  # our subscription is gone for 60 s
    state.tick(T0 + 65)
    worker = state.workers[W]
    assert worker.up and worker.unclean_shutdowns == 0 and worker.epoch == 0
    state.events_resumed(T0 + 65)  # its 4 s of silence before the outage still count
    state.tick(T0 + 70)
    assert worker.up and not state.pending_lost
    state.tick(T0 + 72)  # 12 s of its own silence (5 before the outage): past the 10 s timeout
    assert not worker.up and worker.unclean_shutdowns == 1
    assert "t1" in state.tasks  # held until the lost-task grace has passed
    state.tick(T0 + 80)
    assert "t1" not in state.tasks and sum(state.lost.values()) == 1


def test_a_task_sent_event_that_arrives_after_the_task_finished_leaves_nothing_waiting(state):
    beat(state, T0)
    started(state, "quick", "app.a", T0 + 1)
    state.apply(ev("task-succeeded", uuid="quick", runtime=0.01, timestamp=T0 + 1), T0 + 1)
    state.apply(ev("task-sent", uuid="quick", name="app.a", queue="q", hostname="gen1@h", timestamp=T0 + 1),
                T0 + 2)
    assert "quick" not in state.tasks and state.sent[("app.a", "h", "q")] == 1
    assert state.queue_of_name["app.a"] == "q"


def test_a_retry_is_awaited_again_after_its_task_sent(state):
    beat(state, T0)
    state.apply(ev("task-sent", uuid="r", name="app.flaky", queue="q", hostname="gen1@h", timestamp=T0), T0)
    started(state, "r", "app.flaky", T0 + 1)
    state.apply(ev("task-retried", uuid="r", exception="IOError()", timestamp=T0 + 2), T0 + 2)
    state.apply(ev("task-sent", uuid="r", name="app.flaky", queue="q", hostname=W, timestamp=T0 + 2), T0 + 2)
    assert state.tasks["r"].state == "PENDING" and state.tasks["r"].sent_at == T0 + 2
    started(state, "r", "app.flaky", T0 + 5)
    state.apply(ev("task-succeeded", uuid="r", runtime=1.0, timestamp=T0 + 6), T0 + 6)
    assert "r" not in state.tasks and state.sent[("app.flaky", "h", "q")] == 2
