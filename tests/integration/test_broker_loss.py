"""Broker loss between the exporter and the broker, cut with a TCP proxy the test controls."""
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.apps.testapp import client
from tests.harness import TcpProxy, wait_for

pytestmark = pytest.mark.integration


def through(proxy, url):
    parts = urlsplit(url)
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    return urlunsplit(parts._replace(netloc=netloc))


def test_exporter_survives_broker_loss_and_keeps_counting(broker, make_exporter, make_worker):
    parts = urlsplit(broker.url)
    proxy = TcpProxy(parts.hostname, parts.port)
    try:
        queue = f"q-{uuid.uuid4().hex[:6]}"
        exporter = make_exporter(through(proxy, broker.url))
        worker = make_worker(broker.url, "loss", queues=queue)
        wait_for(lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 1, 30,
                 message="worker up")
        publisher = client(broker.url)
        publisher.send_task("tests.add", (1, 1), queue=queue)
        labels = dict(name="tests.add", hostname=worker.hostname, queue_name=queue)
        wait_for(lambda: exporter.scrape().value("celery_task_succeeded_total", **labels) == 1,
                 message="first task counted")
        assert exporter.scrape().value("celery_exporter_broker_reconnects_total") == 0

        proxy.cut()
        wait_for(lambda: exporter.get("/readyz")[0] == 503, 30, message="readyz 503 after the cut")
        status, reason = exporter.get("/readyz")
        assert "events source not consuming" in reason
        m = exporter.scrape()  # still serving while the broker is away
        assert m.value("celery_exporter_source_up", source="events") == 0
        assert m.value("celery_task_succeeded_total", **labels) == 1  # counters never go backwards

        proxy.restore()
        wait_for(lambda: exporter.get("/readyz")[0] == 200, 30, message="readyz 200 after restore")
        assert exporter.scrape().value("celery_exporter_broker_reconnects_total") == 1
        for _ in range(2):
            publisher.send_task("tests.add", (2, 2), queue=queue)
        wait_for(lambda: exporter.scrape().value("celery_task_succeeded_total", **labels) == 3,
                 message="counting continues after the outage")
        assert exporter.alive()
        assert exporter.log().count("events: down") == 1  # logged once per outage, not per retry
    finally:
        proxy.close()


def test_a_task_whose_terminal_event_was_lost_stops_counting_as_running(make_exporter, make_worker):
    """Redis keeps nothing for an absent subscriber: a task that finishes during an outage
    leaves a "started" record behind, which would age forever and look like a hung task.
    `inspect active` no longer lists it, so it goes once the worker's later events arrive."""
    import time

    from tests.harness import make_redis_broker

    broker = make_redis_broker()
    parts = urlsplit(broker.url)
    proxy = TcpProxy(parts.hostname, parts.port)
    try:
        queue = f"q-{uuid.uuid4().hex[:6]}"
        exporter = make_exporter(through(proxy, broker.url), "--inspect-interval", "1")
        worker = make_worker(broker.url, "ghost", queues=queue)
        wait_for(lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 1, 30,
                 message="worker up")
        labels = dict(name="tests.sleep", hostname=worker.hostname, queue_name=queue)
        client(broker.url).send_task("tests.sleep", (3,), queue=queue)
        wait_for(lambda: exporter.scrape().value("celery_task_started_total", **labels) == 1, 30,
                 message="task started")
        assert exporter.scrape().value("celery_exporter_tracked_tasks") == 1

        proxy.cut()
        time.sleep(5)  # the task finishes meanwhile; its task-succeeded is published to nobody
        proxy.restore()
        m = wait_for(lambda: (lambda m: m.value("celery_exporter_tracked_tasks_vanished_total") == 1 and m)(
            exporter.scrape()), 30, message="the ghost dropped")
        assert m.value("celery_exporter_tracked_tasks") == 0
        assert m.value("celery_worker_stalled", hostname=worker.hostname) == 0
        assert m.value("celery_task_succeeded_total", **labels) == 0  # lost, and not made up
        assert m.value("celery_worker_oldest_active_task_age_seconds", hostname=worker.hostname) in (None, 0)
    finally:
        proxy.close()
