"""The shipped rules against a real exporter, a real worker and a real Prometheus, in the failures
that remove the series a rule reads (the promtool cases of deploy/prometheus/tests/
disappearing-series.yaml, here with the real staleness of a real scrape):

- Redis with --inspect-interval 0: the consumer count is absent (celery_broker_consumers_known 0),
  so CeleryQueueWithoutConsumers cannot fire for a queue nobody consumes; CeleryQueueConsumersUnknown
  does.
- A SIGKILLed worker is purged after --purge-offline-after: its celery_worker_up series is gone from
  Prometheus, and CeleryWorkerDown still fires.
- The exporter stops: every celery_* series goes stale; CeleryExporterDown fires, and CeleryWorkerDown
  for the purged worker stops (deliberately: without the exporter nothing is known about workers).

Every `for:` is 1s; the only expression edit is CeleryQueueConsumersUnknown's 15 min window (10 s).
"""
from __future__ import annotations

import uuid

import pytest
import yaml

from tests.apps.testapp import client
from tests.harness import wait_for

from .conftest import ALERTS_FILE, PrometheusConfig, override_rules

pytestmark = pytest.mark.integration

WINDOW = "10s"


def shortened_rules(workdir):
    doc = yaml.safe_load(ALERTS_FILE.read_text())
    expr = next(r["expr"] for g in doc["groups"] for r in g["rules"] if r.get("alert") == "CeleryQueueConsumersUnknown")
    assert expr.count("[15m]") == 2 and expr.count("offset 15m") == 1, expr
    edited = expr.replace("[15m]", f"[{WINDOW}]").replace("offset 15m", f"offset {WINDOW}")
    return override_rules(ALERTS_FILE, workdir, for_duration="1s", exprs={"CeleryQueueConsumersUnknown": edited})


def firing(prom, alertname, **labels):
    return [a for a in prom.firing_alerts()
            if a["labels"]["alertname"] == alertname and all(a["labels"].get(k) == v for k, v in labels.items())]


def test_alerts_outlive_the_series_their_failure_removes(redis_broker, make_exporter, make_worker,
                                                         prometheus_factory, tmp_path):
    queue = f"hole-{uuid.uuid4().hex[:6]}"
    exporter = make_exporter(redis_broker.url, "--inspect-interval", "0", "--broker-poll-interval", "1",
                             "--queues", queue, "--worker-timeout", "3", "--purge-offline-after", "4")
    prom = prometheus_factory(PrometheusConfig(rule_files=[shortened_rules(tmp_path)],
                                               scrape_targets=[f"127.0.0.1:{exporter.port}"],
                                               scrape_interval="1s", evaluation_interval="1s"))
    worker = make_worker(redis_broker.url, f"gone{uuid.uuid4().hex[:4]}", queues=f"elsewhere-{queue}")
    publisher = client(redis_broker.url)
    for i in range(5):
        publisher.send_task("tests.add", (i, 1), queue=queue)

    up = f'celery_worker_up{{hostname="{worker.hostname}"}}'
    wait_for(lambda: [s for s in prom.query(up) if s["value"][1] == "1"], 30, message=f"{worker.hostname} up in Prometheus")

    # Redis without remote control: consumers unknown, the queue never drains
    wait_for(lambda: firing(prom, "CeleryQueueConsumersUnknown", queue_name=queue), 40, 0.5,
             "CeleryQueueConsumersUnknown firing")
    assert prom.query("celery_broker_consumers_known")[0]["value"][1] == "0"
    assert prom.query(f'celery_active_consumer_count{{queue_name="{queue}"}}') == []
    assert firing(prom, "CeleryQueueWithoutConsumers") == []

    # the worker dies; after --purge-offline-after its series are gone, the alert is not
    worker.kill()
    wait_for(lambda: firing(prom, "CeleryWorkerDown", hostname=worker.hostname), 30, 0.5, "CeleryWorkerDown firing")
    wait_for(lambda: prom.query(up) == [], 30, 0.5, f"{up} purged")
    assert exporter.scrape().find("celery_worker_up", hostname=worker.hostname) == []
    wait_for(lambda: prom.query(f'ALERTS{{alertname="CeleryWorkerDown", alertstate="firing", '
                                f'hostname="{worker.hostname}"}}'), 5, 0.5, "still firing after the purge")
    (after_purge,) = firing(prom, "CeleryWorkerDown", hostname=worker.hostname)
    assert after_purge["labels"]["severity"] == "critical"

    # the exporter stops: its own alert fires, the worker's stops (nothing is known without it)
    code, _ = exporter.stop()
    assert code == 0
    (down,) = wait_for(lambda: firing(prom, "CeleryExporterDown"), 30, 0.5, "CeleryExporterDown firing")
    assert down["labels"]["instance"] == f"127.0.0.1:{exporter.port}"
    assert down["labels"]["severity"] == "critical"
    wait_for(lambda: firing(prom, "CeleryWorkerDown", hostname=worker.hostname) == [], 30, 0.5,
             "CeleryWorkerDown resolved while the exporter is down")
