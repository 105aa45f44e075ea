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
    # no publisher sends task-sent here: nothing is to wait for one (--task-sent-grace 0)
    exporter = make_exporter(broker.url, "--task-sent-grace", "0")
    now = time.time()
    base = {"hostname": HOST, "timestamp": now, "utcoffset": 0, "clock": 1, "pid": 4242}
    events = [
        ("worker.heartbeat", {**base, "type": "worker-heartbeat", "utcoffset": 1e308, "freq": 2.0, "active": 0,
                              "processed": 0}),
        ("worker.heartbeat", {**base, "type": "worker-heartbeat", "freq": float("nan"), "active": float("inf"),
                              "processed": 1}),
        # received first: the name of each task is known before its outcome
        *[("task.received", {**base, "type": "task-received", "uuid": f"u-{i}", "name": "tasks.lie"})
          for i in range(1, 5)],
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

    labels = {"hostname": HOST, "name": "tasks.lie", "queue_name": "unknown"}

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
    per_name = {"name": labels["name"], "queue_name": labels["queue_name"]}  # histograms: no hostname by default
    assert m.value("celery_task_runtime_count", **per_name) == 1  # the one good run time
    assert m.value("celery_task_runtime_sum", **per_name) == 0.25
    assert m.value("celery_exporter_event_lag_seconds_count") == 9  # all but the timestamp of 1e308
    assert 0 <= m.value("celery_exporter_event_lag_seconds_sum") < 60
    assert m.value("celery_worker_up", hostname=HOST) == 1
    assert m.value("celery_worker_tasks_processed_total", hostname=HOST) == 1
    assert m.value("celery_exporter_nonfinite_samples_dropped_total") == 0
    # the text itself: no sample line says NaN or Inf (a bucket's le="+Inf" aside)
    values = [line.rsplit(" ", 1)[1] for line in m.text.splitlines() if line and not line.startswith("#")]
    assert not [v for v in values if v in ("NaN", "+Inf", "-Inf")]


def test_a_forged_delivery_time_in_redis_is_refused_and_counted(redis_broker):
    """Any Redis client can write kombu's ``unacked_index``: a score of -inf would make the oldest
    unacked age +Inf. The real poller against the real Redis refuses it and counts it."""
    import redis

    from celery_health_exporter.broker import make_app
    from celery_health_exporter.config import Config
    from celery_health_exporter.metrics import StateCollector
    from celery_health_exporter.sources.redis_queues import RedisQueuesSource
    from celery_health_exporter.state.model import ClusterState
    from tests.harness import REDIS_HOST, REDIS_PORT, Metrics

    config = Config(broker_url=redis_broker.url, broker_poll_interval=1)
    state = ClusterState()
    source = RedisQueuesSource(config, state, make_app(config))
    keys = redis.Redis(REDIS_HOST, REDIS_PORT, db=redis_broker.db)
    with Connection(redis_broker.url) as conn:
        channel = conn.channel()
        queue = conn.SimpleQueue("lied-to")
        for i in range(2):
            queue.put({"i": i})
        delivered = [channel.basic_get("lied-to", no_ack=False) for _ in range(2)]
        assert all(delivered)
        (forged, _), (honest, honest_at) = keys.zrange("unacked_index", 0, -1, withscores=True)
        keys.zadd("unacked_index", {forged: float("-inf")})
        try:
            assert source.poll_once(), state.broker.reason
            stats = state.broker.snapshot.queues["lied-to"]
            assert stats.unacked == 2
            assert stats.oldest_unacked_at == pytest.approx(honest_at)  # the honest delivery's time
            assert state.malformed == {"bad_timestamp": 1}
            m = Metrics(StateCollector(state, [source]).render())
            assert all(math.isfinite(value) for _, _, value in m.samples)
            assert 0 <= m.value("celery_queue_oldest_unacked_age_seconds", queue_name="lied-to") < 60
            assert m.value("celery_exporter_events_malformed_total", reason="bad_timestamp") == 1
        finally:
            source.close()
            for message in delivered:
                message.ack()
