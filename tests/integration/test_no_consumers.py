"""A queue with messages and no live worker at all (all dead, or scaled to zero): its
consumer count is 0, on both brokers, so that CeleryQueueWithoutConsumers can fire in
exactly the case it exists for. Unknown (absent) only when nothing could tell."""
import uuid

import pytest

from tests.apps.testapp import client
from tests.harness import RABBITMQ_API, wait_for

pytestmark = pytest.mark.integration

WAITING = 10


def flags(broker, queue, inspect_interval="1"):
    common = ["--broker-poll-interval", "1", "--inspect-interval", inspect_interval, "--inspect-timeout", "0.5"]
    return common + (["--rabbitmq-management-url", RABBITMQ_API] if broker.kind == "amqp" else ["--queues", queue])


def publish_without_workers(broker, queue):
    publisher = client(broker.url)
    for i in range(WAITING):
        publisher.send_task("tests.add", (i, 1), queue=queue)


def test_messages_and_no_worker_at_all_means_zero_consumers(broker, make_exporter):
    queue = f"hole-{uuid.uuid4().hex[:6]}"
    exporter = make_exporter(broker.url, *flags(broker, queue))
    publish_without_workers(broker, queue)

    def seen():
        m = exporter.scrape()
        return (m.value("celery_queue_length", queue_name=queue),
                m.value("celery_active_consumer_count", queue_name=queue), m.value("celery_broker_consumers_known"))

    wait_for(lambda: seen() == (WAITING, 0, 1), 30, message=f"{queue}: {WAITING} waiting, 0 consumers, known")


def test_redis_without_remote_control_says_the_count_is_unknown(redis_broker, make_exporter):
    queue = f"hole-{uuid.uuid4().hex[:6]}"
    exporter = make_exporter(redis_broker.url, *flags(redis_broker, queue, inspect_interval="0"))
    publish_without_workers(redis_broker, queue)
    wait_for(lambda: exporter.scrape().value("celery_queue_length", queue_name=queue) == WAITING, 30,
             message="queue length")
    m = exporter.scrape()
    assert m.find("celery_active_consumer_count", queue_name=queue) == []
    assert m.value("celery_broker_consumers_known") == 0
