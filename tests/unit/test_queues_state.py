"""The broker part of the model and its metrics, driven by hand: no broker, no I/O."""
import json
import time
from datetime import datetime, timezone

import pytest

from celery_health_exporter.metrics import StateCollector
from celery_health_exporter.sources.queues_common import queue_filter
from celery_health_exporter.sources.rabbitmq import queue_stats
from celery_health_exporter.sources.rabbitmq_api import _split_credentials
from celery_health_exporter.sources.redis_queues import RedisQueuesSource, priority_key
from celery_health_exporter.state.model import ClusterState
from celery_health_exporter.state.queues import QueuesSnapshot, QueueStats
from tests.harness import Metrics

T0 = 1_700_000_000.0


@pytest.fixture
def state():
    return ClusterState(worker_timeout=10, purge_offline_after=100, utcoffset=0)


def scrape(state) -> Metrics:
    return Metrics(StateCollector(state, []).render())


def iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def ev(kind, ts=T0, **fields):
    return {"type": kind, "timestamp": ts, "utcoffset": 0, **fields}


def redis_snapshot(**queues):
    return QueuesSnapshot(queues=queues, taken_at=T0, visibility_timeout=3600.0, unacked_sampled=False,
                          consumers_from_workers=True)


def test_no_broker_poller_means_no_broker_series(state):
    m = scrape(state)
    assert m.find("celery_broker_up") == []
    assert m.find("celery_queue_length") == []


def test_a_poll_replaces_the_whole_set_and_a_failure_drops_the_values(state):
    broker = state.broker
    broker.configure(kind="amqp", broker="amqp://u:***@h//")
    assert scrape(state).value("celery_broker_up", broker="amqp://u:***@h//") == 0
    broker.replace(QueuesSnapshot(queues={
        "a": QueueStats(ready=3, unacked=1, consumers=0, published=7, delivered=5, redelivered=1, acked=4,
                        consumer_utilisation=0.5),
        "b": QueueStats(ready=0, unacked=0, consumers=2, published=0, delivered=0, redelivered=0, acked=0),
    }, taken_at=T0, connections=4))
    m = scrape(state)
    assert m.value("celery_broker_up", broker="amqp://u:***@h//") == 1
    assert m.value("celery_broker_consumers_known") == 1  # the broker counts them
    assert (m.value("celery_queue_length", queue_name="a"), m.value("celery_queue_unacked", queue_name="a"),
            m.value("celery_active_consumer_count", queue_name="a")) == (3, 1, 0)
    assert m.value("celery_queue_messages_published_total", queue_name="a") == 7
    assert m.value("celery_queue_messages_delivered_total", queue_name="a") == 5
    assert m.value("celery_queue_messages_redelivered_total", queue_name="a") == 1
    assert m.value("celery_queue_messages_acked_total", queue_name="a") == 4
    assert m.value("celery_queue_consumer_utilisation", queue_name="a") == 0.5
    assert m.value("celery_queue_consumer_utilisation", queue_name="b") is None
    assert m.value("celery_broker_connections") == 4
    assert m.value("celery_broker_visibility_timeout_seconds") is None  # RabbitMQ has none

    broker.replace(QueuesSnapshot(queues={"b": QueueStats(ready=1, consumers=2)}, taken_at=T0 + 1))
    m = scrape(state)
    assert m.find("celery_queue_length", queue_name="a") == []  # vanished queue: gone
    assert m.value("celery_queue_length", queue_name="b") == 1
    assert m.value("celery_queue_unacked", queue_name="b") is None  # AMQP fallback: unknown, not 0

    broker.fail("HTTP 401")
    m = scrape(state)
    assert m.value("celery_broker_up", broker="amqp://u:***@h//") == 0
    assert m.find("celery_queue_length") == [] and m.find("celery_broker_connections") == []
    assert broker.reason == "HTTP 401"


def test_redis_priorities_unacked_age_and_visibility_timeout(state):
    state.broker.configure(kind="redis", broker="redis://h:6379/1")
    state.broker.replace(redis_snapshot(q=QueueStats(
        ready=6, by_priority={"0": 3, "3": 2, "6": 0, "9": 1}, unacked=2, oldest_unacked_at=T0 - 50)))
    m = scrape(state)
    assert m.value("celery_queue_length", queue_name="q") == 6
    assert {l["priority"]: v for l, v in m.find("celery_queue_length_by_priority", queue_name="q")} == {
        "0": 3, "3": 2, "6": 0, "9": 1}
    assert m.value("celery_queue_unacked", queue_name="q") == 2
    age = m.value("celery_queue_oldest_unacked_age_seconds", queue_name="q")
    assert age >= 50  # measured against the wall clock at scrape time
    assert m.value("celery_broker_visibility_timeout_seconds") == 3600
    assert m.value("celery_broker_unacked_sampled") == 0
    assert m.find("celery_queue_messages_published_total") == []  # RabbitMQ only


def test_redis_consumers_come_from_the_workers_queues_absent_only_when_unknown(state):
    state.broker.configure(kind="redis", broker="redis://h:6379/1")
    state.broker.replace(redis_snapshot(work=QueueStats(ready=0), hole=QueueStats(ready=5)))
    m = scrape(state)
    assert m.find("celery_active_consumer_count") == []  # no remote-control poll yet: unknown, absent
    assert m.value("celery_broker_consumers_known") == 0

    now = time.time()
    state.remote_control_polled(now, valid_for=60)  # a poll that no worker answered: none consumes anything
    m = scrape(state)
    assert m.value("celery_broker_consumers_known") == 1
    assert m.value("celery_active_consumer_count", queue_name="hole") == 0
    assert m.value("celery_active_consumer_count", queue_name="work") == 0
    assert state.broker.consumers_from_workers(state, now + 61) is None  # polls stopped succeeding: unknown

    state.worker_queues = {"w1@h": frozenset({"work"}), "w2@h": frozenset({"work", "other"})}
    m = scrape(state)
    assert m.value("celery_active_consumer_count", queue_name="work") == 2
    assert m.value("celery_active_consumer_count", queue_name="hole") == 0  # the black hole
    assert m.find("celery_active_consumer_count", queue_name="other") == []  # not a queue the broker has

    state.apply(ev("worker-heartbeat", hostname="w2@h", freq=2), T0)
    state.apply(ev("worker-offline", hostname="w2@h"), T0)
    assert scrape(state).value("celery_active_consumer_count", queue_name="work") == 1  # a worker down: not counted


def test_oldest_unstarted_task_age_from_publication_receipt_and_eta(state):
    now = T0 + 100
    state.apply(ev("task-sent", T0, uuid="a", name="t", queue="q1", hostname="gen@h"), T0)  # waits in the broker
    state.apply(ev("task-sent", T0 + 40, uuid="b", name="t", queue="q1", hostname="gen@h"), T0 + 40)
    state.apply(ev("task-received", T0 + 60, uuid="b", name="t", hostname="w@h"), T0 + 60)
    state.apply(ev("task-sent", T0 + 10, uuid="c", name="u", queue="q2", hostname="gen@h"), T0 + 10)
    state.apply(ev("task-started", T0 + 20, uuid="c", hostname="w@h"), T0 + 20)  # started: not waiting
    # received without task-sent: counted from receipt; its queue learned from task-sent of the same name
    state.apply(ev("task-received", T0 + 70, uuid="d", name="t", hostname="w@h"), T0 + 70)
    state.apply(ev("task-received", T0 + 5, uuid="e", name="v", hostname="w@h", eta=iso(T0 + 7200)), T0 + 5)
    state.apply(ev("task-received", T0 + 5, uuid="f", name="w", hostname="w@h", eta=iso(T0 + 30)), T0 + 5)
    ages = state.broker.oldest_unstarted(state, now)
    assert ages["q1"] == pytest.approx(100.0)  # task a, from its task-sent
    assert "q2" not in ages
    assert ages["unknown"] == pytest.approx(70.0)  # task f, from its ETA (T0 + 30); e is not due yet
    state.apply(ev("task-started", T0 + 1, uuid="a", hostname="w@h"), T0 + 1)
    assert state.broker.oldest_unstarted(state, now)["q1"] == pytest.approx(60.0)  # now task b, sent at T0 + 40
    m = scrape(state)
    assert m.value("celery_queue_oldest_unstarted_task_age_seconds", queue_name="q1") >= 100


def test_queue_filter_leaves_out_celery_internals_and_applies_anchored_regexes():
    accept = queue_filter()
    for internal in ("celeryev.5f0c", "celery@host.celery.pidbox", "5f0c1d2e-aaaa-bbbb-cccc-0123456789ab.reply.celery"
                     ".pidbox", "amq.gen-Xyz", "0e5b3c4d-1234-4abc-9def-0123456789ab", ""):
        assert not accept(internal), internal
    for task_queue in ("celery", "billing", "celeryev_not_internal", "pidbox"):
        assert accept(task_queue), task_queue
    only = queue_filter(include="bill.*|mail")
    assert only("billing") and only("mail") and not only("mailer") and not only("rebilling")
    assert not only("celeryev.x")  # internals stay out whatever the include says
    but = queue_filter(exclude="tmp-.*")
    assert but("celery") and not but("tmp-1") and but("x-tmp-1")


def test_the_filter_applies_to_the_unstarted_age_too(state):
    state.broker.configure(kind="redis", broker="r", accept=queue_filter(exclude="q1"))
    state.apply(ev("task-sent", T0, uuid="a", name="t", queue="q1", hostname="gen@h"), T0)
    state.apply(ev("task-sent", T0, uuid="b", name="t2", queue="q2", hostname="gen@h"), T0)
    assert set(state.broker.oldest_unstarted(state, T0 + 1)) == {"q2"}


def test_rabbitmq_queue_without_activity_counts_zero_and_keeps_the_queue():
    stats = queue_stats({"name": "fresh", "consumers": 0})
    assert (stats.ready, stats.unacked, stats.published, stats.acked) == (0, 0, 0, 0)
    assert stats.consumer_utilisation is None
    full = queue_stats({"name": "q", "messages_ready": 2, "messages_unacknowledged": 1, "consumers": 3,
                        "consumer_utilisation": 1.0,
                        "message_stats": {"publish": 9, "deliver_get": 8, "redeliver": 2, "ack": 6}})
    assert (full.ready, full.unacked, full.consumers, full.consumer_utilisation) == (2, 1, 3, 1.0)
    assert (full.published, full.delivered, full.redelivered, full.acked) == (9, 8, 2, 6)


def test_a_quorum_queues_delivery_limit_is_the_lower_of_argument_and_policy_and_absent_without_one():
    def limit(**item):
        return queue_stats({"name": "q", "messages_ready": 0, **item}).delivery_limit

    assert limit(type="quorum", arguments={"x-delivery-limit": 5}) == 5
    assert limit(type="quorum", effective_policy_definition={"delivery-limit": 7}) == 7
    assert limit(type="quorum", arguments={"x-delivery-limit": 9},
                 effective_policy_definition={"delivery-limit": 4}) == 4
    assert limit(type="quorum", arguments={}, effective_policy_definition=[]) is None  # none set
    assert limit(type="quorum", arguments={"x-delivery-limit": -1}) is None  # RabbitMQ 4.x: unlimited
    assert limit(type="classic", arguments={"x-delivery-limit": 5}) is None  # classic queues ignore it
    refused = []
    assert queue_stats({"name": "q", "type": "quorum", "arguments": {"x-delivery-limit": "lots"}},
                       refused.append).delivery_limit is None
    assert refused  # a hostile number is reported, never shown


def test_management_credentials_travel_apart_from_the_url():
    assert _split_credentials("https://mon:s%40cret@rmq.example:15671/admin") == (
        "https://rmq.example:15671/admin", "mon", "s@cret")
    assert _split_credentials("http://127.0.0.1:15672") == ("http://127.0.0.1:15672", None, None)


def test_redis_priority_keys_and_unacked_attribution_follow_kombu():
    assert priority_key("q", 0, "\x06\x16") == "q"
    assert priority_key("q", 6, "\x06\x16") == "q\x06\x166"
    assert priority_key("q", 5, ":") == "q:5"
    routes = {("celery", "rk"): {"q1", "q2"}}
    entry = json.dumps([{"body": "..."}, "celery", "rk"])
    assert RedisQueuesSource._queues_of(entry, routes) == ["q1", "q2"]  # restored into every bound queue
    assert RedisQueuesSource._queues_of(json.dumps([{}, "", "direct"]), routes) == ["direct"]
    assert RedisQueuesSource._queues_of(json.dumps([{}, "celery", "unbound"]), routes) == ["unbound"]
    assert RedisQueuesSource._queues_of(b"not json", routes) == []
