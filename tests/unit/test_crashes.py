"""Workers that stop on an unrecoverable error: the hook's report and the events'
signature (a task lost with exit code 0, its worker going down), in every order."""
import pytest

from celery_health_exporter.state.crashes import WINDOW, lost_on_main_exit
from celery_health_exporter.state.events import task_exception
from celery_health_exporter.state.model import ClusterState

from .events import T0, W, ev

LOST_0 = "WorkerLostError('Worker exited prematurely: exitcode 0 Job: 0.')"
WRAPPED_TRACEBACK = ('\n"""\nTraceback (most recent call last):\n  File "billiard/pool.py", line 1265\n'
                     'billiard.exceptions.WorkerLostError: Worker exited prematurely: exitcode 0 Job: 0.\n"""')


@pytest.fixture
def state():
    s = ClusterState(worker_timeout=10, lost_task_grace=5, utcoffset=0)
    s.apply(ev("worker-online", pid=1), T0)
    s.apply(ev("task-received", uuid="t", name="app.pay"), T0)
    s.apply(ev("task-started", uuid="t"), T0)
    return s


def hook_report(**fields):
    return ev("exporter-worker-unrecoverable", exception="TypeError", unpicklable="PayError", exit_code=0, **fields)


def test_the_hooks_report_counts_at_once_and_the_lost_task_names_the_unpicklable_class(state):
    state.apply(hook_report(), T0 + 1)
    assert state.crashes.errors == {(W, "TypeError"): 1}
    state.apply(ev("worker-offline"), T0 + 1)
    state.tick(T0 + 7)  # declared lost before the worker's late WorkerLostError
    state.apply(ev("task-failed", uuid="t", exception=LOST_0), T0 + 31)
    assert state.crashes.errors == {(W, "TypeError"): 1}
    assert state.unpicklable == {("app.pay", "PayError"): 1}
    assert state.crashes.last[W][1:] == ("TypeError", 0, "app.pay")


@pytest.mark.parametrize("offline_first", [True, False])
def test_without_the_hook_the_signature_counts_once_in_either_order(state, offline_first):
    failed = ev("task-failed", uuid="t", exception=LOST_0)
    events = [ev("worker-offline"), failed] if offline_first else [failed, ev("worker-offline")]
    for i, event in enumerate(events):
        state.apply(event, T0 + 1 + i)
    assert state.crashes.errors == {(W, "unknown"): 1}
    assert state.unpicklable == {}  # only the hook can name the class


def test_a_timed_out_worker_completes_the_signature(state):
    state.apply(ev("task-failed", uuid="t", exception=LOST_0), T0 + 1)
    assert state.crashes.errors == {}  # a child exiting 0 alone is no crash of the main process
    state.tick(T0 + 12)  # heartbeats stopped: down
    assert state.crashes.errors == {(W, "unknown"): 1}


def test_pieces_further_apart_than_the_window_are_not_one_crash(state):
    state.apply(ev("task-failed", uuid="t", exception=LOST_0), T0 + 1)
    state.apply(ev("worker-heartbeat", pid=1, freq=2), T0 + WINDOW)
    state.tick(T0 + WINDOW + 2)
    state.apply(ev("worker-offline"), T0 + WINDOW + 2)
    assert state.crashes.errors == {}


def test_a_restart_loop_counts_every_crash(state):
    for loop in range(3):
        at = T0 + 1 + loop * 20
        state.apply(hook_report(), at)
        state.apply(ev("task-failed", uuid=f"t{loop}", exception=LOST_0), at + 1)
        state.apply(ev("worker-online", pid=10 + loop), at + 2)
    assert state.crashes.errors == {(W, "TypeError"): 3}


def test_other_worker_lost_errors_are_no_signature():
    assert not lost_on_main_exit("WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL) Job: 3.')")
    assert not lost_on_main_exit("WorkerLostError('Worker exited prematurely: exitcode 155 Job: 3.')")
    assert lost_on_main_exit("billiard.exceptions.WorkerLostError: Worker exited prematurely: exitcode 0 Job: 0.")


def test_billiards_wrapper_is_unwrapped_from_the_traceback(state):
    event = {"exception": "ExceptionWithTraceback()", "traceback": WRAPPED_TRACEBACK}
    assert task_exception(event).startswith("billiard.exceptions.WorkerLostError: Worker exited")
    state.apply(ev("task-failed", uuid="t", **event), T0 + 1)
    state.apply(ev("worker-offline"), T0 + 2)
    assert state.crashes.errors == {(W, "unknown"): 1}
    assert {exc for flow in state.workers[W].flows.values() for exc in flow.failed} == {"WorkerLostError"}


def test_a_purged_worker_takes_its_series(state):
    state.apply(hook_report(), T0 + 1)
    state.apply(ev("worker-offline"), T0 + 1)
    state.tick(T0 + 10_000)
    assert W not in state.workers and state.crashes.errors == {} and state.crashes.last == {}
