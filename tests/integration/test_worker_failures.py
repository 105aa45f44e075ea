"""Each failure detector proven by inducing the real failure on real prefork workers."""
import collections
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import redis

from tests.apps.testapp import client
from tests.celery_versions import each_worker_celery, is_oldest
from tests.harness import HOST, EventRecorder, make_redis_broker, wait_for

pytestmark = pytest.mark.integration
FAST = ("--inspect-interval", "1", "--worker-timeout", "3", "--stall-after", "4", "--lost-task-grace", "2")
PID_LOG = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_broker():
    broker = make_redis_broker()
    yield broker
    broker.close()


def metric(exporter, metric_name, /, **labels):
    return exporter.scrape().value(metric_name, **labels)


@each_worker_celery
def test_restart_loop_counts_restarts_and_unclean_shutdowns(redis_broker, make_exporter, make_worker, worker_celery):
    exporter = make_exporter(redis_broker.url, *FAST)
    host = f"loop@{HOST}"
    queue = f"q-{uuid.uuid4().hex[:6]}"

    def up_is(value):
        wait_for(lambda: metric(exporter, "celery_worker_up", hostname=host) == value, 30,
                 message=f"worker_up == {value}")

    for round_, stop in enumerate(("term", "kill", "term", "kill")):
        worker = make_worker(redis_broker.url, "loop", celery=worker_celery, queues=queue)
        up_is(1)
        m = exporter.scrape()
        assert m.value("celery_worker_restarts_total", hostname=host) == round_
        assert m.value("celery_worker_start_time_seconds", hostname=host) > time.time() - 60
        if stop == "term":
            assert worker.terminate() == 0
        else:
            worker.kill()
        up_is(0)
    m = exporter.scrape()
    assert m.value("celery_worker_restarts_total", hostname=host) == 3
    assert m.value("celery_worker_unclean_shutdowns_total", hostname=host) == 2


@each_worker_celery
def test_recycle_storm_with_and_without_the_hook(redis_broker, make_exporter, make_worker, worker_celery):
    exporter = make_exporter(redis_broker.url, *FAST)
    pid_log = redis.Redis.from_url(PID_LOG)
    runs = {  # name: (worker flags, hook, tasks)
        "tasks2": (("--max-tasks-per-child", "2"), True, 10),
        "mem": (("--max-memory-per-child", "1000"), True, 6),  # 1 MB: below any child's baseline
        "nohook": (("--max-tasks-per-child", "1"), False, 6),
    }
    workers = {}
    for name, (flags, hook, _) in runs.items():
        workers[name] = make_worker(redis_broker.url, name, celery=worker_celery, queues=name, extra=flags,
                                    env={"TEST_WORKER_HOOK": "1" if hook else "0", "TEST_PID_LOG": PID_LOG})
    for worker in workers.values():
        wait_for(lambda: metric(exporter, "celery_worker_up", hostname=worker.hostname) == 1, 30,
                 message="worker up")
    # the poller has seen the first children before any is replaced
    wait_for(lambda: all(metric(exporter, "celery_worker_pool_processes", hostname=w.hostname) == 2
                         for w in workers.values()), 15, message="pool processes from inspect stats")
    publisher = client(redis_broker.url)
    keys = {}
    for name, (_, _, tasks) in runs.items():
        keys[name] = f"pids-{uuid.uuid4().hex}"
        for _ in range(tasks):
            publisher.send_task("tests.record_pid", (keys[name],), queue=name)
            if name == "nohook":
                time.sleep(1.2)  # one replacement per poll at most: what the pid diff can see

    def ran(name):
        pids = [int(p) for p in pid_log.lrange(keys[name], 0, -1)]
        return collections.Counter(pids) if len(pids) == runs[name][2] else None

    tasks2 = wait_for(lambda: ran("tasks2"), 30, message="tasks2 tasks ran")
    replaced = sum(1 for n in tasks2.values() if n == 2)  # a child exits right after its 2nd task
    host = workers["tasks2"].hostname
    wait_for(lambda: metric(exporter, "celery_worker_child_replacements_total", hostname=host,
                            reason="tasks") == replaced, 20, message=f"{replaced} replacements for max-tasks")
    m = exporter.scrape()
    assert m.value("celery_worker_child_tasks_count", hostname=host) == replaced
    assert m.value("celery_worker_child_tasks_sum", hostname=host) == 2 * replaced
    assert m.value("celery_worker_child_tasks_bucket", hostname=host, le="2.0") == replaced
    assert m.value("celery_worker_child_tasks_bucket", hostname=host, le="1.0") == 0
    assert m.value("celery_worker_max_tasks_per_child", hostname=host) == 2  # from the CLI, seen by the hook
    assert m.value("celery_worker_child_replacements_total", hostname=host, reason="memory") == 0

    mem = wait_for(lambda: ran("mem"), 30, message="mem tasks ran")
    host = workers["mem"].hostname
    assert set(mem.values()) == {1}  # every child recycled after one task
    wait_for(lambda: metric(exporter, "celery_worker_child_replacements_total", hostname=host,
                            reason="memory") == len(mem), 20, message="memory replacements")
    m = exporter.scrape()
    assert m.value("celery_worker_max_memory_per_child_bytes", hostname=host) == 1000 * 1024
    assert m.value("celery_worker_child_peak_rss_bytes", hostname=host) > 1000 * 1024
    assert m.value("celery_worker_child_tasks_bucket", hostname=host, le="1.0") == len(mem)

    nohook = wait_for(lambda: ran("nohook"), 30, message="nohook tasks ran")
    host = workers["nohook"].hostname
    # Without the hook, replacements are seen as changes of the pool's pids between two
    # inspect polls, and a poll of five broadcasts takes about five --inspect-timeout.
    wait_for(lambda: metric(exporter, "celery_worker_child_replacements_total", hostname=host,
                            reason="unknown"), 30, message="replacements seen by the pid diff")
    m = exporter.scrape()
    seen = m.value("celery_worker_child_replacements_total", hostname=host, reason="unknown")
    assert seen is not None and 1 <= seen <= len(nohook), seen  # a lower bound of what happened
    assert not m.find("celery_worker_child_tasks_count", hostname=host)  # needs the hook: absent
    assert m.value("celery_worker_max_tasks_per_child", hostname=host) == 1  # inspect stats
    assert m.value("celery_worker_max_memory_per_child_bytes", hostname=host) == 0


@each_worker_celery
def test_hung_task_makes_the_worker_stalled_until_it_is_restarted(redis_broker, make_exporter, make_worker, worker_celery):
    exporter = make_exporter(redis_broker.url, *FAST)
    queue = f"q-{uuid.uuid4().hex[:6]}"
    worker = make_worker(redis_broker.url, "hung", celery=worker_celery, queues=queue, concurrency=1)
    host = worker.hostname
    wait_for(lambda: metric(exporter, "celery_worker_up", hostname=host) == 1, 30, message="worker up")
    assert metric(exporter, "celery_worker_stalled", hostname=host) == 0
    publisher = client(redis_broker.url)
    publisher.send_task("tests.block", queue=queue)
    for _ in range(3):  # stuck behind the hung task: one is prefetched (concurrency 1 x multiplier 1)
        publisher.send_task("tests.add", (1, 1), queue=queue)
    wait_for(lambda: metric(exporter, "celery_worker_oldest_active_task_age_seconds", hostname=host) > 1, 15,
             message="oldest active task ageing")
    age = metric(exporter, "celery_task_active_oldest_age_seconds", name="tests.block")
    assert age > 1
    wait_for(lambda: metric(exporter, "celery_worker_stalled", hostname=host) == 1, 15, message="stalled")
    assert metric(exporter, "celery_worker_prefetched_tasks", hostname=host) == 1
    assert metric(exporter, "celery_task_active_oldest_age_seconds", name="tests.block") > age

    worker.kill()
    worker = make_worker(redis_broker.url, "hung", celery=worker_celery, queues=queue)
    wait_for(lambda: metric(exporter, "celery_worker_restarts_total", hostname=host) == 1, 30,
             message="restart seen")
    m = exporter.scrape()
    assert m.value("celery_worker_stalled", hostname=host) == 0
    assert m.value("celery_worker_oldest_active_task_age_seconds", hostname=host) == 0
    assert not m.find("celery_task_active_oldest_age_seconds", name="tests.block")


@each_worker_celery
def test_expired_tasks_grow_the_revoked_set_with_and_without_the_hook(redis_broker, make_exporter, make_worker,
                                                                      worker_celery):
    exporter = make_exporter(redis_broker.url, *FAST, "--revoked-interval", "1")
    hooked = make_worker(redis_broker.url, "exphook", celery=worker_celery, queues="exphook",
                         env={"TEST_WORKER_HOOK": "1"})
    plain = make_worker(redis_broker.url, "expplain", celery=worker_celery, queues="expplain",
                        env={"TEST_WORKER_HOOK": "0"})
    for worker in (hooked, plain):
        wait_for(lambda: metric(exporter, "celery_worker_up", hostname=worker.hostname) == 1, 30,
                 message="worker up")
    # A worker sends only task-revoked(expired) for an expired task (5.2.7 and 5.7 alike): no name, no
    # queue. Both come from the publisher's task-sent, which the worker's event often beats here.
    publisher = client(redis_broker.url)
    past = datetime.now(timezone.utc) - timedelta(minutes=5)
    for queue, count in (("exphook", 5), ("expplain", 3)):
        for _ in range(count):
            publisher.send_task("tests.add", (1, 1), queue=queue, expires=past)
    expired = {}

    def counted():
        expired.clear()
        expired.update({(labels["name"], labels["queue_name"]): value
                        for labels, value in exporter.scrape().find("celery_task_expired_total")})
        return expired == {("tests.add", "exphook"): 5, ("tests.add", "expplain"): 3}
    try:
        wait_for(counted, 20, message="expired counted")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; celery_task_expired_total: {expired}") from None
    # (until the poller has seen the hook in the worker's conf, `inspect revoked` may give the size
    # first: the limit tells that the hook's figures have arrived)
    wait_for(lambda: metric(exporter, "celery_worker_revoked_tasks", hostname=hooked.hostname) == 5
             and metric(exporter, "celery_worker_revoked_tasks_limit", hostname=hooked.hostname) == 50000, 15,
             message="revoked set size and limit from the hook")
    wait_for(lambda: metric(exporter, "celery_worker_revoked_tasks", hostname=plain.hostname) == 3, 15,
             message="revoked set size from inspect revoked")
    assert metric(exporter, "celery_worker_revoked_tasks_limit", hostname=plain.hostname) is None  # unknown


@each_worker_celery
def test_worker_killed_while_running_a_task_loses_it(broker, make_exporter, make_worker, worker_celery):
    exporter = make_exporter(broker.url, *FAST)
    queue = f"q-{uuid.uuid4().hex[:6]}"
    worker = make_worker(broker.url, "doomed", celery=worker_celery, queues=queue)
    wait_for(lambda: metric(exporter, "celery_worker_up", hostname=worker.hostname) == 1, 30, message="worker up")
    client(broker.url).send_task("tests.sleep", (60,), queue=queue)
    wait_for(lambda: metric(exporter, "celery_task_started_total", name="tests.sleep", hostname=worker.hostname,
                            queue_name=queue) == 1, 15, message="task started")
    worker.kill()
    wait_for(lambda: metric(exporter, "celery_task_lost_total", name="tests.sleep", queue_name=queue,
                            reason="worker_lost") == 1, 20, message="lost task counted")
    m = exporter.scrape()
    assert m.value("celery_worker_unclean_shutdowns_total", hostname=worker.hostname) == 1
    assert m.value("celery_exporter_tracked_tasks") == 0


@each_worker_celery
def test_unpicklable_exception_in_retry_is_counted(redis_broker, make_exporter, make_worker, worker_celery):
    exporter = make_exporter(redis_broker.url, *FAST)
    queue = f"q-{uuid.uuid4().hex[:6]}"
    worker = make_worker(redis_broker.url, "pickle", celery=worker_celery, queues=queue)
    wait_for(lambda: metric(exporter, "celery_worker_up", hostname=worker.hostname) == 1, 30, message="worker up")
    if not is_oldest(worker_celery):
        client(redis_broker.url).send_task("tests.retry_unpicklable", queue=queue)
        wait_for(lambda: metric(exporter, "celery_task_unpicklable_exceptions_total", name="tests.retry_unpicklable",
                                exception="UnpicklableError") == 1, 20, message="unpicklable counted")
        assert metric(exporter, "celery_task_retried_total", name="tests.retry_unpicklable",
                      hostname=worker.hostname, queue_name=queue) == 1
        return

    # Celery 5.2.7: the main process cannot unpickle the pool child's retry result. It logs
    # "Unrecoverable error: TypeError(...)", goes offline, and exits 0 about 30 s later, once billiard
    # has given up on the job; the retry message it had received goes back to the queue. No
    # task-retried event is ever sent. The rest is a race between the pool's pipes (in 12 runs: 7
    # times the task failed with WorkerLostError('Worker exited prematurely: exitcode 0 ...') and
    # the retry was never announced; 4 times a pool child ran the retry first, so task-started and
    # task-succeeded came too, then the WorkerLostError; once no outcome came at all). So the
    # worker's own events, recorded beside the exporter, are the ground truth of each run.
    recorder = EventRecorder(redis_broker.url).start()
    try:
        task_id = client(redis_broker.url).send_task("tests.retry_unpicklable", queue=queue).id
        wait_for(lambda: metric(exporter, "celery_worker_up", hostname=worker.hostname) == 0, 15,
                 message="worker down (worker-offline) after the unrecoverable error")
        assert "Unrecoverable error: TypeError(" in worker.log()
        assert worker.proc.wait(60) == 0, worker.log()[-3000:]
        wait_for(lambda: recorder.of("worker-offline", hostname=worker.hostname), 10, message="worker-offline")
    finally:
        recorder.stop()
    sent = {kind: recorder.of(f"task-{kind}", uuid=task_id) for kind in ("received", "started", "succeeded",
                                                                          "failed", "retried")}
    assert len(sent["received"]) == 2 and not sent["retried"], sent  # the first run and its retry message
    failures = collections.Counter(e["exception"].split("(")[0] for e in sent["failed"])
    assert set(failures) <= {"WorkerLostError"}, sent["failed"]
    if failures:
        assert "WorkerLostError('Worker exited prematurely: exitcode 0" in worker.log()
    labels = dict(name="tests.retry_unpicklable", hostname=worker.hostname, queue_name=queue)

    def counted():
        m = exporter.scrape()
        return (m.value("celery_task_received_total", **labels) == 2
                and m.value("celery_task_started_total", **labels) == len(sent["started"])
                and m.value("celery_task_succeeded_total", **labels) == len(sent["succeeded"])
                and m.value("celery_task_retried_total", **labels) == 0
                and {l["exception"]: v for l, v in m.find("celery_task_failed_total", **labels) if v} == failures)
    wait_for(counted, 10, message=f"the exporter counts what the worker sent: {sent}")
    assert metric(exporter, "celery_worker_unclean_shutdowns_total", hostname=worker.hostname) == 0  # said goodbye
