"""`doctor` on real workers: each finding from its induced cause, its numbers and the exit code."""
import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tests.apps.testapp import client
from tests.harness import HOST, ROOT, make_redis_broker, wait_for

pytestmark = pytest.mark.integration
FAST = ("--inspect-interval", "1", "--worker-timeout", "3", "--stall-after", "3", "--lost-task-grace", "2",
        "--broker-poll-interval", "1", "--task-events-hint-after", "3")


def doctor(*args, timeout=90):
    return subprocess.Popen([sys.executable, "-m", "celery_health_exporter", "doctor", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def redis_broker():
    broker = make_redis_broker()
    yield broker
    broker.close()


def test_unreachable_broker_and_bad_input_exit_2_with_one_line():
    proc = doctor("--broker-url", "redis://user:hunter2@127.0.0.1:1/0", "--duration", "2s")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and "cannot reach the broker" in err and "hunter2" not in err + out
    proc = doctor("--broker-url", "redis://127.0.0.1:6379/0", "--duration", "soon")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--duration" in err and err.count("\n") == 1


def test_a_healthy_cluster_gives_exit_0_and_no_findings(redis_broker, make_worker):
    queue = f"q-{uuid.uuid4().hex[:6]}"
    worker = make_worker(redis_broker.url, "healthy", queues=queue)
    publisher = client(redis_broker.url)
    wait_for(lambda: publisher.control.ping(timeout=0.5), 30, message="worker answers ping")
    proc = doctor("--broker-url", redis_broker.url, "--duration", "6s", "--format", "json", *FAST)
    for _ in range(10):
        publisher.send_task("tests.add", (1, 2), queue=queue)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=60)
    report = json.loads(out)
    assert proc.returncode == 0, out
    assert report["findings"] == [] and report["problems"] == 0 and report["workers"] == 1
    assert worker.proc.poll() is None


def test_induced_failures_are_each_named_with_their_numbers(redis_broker, make_worker):
    publisher = client(redis_broker.url)
    hung = make_worker(redis_broker.url, "hung", queues="hung", concurrency=1)
    storm = make_worker(redis_broker.url, "storm", queues="storm", extra=("--max-tasks-per-child", "1"),
                        env={"TEST_WORKER_HOOK": "1"})
    quiet = make_worker(redis_broker.url, "quiet", queues="quiet", task_events=False)
    doomed = make_worker(redis_broker.url, "doomed", queues="doomed")
    wait_for(lambda: len(publisher.control.ping(timeout=0.5)) == 4, 40, message="4 workers answer ping")

    proc = doctor("--broker-url", redis_broker.url, "--duration", "16s", "--format", "json", *FAST)
    time.sleep(2)  # the doctor is subscribed
    publisher.send_task("tests.block", queue="hung")
    for _ in range(12):  # a storm is 10 or more replacements (thresholds.py, the rule's number)
        publisher.send_task("tests.add", (1, 1), queue="storm")
    for _ in range(3):
        publisher.send_task("tests.add", (1, 1), queue="nobody-consumes-this")
    publisher.send_task("tests.retry_unpicklable", queue="storm")
    past = datetime.now(timezone.utc) - timedelta(minutes=5)
    for _ in range(2):
        publisher.send_task("tests.add", (1, 1), queue="doomed", expires=past)
    publisher.send_task("tests.sleep", (60,), queue="doomed")
    time.sleep(3)  # the sleep has started
    doomed.kill()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, out + err
    report = json.loads(out)
    found = {}
    for finding in report["findings"]:
        found.setdefault(finding["kind"], []).append(finding)
    summary = lambda kind: " / ".join(f["summary"] for f in found.get(kind, []))  # noqa: E731

    assert "Queue nobody-consumes-this holds 3 ready message(s)" in summary("queue_without_consumer")
    assert f"hung@{HOST} holds 1 active task(s)" in summary("worker_stalled")
    assert f"storm@{HOST} replaces a pool child every 1.0 tasks" in summary("recycle_storm")
    assert "max_tasks_per_child is 1" in summary("recycle_storm")
    assert f"quiet@{HOST} sends heartbeats but no task events" in summary("no_task_events")
    assert "tests.retry_unpicklable raised UnpicklableError 1 time(s)" in summary("unpicklable_exception")
    assert f"doomed@{HOST} stopped 1 time(s) without saying goodbye" in summary("unclean_shutdown")
    assert summary("tasks_lost").startswith("1 tests.sleep task(s) from queue doomed were lost")
    assert summary("tasks_expired").startswith("2 task(s) of queue doomed expired")
    for finding in report["findings"]:
        assert finding["why"] and finding["fix"] and finding["metric"].startswith("celery_")
    severities = [f["severity"] for f in report["findings"]]
    assert severities == sorted(severities, key=["critical", "warning", "info"].index)
    assert hung.proc.poll() is None and storm.proc.poll() is None and quiet.proc.poll() is None
