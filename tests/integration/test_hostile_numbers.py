"""Numbers that lie, on a real broker: hostile events published with kombu onto the real event
exchange (anyone with broker credentials can), read by the real exporter. Its /metrics stays
finite and counts what it refused; the good numbers around them are still used."""
import math
import time

import pytest
from kombu import Connection, Exchange, Producer

from tests.harness import wait_for

pytestmark = pytest.mark.integration

HOST = "liar@hostile"


def test_hostile_numbers_in_events_are_refused_and_counted(broker, make_exporter):
    exporter = make_exporter(broker.url)
    now = time.time()
    base = {"hostname": HOST, "timestamp": now, "utcoffset": 0, "clock": 1, "pid": 4242}
    events = [
        ("worker.heartbeat", {**base, "type": "worker-heartbeat", "utcoffset": 1e308, "freq": 2.0, "active": 0,
                              "processed": 0}),
        ("worker.heartbeat", {**base, "type": "worker-heartbeat", "freq": float("nan"), "active": float("inf"),
                              "processed": 1}),
        ("task.succeeded", {**base, "type": "task-succeeded", "uuid": "u-1", "runtime": 1e308}),
        ("task.succeeded", {**base, "type": "task-succeeded", "uuid": "u-2", "runtime": float("inf")}),
        ("task.succeeded", {**base, "type": "task-succeeded", "uuid": "u-3", "runtime": -5.0,
                            "timestamp": 1e308}),
        ("task.succeeded", {**base, "type": "task-succeeded", "uuid": "u-4", "runtime": 0.25}),
    ]
    with Connection(broker.url) as conn:
        exchange = Exchange("celeryev", type="topic" if broker.kind == "amqp" else "fanout")
        producer = Producer(conn.channel(), exchange=exchange)
        for routing_key, event in events:  # kombu's json writes NaN and Infinity as JSON extensions
            producer.publish(event, routing_key=routing_key, serializer="json")

    labels = {"hostname": HOST, "name": "unknown", "queue_name": "unknown"}

    def refused_and_counted():
        m = exporter.scrape()
        return (m.value("celery_task_succeeded_total", **labels) == 4
                and m.value("celery_exporter_events_malformed_total", reason="bad_duration") == 4
                and m.value("celery_exporter_events_malformed_total", reason="bad_utcoffset") == 1
                and m.value("celery_exporter_events_malformed_total", reason="bad_count") == 1
                and m.value("celery_exporter_events_malformed_total", reason="bad_timestamp") == 1)
    wait_for(refused_and_counted, 15, message="the hostile numbers refused and counted")

    m = exporter.scrape()
    not_finite = [(name, sample_labels, value) for name, sample_labels, value in m.samples
                  if not math.isfinite(value)]
    assert not not_finite
    assert m.value("celery_task_runtime_count", **labels) == 1  # the one good run time
    assert m.value("celery_task_runtime_sum", **labels) == 0.25
    assert m.value("celery_exporter_event_lag_seconds_count") == 5  # all but the timestamp of 1e308
    assert 0 <= m.value("celery_exporter_event_lag_seconds_sum") < 60
    assert m.value("celery_worker_up", hostname=HOST) == 1
    assert m.value("celery_worker_tasks_processed_total", hostname=HOST) == 1
    assert m.value("celery_exporter_nonfinite_samples_dropped_total") == 0
    # the text itself: no sample line says NaN or Inf (a bucket's le="+Inf" aside)
    values = [line.rsplit(" ", 1)[1] for line in m.text.splitlines() if line and not line.startswith("#")]
    assert not [v for v in values if v in ("NaN", "+Inf", "-Inf")]
