"""The Redis poller against the Redis of this machine: priorities, key prefix, unacked, visibility timeout.

Each test has a Redis database of its own (``make_redis_broker``).
"""
import json
import logging
import time
import uuid

import pytest
import redis
from kombu import Connection

from celery_health_exporter.broker import make_app
from celery_health_exporter.config import Config
from celery_health_exporter.sources.redis_queues import RedisQueuesSource
from celery_health_exporter.state.model import ClusterState
from tests.apps.brokerapp import client, publish_with
from tests.celery_versions import NEWEST, each_worker_celery, python_for
from tests.harness import REDIS_HOST, REDIS_PORT, TcpProxy, make_redis_broker, wait_for

pytestmark = pytest.mark.integration

POLL = ("--broker-poll-interval", "1")


@pytest.fixture
def rds():
    broker = make_redis_broker()
    yield broker
    broker.close()


def transport_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flags += ["--broker-transport-option", f"{key}={json.dumps(value)}"]
    return flags


def by_priority(m, queue):
    return {labels["priority"]: v for labels, v in m.find("celery_queue_length_by_priority", queue_name=queue)}


@each_worker_celery
@pytest.mark.parametrize("prefix", ["", "tenant-a:"])
def test_black_hole_with_exact_lengths_per_priority_with_and_without_global_keyprefix(rds, make_exporter, prefix,
                                                                                      worker_celery):
    # No worker here: the Celery version is the publisher's, whose kombu lays out the keys.
    options = {"global_keyprefix": prefix} if prefix else {}
    priorities = (0, 0, 0, 4, 5, 9)  # steps 0, 3, 6, 9: 4 and 5 both go to 3
    if worker_celery == NEWEST:
        publisher = client(rds.url, options)
        for priority in priorities:
            publisher.send_task("brokers.noop", queue="hole", priority=priority)
    else:
        publish_with(python_for(worker_celery), rds.url, options, "hole", priorities)
    keys = redis.Redis(REDIS_HOST, REDIS_PORT, db=rds.db)
    assert keys.llen(f"{prefix}hole") == 3 and keys.llen(f"{prefix}hole\x06\x163") == 2  # kombu's layout
    if prefix:
        assert not keys.exists("hole")

    exporter = make_exporter(rds.url, *POLL, *transport_flags(options))

    def seen():
        m = exporter.scrape()
        return m if m.value("celery_queue_length", queue_name="hole") == 6 else None

    m = wait_for(seen, 10, message="length of the black-hole queue")
    assert by_priority(m, "hole") == {"0": 3, "3": 2, "6": 0, "9": 1}
    assert m.value("celery_queue_unacked", queue_name="hole") == 0
    # No worker's queues are known: the consumer count is absent, not a misleading 0
    assert m.find("celery_active_consumer_count") == []
    names = {labels["queue_name"] for labels, _ in m.find("celery_queue_length")}
    assert "hole" in names and not any(n.startswith("celeryev.") or n.endswith(".pidbox") for n in names)
    assert redis.Redis(REDIS_HOST, REDIS_PORT, db=rds.db).keys(f"{prefix}_kombu.binding.celeryev")  # bound, left out
    assert m.value("celery_broker_visibility_timeout_seconds") == 3600  # kombu's default
    assert m.value("celery_broker_unacked_sampled") == 0
    assert m.value("celery_broker_up", broker=rds.url) == 1
    assert m.value("celery_exporter_source_up", source="redis") == 1

    keys.delete(f"{prefix}_kombu.binding.hole", f"{prefix}hole", f"{prefix}hole\x06\x163", f"{prefix}hole\x06\x169")
    wait_for(lambda: exporter.scrape().find("celery_queue_length") == [], 10,
             message="deleted queue gone from /metrics")


def test_acks_late_task_is_unacked_ages_and_is_redelivered_past_the_visibility_timeout(
        rds, make_exporter, make_worker):
    # Workers restore overdue messages every second here (kombu's default is every ~100 s).
    options = {"visibility_timeout": 5, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    exporter = make_exporter(rds.url, *POLL, "--inspect-interval", "1", *transport_flags(options))
    worker = make_worker(rds.url, "holder", queues="work", concurrency=2, app="tests.apps.brokerapp",
                         env={"TEST_TRANSPORT_OPTIONS": json.dumps(options)})
    publisher = client(rds.url, options)
    publisher.send_task("brokers.noop", queue="hole")
    publisher.send_task("brokers.hold", queue="work")

    def held():
        m = exporter.scrape()
        return m if m.value("celery_queue_unacked", queue_name="work") == 1 else None

    first = wait_for(held, 20, 0.25, message="the held task unacked")
    age1 = first.value("celery_queue_oldest_unacked_age_seconds", queue_name="work")
    time.sleep(1.2)
    second = exporter.scrape()
    age2 = second.value("celery_queue_oldest_unacked_age_seconds", queue_name="work")
    assert second.value("celery_queue_unacked", queue_name="work") == 1
    assert 1.0 < age2 - age1 < 3.0, (age1, age2)  # the age grows with the clock
    assert second.value("celery_broker_visibility_timeout_seconds") == 5
    assert second.value("celery_queue_length", queue_name="hole") == 1
    assert second.value("celery_queue_unacked", queue_name="hole") == 0

    # Past the visibility timeout kombu puts the message back and the worker runs the task again:
    # the unacked age starts over and the same task id starts twice.
    started = dict(name="brokers.hold", hostname=worker.hostname, queue_name="work")
    wait_for(lambda: exporter.scrape().value("celery_task_started_total", **started) == 2, 20,
             message="the held task started a second time after the visibility timeout")
    # (the snapshot may predate the re-delivery by one poll interval)
    m = wait_for(lambda: (lambda m: m if m.value("celery_queue_oldest_unacked_age_seconds", queue_name="work") < 4
                          else None)(exporter.scrape()), 3, message="the unacked age started over")
    assert m.value("celery_queue_unacked", queue_name="work") == 1

    # Consumers on Redis come from the workers' active_queues (remote-control poller):
    # exact when that poller runs, absent (never 0 by default) when it does not.
    if _has_remote_control(second):
        wait_for(lambda: exporter.scrape().find("celery_active_consumer_count"), 20, message="consumer counts")
        m = exporter.scrape()
        assert m.value("celery_active_consumer_count", queue_name="work") == 1
        assert m.value("celery_active_consumer_count", queue_name="hole") == 0  # the black hole
    else:
        assert exporter.scrape().find("celery_active_consumer_count") == []


def _has_remote_control(m) -> bool:
    return any(labels["source"] not in ("events", "redis") for labels, _ in m.find("celery_exporter_source_up"))


# ------------------------------------------------------------------------------------------
# The poller object itself, in process, on one database with a key prefix per test

def poller(url, options, **overrides) -> tuple[RedisQueuesSource, ClusterState]:
    config = Config(broker_url=url, broker_transport_options=options, broker_poll_interval=1)
    state = ClusterState()
    source = RedisQueuesSource(config, state, make_app(config))
    for name, value in overrides.items():
        setattr(source, name, value)
    return source, state


def test_custom_priority_steps_and_separator_are_honoured(rds):
    options = {"global_keyprefix": f"p{uuid.uuid4().hex[:6]}/", "priority_steps": [0, 5], "sep": ":"}
    publisher = client(rds.url, options)
    for priority in (0, 1, 5, 7, 9):
        publisher.send_task("brokers.noop", queue="steps", priority=priority)
    source, state = poller(rds.url, options)
    try:
        assert source.poll_once(), state.broker.reason
        stats = state.broker.snapshot.queues["steps"]
        assert stats.by_priority == {"0": 2, "5": 3} and stats.ready == 5
        assert redis.Redis(REDIS_HOST, REDIS_PORT, db=rds.db).llen(f"{options['global_keyprefix']}steps:5") == 3
    finally:
        source.close()


def test_unacked_counts_are_exact_within_the_budget_and_sampled_beyond_it(rds):
    options = {"global_keyprefix": f"s{uuid.uuid4().hex[:6]}:"}
    with Connection(rds.url, transport_options=options) as conn:
        channel = conn.channel()
        for queue, n in (("big", 300), ("small", 100)):
            q = conn.SimpleQueue(queue)
            for i in range(n):
                q.put({"i": i})
        delivered = []
        for queue, n in (("big", 300), ("small", 100)):
            for _ in range(n):  # delivered, never acked: kombu records each in `unacked`
                delivered.append(channel.basic_get(queue, no_ack=False))
        assert all(delivered)
        keys = redis.Redis(REDIS_HOST, REDIS_PORT, db=rds.db)
        assert keys.hlen(f"{options['global_keyprefix']}unacked") == 400
        oldest_delivery = keys.zrange(f"{options['global_keyprefix']}unacked_index", 0, 0, withscores=True)[0][1]

        source, state = poller(rds.url, options)
        assert source.poll_once(), state.broker.reason
        snapshot = state.broker.snapshot
        assert snapshot.unacked_sampled is False
        assert (snapshot.queues["big"].unacked, snapshot.queues["small"].unacked) == (300, 100)
        assert snapshot.queues["big"].ready == 0
        assert snapshot.queues["big"].oldest_unacked_at == pytest.approx(oldest_delivery)
        assert snapshot.queues["small"].oldest_unacked_at > oldest_delivery

        source.unacked_budget = 100  # over budget: HSCAN stops early, counts are scaled
        assert source.poll_once()
        snapshot = state.broker.snapshot
        assert snapshot.unacked_sampled is True
        big, small = snapshot.queues["big"].unacked, snapshot.queues["small"].unacked
        assert abs(big + small - 400) <= 2 and 150 <= big <= 390 and 10 <= small <= 250, (big, small)
        assert snapshot.queues["big"].oldest_unacked_at == pytest.approx(oldest_delivery)  # still exact
        source.close()
        for message in delivered:
            message.ack()


def test_redis_gone_means_source_down_values_dropped_one_line_then_recovery(rds, caplog):
    caplog.set_level(logging.INFO, logger="celery_health_exporter.sources.redis")
    proxy = TcpProxy(REDIS_HOST, REDIS_PORT)
    url = f"redis://127.0.0.1:{proxy.port}/{rds.db}"
    options = {"global_keyprefix": f"d{uuid.uuid4().hex[:6]}:", "socket_timeout": 2}
    client(rds.url, options).send_task("brokers.noop", queue="q")
    source, state = poller(url, options)
    try:
        assert source.poll_once() and state.broker.snapshot.queues["q"].ready == 1
        proxy.cut()
        for _ in range(3):
            assert not source.poll_once()
        assert state.broker.snapshot is None and state.broker.up is False
        assert not source.health.up
        proxy.restore()
        assert source.poll_once() and state.broker.snapshot.queues["q"].ready == 1
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 3, lines  # connected, down once for three failed polls, recovered
        assert lines[0] == "redis: connected"
        assert lines[1].startswith("redis: down: ") and "Error" in lines[1]
        assert lines[2].startswith("redis: recovered after ")
    finally:
        source.close()
        proxy.close()
