"""--shard-task-events: task events split over replicas on a shared RabbitMQ queue, none counted twice."""
import json
import subprocess
import sys
import uuid

import pytest

from tests.harness import ROOT, free_port, make_amqp_broker, rabbitmq_api, wait_for

pytestmark = pytest.mark.integration

TERMINAL = ("celery_task_succeeded_total", "celery_task_failed_total")


def storm(url, *args):
    out = subprocess.run([sys.executable, "-m", "benchmarks.storm", "--broker-url", url, "--heartbeat", "0", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def amqp_broker():
    broker = make_amqp_broker()
    yield broker
    broker.close()


def test_two_sharded_replicas_count_every_task_exactly_once(amqp_broker, make_exporter):
    shared = f"celeryev.shared.{uuid.uuid4().hex[:8]}"
    replicas = [make_exporter(amqp_broker.url, "--shard-task-events", shared) for _ in range(2)]
    wait_for(lambda: any(q["name"] == shared and q.get("consumers") == 2 for q in
                         rabbitmq_api("GET", f"/api/queues/{amqp_broker.vhost}?columns=name,consumers")),
             20, message="both replicas consume the shared queue")

    single = storm(amqp_broker.url, "--tasks", "300", "--workers", "3", "--mode", "single", "--worker-prefix", "s")
    multi = storm(amqp_broker.url, "--tasks", "300", "--workers", "3", "--mode", "multi", "--worker-prefix", "m",
                  "--seed", "2")
    terminal = single["terminal"] + multi["terminal"]
    received = terminal + single["outcomes"]["retried"] + multi["outcomes"]["retried"]

    def counted():
        scrapes = [r.scrape() for r in replicas]
        total = sum(m.sum(name) for m in scrapes for name in TERMINAL)
        return total >= terminal and scrapes
    scrapes = wait_for(counted, 30, message="every task counted by one replica or the other")

    per_replica = [sum(m.sum(name) for name in TERMINAL) for m in scrapes]
    assert sum(per_replica) == terminal, per_replica  # no double counting
    assert all(0 < n < terminal for n in per_replica), per_replica  # both took a share
    assert sum(m.sum("celery_task_received_total") for m in scrapes) == received
    assert sum(m.sum("celery_task_sent_total") for m in scrapes) == received
    for m in scrapes:  # worker events are not shared: every replica sees every worker
        up = {labels["hostname"] for labels, value in m.find("celery_worker_up") if value == 1}
        assert len([h for h in up if h.startswith(("s0@", "s1@", "s2@", "m0@", "m1@", "m2@"))]) == 6, up
        assert m.value("celery_exporter_events_malformed_total", reason="json") is None


def test_sharding_is_refused_on_redis():
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "celery_health_exporter", "--broker-url", "redis://127.0.0.1:6379/0",
                             "--listen-address", f"127.0.0.1:{port}", "--shard-task-events", "shared"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--shard-task-events" in result.stderr and len(result.stderr.strip().splitlines()) == 1
