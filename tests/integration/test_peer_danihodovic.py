"""Side by side with the released prometheus-exporter-celery (danihodovic/celery-exporter).

Both exporters run on the same real broker, started with the same command line (the peer's
flags: this exporter reads them, tests/unit/test_peer_flags.py), while a real prefork worker
runs the same workload: successes, a failure with a custom exception, a retry, a revoke, an
expired task, and a task for a queue nobody consumes. Once it has settled, every family the
peer serves must be served here with the same label keys, and the counters must agree.

The differences that are deliberate (docs/dashboards-and-alerts.md, "Migrating from
danihodovic/celery-exporter") are applied here, each in one place:
- hostname: ours is the worker's node name (celery@host), the peer's the host part;
- celery_task_runtime: ours also observes failed tasks (the peer only successes), so its
  counts are compared for tasks that never fail;
- a worker's event of a task can come before the publisher's task-sent (they travel over two
  connections; common on RabbitMQ). The peer then labels it queue_name="celery" (its default),
  and an expired task's task-revoked (which names no task) name="None"; this exporter waits
  --task-sent-grace for the task-sent and counts them under the task's name and queue. The
  peer's counts are moved there before comparing (``peer_fixed``);
- the peer's zero-valued series (it creates every counter of a label set at 0, and in 0.11.2
  celery_task_sent_total with the worker's hostname too) are not compared: only values > 0.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import uuid

import pytest

from tests.apps.testapp import client
from tests.harness import ROOT, Metrics, free_port, http_get, wait_for
from tests.peers import danihodovic_command

pytestmark = pytest.mark.integration

# The peer's families (src/exporter.py of 0.11.2)
COUNTERS = ("celery_task_sent_total", "celery_task_received_total", "celery_task_started_total",
            "celery_task_succeeded_total", "celery_task_failed_total", "celery_task_rejected_total",
            "celery_task_revoked_total", "celery_task_retried_total")
GAUGES = ("celery_worker_up", "celery_worker_tasks_active", "celery_queue_length", "celery_active_worker_count",
          "celery_active_process_count", "celery_active_consumer_count")
HISTOGRAMS = ("celery_task_runtime",)
CONCURRENCY = 2


class Exporter:
    """An exporter process serving on 127.0.0.1:``port``, started with ``args``."""

    def __init__(self, command, args, log_path, cwd):
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen([*command, *args], stdout=self.log_file, stderr=subprocess.STDOUT, cwd=cwd,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def scrape(self, port) -> Metrics:
        assert self.proc.poll() is None, self.log()
        status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert status == 200, body
        return Metrics(body)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log_file.close()


def host_part(hostname: str) -> str:
    return hostname.split("@", 1)[-1]


def series(m: Metrics, name: str, *, nonzero: bool) -> dict:
    """{labels: value} of one family, hostname as the peer writes it."""
    out = {}
    for sample, labels, value in m.samples:
        if sample != name or (nonzero and value == 0):
            continue
        if "hostname" in labels:
            labels = {**labels, "hostname": host_part(labels["hostname"])}
        key = tuple(sorted(labels.items()))
        out[key] = out.get(key, 0) + value
    return out


def peer_fixed(peer: dict, queue: str) -> dict:
    """The peer's counts of the tasks whose task-sent it had not seen yet, put where they belong:
    queue_name="celery" (its default) to ``queue`` (nothing of the workload goes to a queue named
    celery), and name="None" (only the expired task's task-revoked names no task) to tests.add."""
    fixed = {}
    for key, value in peer.items():
        labels = dict(key)
        if labels.get("queue_name") == "celery":
            labels["queue_name"] = queue
        if labels.get("name") == "None":
            labels["name"] = "tests.add"
        key = tuple(sorted(labels.items()))
        fixed[key] = fixed.get(key, 0) + value
    return fixed


def label_keys(m: Metrics, name: str) -> set:
    return {tuple(sorted(set(labels) - {"le"})) for sample, labels, _ in m.samples
            if sample in (name, name + "_bucket", name + "_count", name + "_sum")}


def test_side_by_side_with_the_released_peer(broker, make_worker, tmp_path):
    queue, nobody = f"q-{uuid.uuid4().hex[:6]}", f"nobody-{uuid.uuid4().hex[:6]}"
    peer_port, our_port = free_port(), free_port()
    # A manifest written for the peer; the same flags start ours.
    common = ["--broker-url", broker.url, "--host", "127.0.0.1", "--queues", f"{queue},{nobody}"]
    peer = Exporter(danihodovic_command(), [*common, "--port", str(peer_port)], tmp_path / "peer.log",
                    cwd=tempfile.gettempdir())
    ours = Exporter((sys.executable, "-m", "celery_health_exporter"),
                    [*common, "--port", str(our_port), "--inspect-interval", "1", "--broker-poll-interval", "1",
                     "--hostname-in-task-histograms"], tmp_path / "ours.log", cwd=ROOT)
    try:
        # /health: the probe path of the peer's Helm chart, served here too
        for exporter, url in ((ours, f"http://127.0.0.1:{our_port}/health"),
                              (peer, f"http://127.0.0.1:{peer_port}/health")):
            try:
                wait_for(lambda: exporter.proc.poll() is None and http_get(url)[0] == 200, 30, message=url)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{exporter.log()[-3000:]}") from None
        worker = make_worker(broker.url, "side", queues=queue, concurrency=CONCURRENCY)
        host = host_part(worker.hostname)
        wait_for(lambda: peer.scrape(peer_port).value("celery_worker_up", hostname=host) == 1
                 and ours.scrape(our_port).value("celery_worker_up", hostname=worker.hostname) == 1, 40,
                 message="worker up in both")

        publisher = client(broker.url)
        # First, while the worker is idle: Celery gives an expired task a message TTL of 0, and
        # RabbitMQ drops it unless a consumer can take it at once (then the worker discards it).
        expired = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=30)
        publisher.send_task("tests.add", (0, 0), queue=queue, expires=expired)
        for i in range(3):
            publisher.send_task("tests.add", (i, 1), queue=queue)
        publisher.send_task("tests.fail", ("boom",), queue=queue)
        publisher.send_task("tests.retry_once", queue=queue)
        publisher.send_task("tests.add", (9, 9), queue=nobody)
        sleeper = publisher.send_task("tests.sleep", (60,), queue=queue)
        wait_for(lambda: ours.scrape(our_port).value("celery_task_started_total", name="tests.sleep",
                                                     hostname=worker.hostname, queue_name=queue) == 1,
                 30, message="sleep task started")
        publisher.control.revoke(sleeper.id, terminate=True)

        def settled(exporter: Exporter, port: int, is_peer: bool):
            """The scrape once every outcome is counted; else what is still missing (for the timeout's message)."""
            m = exporter.scrape(port)

            def total(family, **want):
                found = series(m, family, nonzero=True)
                found = peer_fixed(found, queue) if is_peer else found
                return sum(v for key, v in found.items() if all(dict(key).get(k) == w for k, w in want.items()))
            flow = dict(hostname=host, queue_name=queue)
            hostname = host if is_peer else worker.hostname
            missing = [what for what, done in (
                ("3 successes", total("celery_task_succeeded_total", name="tests.add", **flow) == 3),
                ("the retry", total("celery_task_succeeded_total", name="tests.retry_once", **flow) == 1),
                ("the revoke", total("celery_task_revoked_total", name="tests.sleep", **flow) == 1),
                ("the expired task", total("celery_task_revoked_total", name="tests.add", **flow) == 1),
                ("the failure", total("celery_task_failed_total", name="tests.fail", **flow) == 1),
                ("the task nobody takes", total("celery_task_sent_total", name="tests.add", queue_name=nobody) == 1),
                ("no task active", m.value("celery_worker_tasks_active", hostname=hostname) == 0),
                ("its queue length", m.value("celery_queue_length", queue_name=nobody) == 1),
                ("the worker of the queue", m.value("celery_active_worker_count", queue_name=queue) == 1),
                # both ask `inspect stats` (the peer at every scrape): a reply can miss its timeout
                ("its pool processes", m.value("celery_active_process_count", queue_name=queue) == CONCURRENCY),
            ) if not done]
            return (m, missing)

        def wait_settled(exporter, port, is_peer, who):
            last = []

            def check():
                m, missing = settled(exporter, port, is_peer)
                last[:] = missing
                return None if missing else m
            try:
                return wait_for(check, 40, message=f"the workload settled in {who}")
            except AssertionError:
                raise AssertionError(f"{who}: still missing {last}:\n{exporter.log()[-3000:]}") from None

        theirs = wait_settled(peer, peer_port, True, "the peer")
        mine = wait_settled(ours, our_port, False, "this exporter")

        gauges = GAUGES if broker.kind == "amqp" else tuple(  # Redis counts no consumers: the peer leaves it out
            family for family in GAUGES if family != "celery_active_consumer_count")
        for family in COUNTERS + gauges + HISTOGRAMS:
            assert label_keys(theirs, family), f"the peer serves no {family}: the workload missed it"
            assert label_keys(mine, family) == label_keys(theirs, family), family
        for family in COUNTERS:
            expected = peer_fixed(series(theirs, family, nonzero=True), queue)
            assert series(mine, family, nonzero=True) == expected, family
        for family in gauges:
            assert series(mine, family, nonzero=False) == series(theirs, family, nonzero=False), family
        # celery_task_runtime: a task that never failed is observed by both alike
        def never_failed(found: dict) -> dict:
            return {key: value for key, value in found.items() if dict(key)["name"] != "tests.fail"}
        assert never_failed(series(mine, "celery_task_runtime_count", nonzero=True)) == never_failed(
            peer_fixed(series(theirs, "celery_task_runtime_count", nonzero=True), queue))
        assert mine.value("celery_task_failed_total", name="tests.fail", exception="CustomError",
                          hostname=worker.hostname, queue_name=queue) == 1
    finally:
        assert ours.stop() == 0, ours.log()
        peer.stop()


def test_queue_wait_counts_from_publication(redis_broker, make_exporter, make_worker):
    """The issue's case: a task that waits in the broker's queue (here, for its worker to start)
    has waited from its task-sent, not from its task-received; its time in the worker's prefetch
    buffer is the other histogram."""
    queue = f"wait-{uuid.uuid4().hex[:6]}"
    exporter = make_exporter(redis_broker.url, "--inspect-interval", "0")
    client(redis_broker.url).send_task("tests.add", (1, 1), queue=queue)
    published_by = datetime.datetime.now().timestamp()  # the task-sent's timestamp is before this
    wait_for(lambda: exporter.scrape().value("celery_task_sent_total", name="tests.add", queue_name=queue) == 1,
             message="task-sent seen")
    worker = make_worker(redis_broker.url, "late", queues=queue)
    labels = dict(name="tests.add", queue_name=queue)
    m = wait_for(lambda: (lambda m: m.value("celery_task_queue_wait_time_count", **labels) == 1 and m)(
        exporter.scrape()), 40, message="the task started")
    worker_started = m.value("celery_worker_start_time_seconds", hostname=worker.hostname)
    waited = m.value("celery_task_queue_wait_time_sum", **labels)
    # It could not start before its worker did: the wait covers the worker's whole start-up.
    assert waited >= worker_started - published_by > 0
    prefetch = m.value("celery_task_prefetch_wait_time_sum", **labels)
    assert m.value("celery_task_prefetch_wait_time_count", **labels) == 1
    assert 0 <= prefetch < waited
