"""Bugs are not outages: the real daemon with bugs injected (tests/apps/buggy_exporter.py)
in its events source, a poller and a metrics area, on both real brokers with a real
worker. Each bug is counted, logged once with its traceback, and everything else goes
on: no reconnect, the source stays up, the other tasks and areas are served."""
import json
import sys
import uuid

import pytest

from tests.apps.testapp import client
from tests.harness import wait_for

pytestmark = pytest.mark.integration

BUGGY = (sys.executable, "tests/apps/buggy_exporter.py")


def test_a_bug_is_counted_logged_once_and_skipped_while_everything_else_goes_on(broker, make_exporter, make_worker):
    queue = f"q-{uuid.uuid4().hex[:6]}"
    exporter = make_exporter(broker.url, "--inspect-interval", "1", command=BUGGY)
    worker = make_worker(broker.url, "buggy", queues=queue)
    wait_for(lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 1, 30,
             message="worker up")

    publisher = client(broker.url)
    for i in range(3):
        publisher.send_task("tests.add", (i, 1), queue=queue, task_id=f"boom-{uuid.uuid4()}")
        publisher.send_task("tests.add", (i, 2), queue=queue)

    def settled():
        m = exporter.scrape()
        return (m.sum("celery_task_succeeded_total", hostname=worker.hostname) == 3
                and m.value("celery_exporter_internal_errors_total", source="events") == 3
                and (m.value("celery_exporter_internal_errors_total", source="inspect") or 0) >= 2)

    wait_for(settled, 45, message="3 tasks counted, 3 injected task-succeeded bugs, 2 bad polls counted")
    m = exporter.scrape()
    # the events source never reconnected and is up; the exporter is ready
    assert m.value("celery_exporter_broker_reconnects_total") == 0
    assert m.value("celery_exporter_source_up", source="events") == 1
    assert m.value("celery_exporter_source_up", source="inspect") == 1
    assert m.value("celery_exporter_source_failures_total", source="events") == 0
    assert exporter.get("/readyz")[0] == 200
    # the three bugged tasks' other events were applied: received and started
    assert m.sum("celery_task_started_total", hostname=worker.hostname) == 6
    # a metrics area that raises is left out; the others are served, and the scrape says which failed
    assert m.value("celery_exporter_scrape_collector_success", collector="beat") == 0
    assert m.value("celery_exporter_scrape_collector_success", collector="tasks") == 1
    assert m.value("celery_exporter_scrape_collector_success", collector="workers") == 1
    assert m.value("celery_exporter_internal_errors_total", source="scrape") >= 2
    assert m.value("celery_exporter_source_poll_duration_seconds", source="inspect") > 0
    # the status page and the findings still answer, and say which sources contained bugs
    assert exporter.get("/")[0] == 200
    status, body = exporter.get("/api/findings")
    assert status == 200
    found = {f["id"]: f for f in json.loads(body)["findings"] if f["kind"] == "internal_errors"}
    assert set(found) == {"internal_errors:events", "internal_errors:inspect", "internal_errors:scrape"}
    assert {f["alert"] for f in found.values()} == {"CeleryExporterInternalErrors"}
    assert "contained 3 bug(s) in its events source" in found["internal_errors:events"]["summary"]

    log = exporter.log()
    for bug in ("injected bug: task-succeeded", "injected bug: beat area", "injected bug: stats reply"):
        assert log.count(f"RuntimeError: {bug}") == 1, f"{bug} logged {log.count(bug)} times:\n{log}"
    assert log.count("Traceback (most recent call last)") == 3
    assert "internal error while applying a 'task-succeeded' event" in log
    assert "internal error while collecting metrics area beat" in log
