"""The host agent's model: command lines, main/child/orphan classification, counters across scans."""
import re

import pytest
from celery.utils.nodenames import default_nodename, host_format

from celery_health_exporter.state.hosts import (
    CHILD,
    MAIN,
    ORPHAN,
    HostState,
    ProcessSample,
    WorkerCommand,
    classify,
    expand_node,
    parse_worker_command,
)

HOST = "web-1.example.com"
NOW = 10_000.0


# ----------------------------------------------------------------- commands

@pytest.mark.parametrize("argv, node, pool", [
    (["celery", "-A", "proj", "worker", "-n", "w1@%h"], "w1@web-1.example.com", None),
    (["/usr/bin/python3", "-m", "celery", "-A", "proj", "worker", "-l", "info"], "celery@web-1.example.com", None),
    (["/venv/bin/python", "/venv/bin/celery", "--app=proj", "worker", "--hostname=x@%n.%d", "-P", "solo"],
     "x@web-1.example.com", "solo"),
    (["python", "-u", "-m", "celery", "worker", "-Pgevent", "-nfoo"], "celery@foo", "gevent"),
    (["/usr/local/bin/celery", "-b", "redis://", "worker", "--pool=threads", "--hostname", "%n@%h"],
     "web-1@web-1.example.com", "threads"),
    (["celery", "-A", "proj", "worker", "-n", "a%%b@%d"], "a%b@example.com", None),
])
def test_worker_command_lines_in_every_spelling(argv, node, pool):
    assert parse_worker_command(argv, host=HOST) == WorkerCommand(node, pool, None)


@pytest.mark.parametrize("argv", [
    ["celery", "-A", "worker", "beat"],  # -A takes "worker" as its value: this is beat
    ["celery", "multi", "start", "w1", "-A", "proj"],
    ["celery", "-A", "proj", "inspect", "active"],
    ["python", "manage.py", "runserver"],
    ["python", "worker.py", "celery"],
    ["celery"],
    ["/bin/sh", "-c", "celery -A proj worker"],  # the shell, not the worker (that is its child)
    [],
    None,
])
def test_other_command_lines_are_not_workers(argv):
    assert parse_worker_command(argv, host=HOST) is None


@pytest.mark.parametrize("value", [None, "w1@%h", "foo", "w1@", "%n-x@%d", "%h", "a@b@c", "w%%1@%h"])
def test_node_names_expand_exactly_like_celery_worker(value, monkeypatch):
    monkeypatch.setattr("celery.utils.nodenames.gethostname", lambda: HOST)
    assert expand_node(value, HOST) == host_format(default_nodename(value), host=HOST)  # celery/bin/worker.py


def test_setproctitle_titles_give_node_and_role():
    main = parse_worker_command(["[celeryd: w1@web-1:MainProcess] -active- (worker -A proj)"], host=HOST)
    child = parse_worker_command(["[celeryd:", "w1@web-1:ForkPoolWorker-3]"], host=HOST)
    assert main == WorkerCommand("w1@web-1", None, MAIN)
    assert child == WorkerCommand("w1@web-1", None, CHILD)


def test_a_custom_pattern_decides_what_is_a_worker():
    pattern = re.compile(r"run_worker\.py")
    assert parse_worker_command(["python", "run_worker.py", "-n", "x@%h"], pattern=pattern, host=HOST) == \
        WorkerCommand("x@web-1.example.com", None, None)
    assert parse_worker_command(["celery", "-A", "p", "worker"], pattern=pattern, host=HOST) is None
    only_mine = re.compile(r"-n q1@")
    assert parse_worker_command(["celery", "-A", "p", "worker", "-n", "q1@%h"], pattern=only_mine,
                                host=HOST).node == "q1@web-1.example.com"


# ------------------------------------------------------------ classification

def sample(pid, ppid, *, pgid=None, node="w1@h", age=100.0, pool=None, title=None, rss=0, cpu=0.0):
    return ProcessSample(pid, ppid, pgid if pgid is not None else pid, NOW - age,
                         WorkerCommand(node, pool, title), rss, cpu)


def worker(main_pid, children, *, ppid=1000, node="w1@h", age=100.0, pgid=None):
    group = pgid if pgid is not None else main_pid
    return [sample(main_pid, ppid, pgid=group, node=node, age=age)] + [
        sample(pid, main_pid, pgid=group, node=node, age=age - 1) for pid in children]


def test_a_prefork_worker_is_one_main_and_its_children():
    roles = classify(worker(10, [11, 12, 13]), {1, 1000, 10, 11, 12, 13}, NOW)
    assert roles == {10: MAIN, 11: CHILD, 12: CHILD, 13: CHILD}


def test_children_left_by_a_killed_main_are_orphans():
    # main 10 SIGKILLed: its children re-parented to init, their group leader gone
    left = [sample(pid, 1, pgid=10, age=60) for pid in (11, 12, 13)]
    assert classify(left, {1, 11, 12, 13}, NOW) == {11: ORPHAN, 12: ORPHAN, 13: ORPHAN}
    # re-parented to a subreaper (tini, systemd --user ...) instead of init: same
    left = [sample(pid, 777, pgid=10, age=60) for pid in (11, 12, 13)]
    assert classify(left, {1, 777, 11, 12, 13}, NOW) == {11: ORPHAN, 12: ORPHAN, 13: ORPHAN}


def test_a_process_seen_as_a_child_before_is_an_orphan_at_once():
    young = [sample(11, 1, pgid=10, age=1.0)]
    assert classify(young, {1, 11}, NOW) == {11: MAIN}  # within the grace: could be a --detach main starting
    assert classify(young, {1, 11}, NOW, was_child={(11, NOW - 1.0)}) == {11: ORPHAN}


def test_detached_workers_are_not_orphans():
    # celery worker --detach: double fork, so ppid 1 and a dead group leader; a prefork main has children
    detached = worker(20, [21, 22], ppid=1, pgid=19)
    assert classify(detached, {1, 20, 21, 22}, NOW) == {20: MAIN, 21: CHILD, 22: CHILD}
    # a solo/threads/gevent pool has no children at all
    solo = [sample(30, 1, pgid=29, pool="solo")]
    assert classify(solo, {1, 30}, NOW) == {30: MAIN}


def test_a_childless_main_whose_group_leader_lives_is_a_main():
    started_by_a_script = [sample(40, 39, pgid=39)]  # 39: the shell script, alive
    assert classify(started_by_a_script, {1, 39, 40}, NOW) == {40: MAIN}


def test_leftovers_of_a_restart_are_orphans_even_in_a_live_group():
    # supervisor restarted w1: old children (pgid of a still-running wrapper) beside the new main
    old = [sample(pid, 1, pgid=5, age=600) for pid in (11, 12)]
    new = worker(50, [51, 52], ppid=5, pgid=5, age=30)
    roles = classify(old + new, {1, 5, 11, 12, 50, 51, 52}, NOW)
    assert roles == {11: ORPHAN, 12: ORPHAN, 50: MAIN, 51: CHILD, 52: CHILD}
    # another node's main does not make them leftovers
    other = worker(60, [61], ppid=5, pgid=5, age=30, node="w2@h")
    assert classify(old + other, {1, 5, 11, 12, 60, 61}, NOW)[11] == MAIN


def test_process_titles_decide_the_role():
    procs = [sample(70, 1000, title=MAIN), sample(71, 70, title=CHILD), sample(72, 1, pgid=70, title=CHILD, age=1)]
    assert classify(procs, {1, 1000, 70, 71, 72}, NOW) == {70: MAIN, 71: CHILD, 72: ORPHAN}


def test_descendants_of_an_orphan_are_orphans():
    procs = [sample(11, 1, pgid=10, age=60), sample(80, 11, pgid=10, age=30)]
    assert classify(procs, {1, 11, 80}, NOW, was_child={(11, NOW - 60)}) == {11: ORPHAN, 80: ORPHAN}
    titled = [sample(11, 1, pgid=10, title=CHILD), sample(80, 11, pgid=10, age=30)]
    assert classify(titled, {1, 11, 80}, NOW) == {11: ORPHAN, 80: ORPHAN}


# --------------------------------------------------------------------- state

def test_scan_gauges_per_node_and_role():
    state = HostState()
    procs = worker(10, [11, 12]) + [sample(30, 1000, node="solo@h", pool="solo", rss=7)]
    procs[0].rss, procs[1].rss, procs[2].rss = 100, 40, 60
    scan = state.apply_scan(procs, {1, 1000, 10, 11, 12, 30}, NOW)
    assert scan.processes == {("w1@h", MAIN): 1, ("w1@h", CHILD): 2, ("solo@h", MAIN): 1, ("solo@h", CHILD): 0}
    assert scan.rss[("w1@h", MAIN)] == 100 and scan.rss[("w1@h", CHILD)] == 100
    assert scan.child_rss_min == {"w1@h": 40} and scan.child_rss_max == {"w1@h": 60}
    assert "solo@h" not in scan.child_rss_min
    assert (scan.orphans, scan.orphan_rss) == (0, 0)
    assert state.child_spawns == {"w1@h": 2, "solo@h": 0}


def test_child_spawns_count_each_child_once_by_pid_and_create_time():
    state = HostState()
    state.apply_scan(worker(10, [11, 12]), {1000, 10, 11, 12}, NOW)
    state.apply_scan(worker(10, [11, 12]), {1000, 10, 11, 12}, NOW + 5)
    assert state.child_spawns["w1@h"] == 2
    # child 12 recycled: a new child 13; pid 11 reused by a new process (other create time)
    recycled = [sample(10, 1000), sample(11, 10, pgid=10, age=1), sample(13, 10, pgid=10, age=2)]
    state.apply_scan(recycled, {1000, 10, 11, 13}, NOW + 10)
    assert state.child_spawns["w1@h"] == 4


def test_cpu_counter_keeps_what_exited_children_used():
    state = HostState()
    first = worker(10, [11, 12])
    first[0].cpu, first[1].cpu, first[2].cpu = 5.0, 2.0, 3.0
    state.apply_scan(first, {1000, 10, 11, 12}, NOW)
    assert state.cpu_seconds == {("w1@h", MAIN): 5.0, ("w1@h", CHILD): 5.0}
    second = worker(10, [11])  # 12 exited after 3.0 s of CPU
    second[0].cpu, second[1].cpu = 6.0, 2.5
    state.apply_scan(second, {1000, 10, 11}, NOW + 5)
    assert state.cpu_seconds == {("w1@h", MAIN): 6.0, ("w1@h", CHILD): 5.5}


def test_children_of_a_killed_main_become_orphans_with_their_memory():
    state = HostState()
    procs = worker(10, [11, 12, 13], age=3.0)
    for proc, rss in zip(procs, (100, 10, 20, 30)):
        proc.rss = rss
    state.apply_scan(procs, {1000, 10, 11, 12, 13}, NOW)
    # main SIGKILLed (still a zombie: its pid is not a live leader); children re-parented, 3 s old only
    left = [ProcessSample(p.pid, 1, 10, p.create_time, p.command, p.rss, p.cpu) for p in procs[1:]]
    scan = state.apply_scan(left, {1, 11, 12, 13}, NOW + 1)
    assert (scan.orphans, scan.orphan_rss, scan.orphan_pids) == (3, 60, (11, 12, 13))
    assert scan.processes == {}
    assert state.child_spawns == {"w1@h": 3}  # counters of the node stay until it is purged
    scan = state.apply_scan([], {1}, NOW + 2)  # orphans killed
    assert (scan.orphans, scan.orphan_rss) == (0, 0)


def test_counters_of_a_node_gone_for_purge_after_disappear():
    state = HostState(purge_after=60)
    state.apply_scan(worker(10, [11]), {1000, 10, 11}, NOW)
    state.apply_scan([], {1000}, NOW + 30)
    assert "w1@h" in state.child_spawns
    state.apply_scan([], {1000}, NOW + 61)
    assert state.child_spawns == {} and state.cpu_seconds == {}
