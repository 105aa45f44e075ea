"""Task flow and worker metrics from real workers on both real brokers."""
import time
import uuid

import pytest
from kombu import Connection, Exchange, Producer

from tests.apps.testapp import client
from tests.celery_versions import each_worker_celery
from tests.harness import wait_for

pytestmark = pytest.mark.integration


def worker_up(exporter, hostname):
    return exporter.scrape().value("celery_worker_up", hostname=hostname) == 1


@each_worker_celery
def test_task_outcomes_are_counted_exactly_with_worker_and_queue_labels(broker, make_exporter, make_worker,
                                                                        worker_celery):
    queue = f"q-{uuid.uuid4().hex[:6]}"
    exporter = make_exporter(broker.url)
    worker = make_worker(broker.url, "flow", celery=worker_celery, queues=queue)
    wait_for(lambda: worker_up(exporter, worker.hostname), 30, message="worker up")

    publisher = client(broker.url)
    for i in range(3):
        publisher.send_task("tests.add", (i, 1), queue=queue)
    for _ in range(2):
        publisher.send_task("tests.fail", queue=queue)
    publisher.send_task("tests.retry_once", queue=queue)
    publisher.send_task("tests.reject", queue=queue)
    sleeper = publisher.send_task("tests.sleep", (60,), queue=queue)

    labels = dict(hostname=worker.hostname, queue_name=queue)
    wait_for(lambda: exporter.scrape().value("celery_task_started_total", name="tests.sleep", **labels) == 1,
             message="sleep task started")
    publisher.control.revoke(sleeper.id, terminate=True)

    def settled():
        m = exporter.scrape()
        return (m.value("celery_task_succeeded_total", name="tests.add", **labels) == 3
                and m.value("celery_task_succeeded_total", name="tests.retry_once", **labels) == 1
                and m.value("celery_task_revoked_total", name="tests.sleep", **labels) == 1
                and m.sum("celery_task_failed_total", name="tests.fail", **labels) == 2
                and m.value("celery_task_rejected_total", name="tests.reject", **labels) == 1) and m
    m = wait_for(settled, 30, message="all outcomes counted")

    assert m.value("celery_task_received_total", name="tests.add", **labels) == 3
    assert m.value("celery_task_started_total", name="tests.add", **labels) == 3
    assert m.value("celery_task_failed_total", name="tests.fail", exception="CustomError", **labels) == 2
    assert m.value("celery_task_succeeded_total", name="tests.fail", **labels) == 0
    assert m.value("celery_task_retried_total", name="tests.retry_once", **labels) == 1
    assert m.value("celery_task_received_total", name="tests.retry_once", **labels) == 2
    assert m.value("celery_task_sent_total", name="tests.add", queue_name=queue) == 3
    assert m.value("celery_task_sent_total", name="tests.retry_once", queue_name=queue) == 2  # the retry too
    # the histograms are per task name and queue by default (--hostname-in-task-histograms adds hostname)
    assert m.value("celery_task_runtime_count", name="tests.add", queue_name=queue) == 3
    assert m.value("celery_task_runtime_count", name="tests.fail", queue_name=queue) == 2  # failed tasks too
    assert m.value("celery_task_queue_wait_time_count", name="tests.add", queue_name=queue) == 3
    assert not m.find("celery_task_runtime_count", hostname=worker.hostname)
    # nothing is attributed to a made-up queue or task
    assert not m.find("celery_task_received_total", queue_name="unknown")
    assert not m.find("celery_task_received_total", name="unknown")
    assert not m.find("celery_task_received_total", queue_name="celery")

    assert m.value("celery_worker_info", hostname=worker.hostname, sw_ident="py-celery") == 1
    wait_for(lambda: (exporter.scrape().value("celery_worker_tasks_processed_total", hostname=worker.hostname)
                      or 0) >= 8, 10, message="heartbeat with processed count")
    assert m.value("celery_exporter_source_up", source="events") == 1
    assert m.value("celery_exporter_events_total", type="task-started") >= 9
    assert m.value("celery_exporter_tracked_tasks") == 0
    assert m.value("celery_exporter_event_lag_seconds_count") > 0


def test_worker_goes_down_on_sigterm_and_its_series_are_purged(broker, make_exporter, make_worker):
    exporter = make_exporter(broker.url, "--purge-offline-after", "3")
    worker = make_worker(broker.url, "gone", queues=f"q-{uuid.uuid4().hex[:6]}")
    wait_for(lambda: worker_up(exporter, worker.hostname), 30, message="worker up")
    m = exporter.scrape()
    assert m.value("celery_worker_heartbeat_age_seconds", hostname=worker.hostname) < 10
    assert worker.terminate() == 0
    wait_for(lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 0, 15,
             message="worker down after worker-offline")
    wait_for(lambda: not exporter.scrape().find("celery_worker_up", hostname=worker.hostname), 15,
             message="series purged")


def test_malformed_event_bodies_are_counted_and_skipped(broker, make_exporter):
    exporter = make_exporter(broker.url)
    with Connection(broker.url) as conn:
        exchange = Exchange("celeryev", type="topic" if broker.kind == "amqp" else "fanout")
        producer = Producer(conn.channel(), exchange=exchange)
        producer.publish(b"{this is not json", routing_key="worker.heartbeat", content_type="application/json",
                         content_encoding="utf-8")
        producer.publish({"no": "type"}, routing_key="worker.heartbeat", serializer="json")
        producer.publish({"type": "worker-heartbeat", "hostname": "ghost@nowhere", "timestamp": time.time(),
                          "utcoffset": 0, "freq": 2, "active": 0, "processed": 0},
                         routing_key="worker.heartbeat", serializer="json")

    def counted():
        m = exporter.scrape()
        return (m.value("celery_exporter_events_malformed_total", reason="json") == 1
                and m.value("celery_exporter_events_malformed_total", reason="missing_type") == 1
                and m.value("celery_worker_up", hostname="ghost@nowhere") == 1)
    wait_for(counted, 15, message="malformed counted, valid event still applied")


def test_credentials_never_appear_in_pages_metrics_or_logs(make_exporter):
    from tests.harness import make_amqp_broker

    broker = make_amqp_broker()
    try:
        exporter = make_exporter(broker.url)
        status, page = exporter.get("/")
        assert status == 200 and "***" in page and broker.user in page
        bad = broker.url.replace("127.0.0.1:5672", "127.0.0.1:1")  # refused: kombu errors echo the URL
        failing = make_exporter(bad, wait=False)
        wait_for(lambda: "down" in failing.log(), 15, message="outage logged")
        assert failing.get("/readyz")[0] == 503
        for text in (page, exporter.scrape().text, exporter.log(), failing.log(), failing.get("/")[1],
                     failing.get("/readyz")[1]):
            assert broker.password not in text
    finally:
        broker.close()


def test_workers_without_task_events_are_hinted_and_enable_events_turns_them_on(make_exporter, make_worker):
    from tests.harness import make_redis_broker

    broker = make_redis_broker()
    queue = f"q-{uuid.uuid4().hex[:6]}"
    plain = make_exporter(broker.url, "--task-events-hint-after", "2")
    worker = make_worker(broker.url, "quiet", queues=queue, task_events=False)
    wait_for(lambda: worker_up(plain, worker.hostname), 30, message="worker up (heartbeats arrive without -E)")
    wait_for(lambda: "run without -E" in plain.log(), 15, message="hint about -E in the log")
    assert plain.log().count("run without -E") == 1
    labels = dict(name="tests.add", hostname=worker.hostname, queue_name=queue)

    enabling = make_exporter(broker.url, "--enable-events", "--enable-events-interval", "1")
    wait_for(lambda: worker_up(enabling, worker.hostname), 30, message="worker seen by the second exporter")
    time.sleep(2)  # at least one enable_events broadcast has reached the worker
    client(broker.url).send_task("tests.add", (1, 2), queue=queue)
    wait_for(lambda: enabling.scrape().value("celery_task_succeeded_total", **labels) == 1, 20,
             message="task events after enable_events")


def test_http_endpoints_openmetrics_static_labels_prefix_and_json_logs(make_exporter):
    import json

    from tests.harness import Metrics, make_redis_broker

    broker = make_redis_broker()
    exporter = make_exporter(broker.url, "--static-label", "cluster=eu1", "--static-label", "team=data",
                             "--metric-prefix", "ch_", "--log-format", "json")
    assert exporter.get("/healthz") == (200, "ok\n")
    assert exporter.get("/readyz") == (200, "ok\n")
    status, page = exporter.get("/")
    assert status == 200 and "events" in page and "/metrics" in page

    m = exporter.scrape()
    assert m.value("ch_exporter_source_up", source="events", cluster="eu1", team="data") == 1
    assert not m.find("celery_exporter_source_up")
    assert m.find("process_resident_memory_bytes")

    status, body = exporter.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and body.rstrip().endswith("# EOF")
    assert "# TYPE ch_exporter_broker_reconnects counter" in body
    assert Metrics(exporter.get("/metrics")[1]).value("ch_exporter_broker_reconnects_total", cluster="eu1") == 0

    # What Prometheus asks for: gzip. The body must be the same exposition, compressed.
    import gzip
    import urllib.request
    request = urllib.request.Request(exporter.base + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert "Accept-Encoding" in response.headers["Vary"]
        unzipped = gzip.decompress(response.read()).decode()
    assert Metrics(unzipped).value("ch_exporter_broker_reconnects_total", cluster="eu1") == 0

    lines = [line for line in exporter.log().splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines)
