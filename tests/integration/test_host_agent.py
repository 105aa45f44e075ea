"""The host agent against real prefork workers on this machine, with psutil as ground truth.

Each test's exporter only looks at its own worker (``--host-worker-pattern``
matches the test's unique node name): other tests' workers on the same host
must not change the counts.

Orphans: on Celery 5.3+ pool children get a parent-death signal (SIGKILL when
the main exits), so SIGKILLing a 5.7 main takes its children along (checked
below). ``tests/apps/hostapp.py`` clears that signal in each child
(``HOSTAPP_KEEP_CHILDREN=1``): the children then outlive their main exactly as
on Celery <= 5.2, and the test gets real orphans.
"""
import os
import signal
import time
import uuid

import psutil
import pytest
from celery import Celery

from tests.harness import make_broker, wait_for

pytestmark = pytest.mark.integration
SCAN = "0.3"


@pytest.fixture
def redis_broker():
    broker = make_broker("redis")
    yield broker
    broker.close()


def host_exporter(make_exporter, broker, marker, *, wait=True):
    return make_exporter(broker.url, "--no-events", "--no-broker-poll", "--inspect-interval", "0",
                         "--host-metrics", "--host-scan-interval", SCAN, "--host-worker-pattern", rf"-n {marker}@",
                         wait=wait)


def living(pids):
    """psutil's view: which of these processes exist and are not zombies."""
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_celery_5_7_children_die_with_their_main(redis_broker, make_worker):
    """Why the orphan test below needs the hostapp: without it there are no orphans to find."""
    worker = make_worker(redis_broker.url, f"pd{uuid.uuid4().hex[:8]}", concurrency=2, app="tests.apps.hostapp")
    children = wait_for(lambda: [c.pid for c in psutil.Process(worker.proc.pid).children()]
                        if len(psutil.Process(worker.proc.pid).children()) == 2 else None, 30, message="2 children")
    os.kill(worker.proc.pid, signal.SIGKILL)
    wait_for(lambda: not living(children), 5, message="children killed by the parent-death signal")


def test_orphans_of_a_sigkilled_main_are_counted_then_gone(redis_broker, make_exporter, make_worker):
    marker = f"ha{uuid.uuid4().hex[:8]}"
    exporter = host_exporter(make_exporter, redis_broker, marker)
    worker = make_worker(redis_broker.url, marker, concurrency=3, app="tests.apps.hostapp",
                         env={"HOSTAPP_KEEP_CHILDREN": "1"})
    node = worker.hostname

    def roles():
        m = exporter.scrape()
        return (m.value("celery_host_worker_processes", hostname=node, role="main"),
                m.value("celery_host_worker_processes", hostname=node, role="child"),
                m.value("celery_host_orphaned_processes"))

    wait_for(lambda: roles() == (1, 3, 0), 30, message="1 main, 3 children, no orphan")
    children = [c.pid for c in psutil.Process(worker.proc.pid).children()]
    assert len(children) == 3

    # Memory per child: one child grows by 64 MiB; min/max follow psutil's numbers.
    Celery(broker=redis_broker.url, set_as_current=False).send_task("hostapp.allocate", (64,))

    def rss_spread():
        m = exporter.scrape()
        low = m.value("celery_host_child_rss_min_bytes", hostname=node)
        high = m.value("celery_host_child_rss_max_bytes", hostname=node)
        return (low, high) if high - low > 60 * 2**20 else None

    low, high = wait_for(rss_spread, 20, message="one child 64 MiB bigger")
    truth = sorted(p.memory_info().rss for p in living(children))
    assert abs(high - truth[-1]) < 0.05 * truth[-1] and abs(low - truth[0]) < 0.1 * truth[0]

    os.kill(worker.proc.pid, signal.SIGKILL)  # the main only, not its process group
    time.sleep(0.5)
    orphans = living(children)
    assert len(orphans) == 3 and all(p.ppid() != worker.proc.pid for p in orphans)  # re-parented
    wait_for(lambda: exporter.scrape().value("celery_host_orphaned_processes") == len(orphans), 10,
             message=f"{len(orphans)} orphans")
    m = exporter.scrape()
    truth_rss = sum(p.memory_info().rss for p in orphans)
    assert abs(m.value("celery_host_orphaned_rss_bytes") - truth_rss) < 0.05 * truth_rss
    assert m.value("celery_host_worker_processes", hostname=node, role="main") is None
    assert m.value("celery_host_child_spawns_total", hostname=node) == 3  # counters stay until purged

    # An agent started now never saw them as children: it finds them from their
    # process group (leader dead) once they are older than the startup grace.
    late = host_exporter(make_exporter, redis_broker, marker)
    wait_for(lambda: late.scrape().value("celery_host_orphaned_processes") == len(orphans), 20,
             message="orphans found without history")
    assert late.scrape().find("celery_host_worker_processes") == []

    for process in orphans:
        process.kill()
    for agent in (exporter, late):
        wait_for(lambda: agent.scrape().value("celery_host_orphaned_processes") == 0, 10, message="no orphan left")
    assert exporter.scrape().value("celery_host_orphaned_rss_bytes") == 0


def test_a_recycle_storm_shows_in_child_spawns(redis_broker, make_exporter, make_worker):
    marker = f"hs{uuid.uuid4().hex[:8]}"
    exporter = host_exporter(make_exporter, redis_broker, marker)
    worker = make_worker(redis_broker.url, marker, concurrency=2, app="tests.apps.hostapp",
                         extra=("--max-tasks-per-child=1",))
    node = worker.hostname
    spawns = lambda: exporter.scrape().value("celery_host_child_spawns_total", hostname=node)  # noqa: E731
    wait_for(lambda: exporter.scrape().value("celery_host_worker_processes", hostname=node, role="child") == 2,
             30, message="2 children")
    baseline = spawns()
    assert baseline == 2

    tasks = 6
    client = Celery(broker=redis_broker.url, set_as_current=False)
    for _ in range(tasks):
        client.send_task("hostapp.sleep", (0.8,))
    wait_for(lambda: spawns() == baseline + tasks, 30, message=f"{tasks} more spawns")
    wait_for(lambda: worker.log().count("succeeded in") == tasks, 10, message="tasks done")
    time.sleep(1.0)  # and no more than that
    m = exporter.scrape()
    assert m.value("celery_host_child_spawns_total", hostname=node) == baseline + tasks
    assert m.value("celery_host_worker_processes", hostname=node, role="child") == 2
    assert m.value("celery_host_orphaned_processes") == 0
