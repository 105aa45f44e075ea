"""Publisher and worker events race: a worker discards expired tasks with a task-revoked
(expired) that names no task, and it can arrive before the task's task-sent, which
travels over the publisher's connection. Here the publisher's task-sent events are made
to arrive last for every task (sent by Celery's own event dispatcher after the worker
discarded the tasks): each expiry must still count under its task's name and queue."""
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery

from tests.harness import wait_for

pytestmark = pytest.mark.integration

TASKS = 20
NAME = "tests.add"


def test_expiries_that_beat_their_task_sent_are_attributed_on_both_brokers(broker, make_exporter, make_worker):
    queue = f"exp-{uuid.uuid4().hex[:6]}"
    exporter = make_exporter(broker.url, "--task-sent-grace", "60", "--inspect-interval", "0")
    # Celery gives an expired task a message TTL of 0: RabbitMQ drops it unless a consumer can take it at
    # once, so the worker must have room for all of them (every one then gets its task-revoked).
    worker = make_worker(broker.url, "expiring", queues=queue, extra=("--prefetch-multiplier", str(TASKS)))
    wait_for(lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 1, 30,
             message="worker up")

    # The publisher's own task-sent is held back: it will arrive after the worker's events.
    publisher = Celery("late-publisher", broker=broker.url, set_as_current=False)
    publisher.conf.task_send_sent_event = False
    past = datetime.now(timezone.utc) - timedelta(minutes=5)
    ids = [publisher.send_task(NAME, (1, 1), queue=queue, expires=past).id for _ in range(TASKS)]
    wait_for(lambda: exporter.scrape().value("celery_exporter_events_total", type="task-revoked") == TASKS, 30,
             message="the worker discarded every expired task")
    m = exporter.scrape()
    assert m.find("celery_task_expired_total") == []  # held for their task-sent, not counted as unknown

    with publisher.connection_for_write() as connection:
        dispatcher = publisher.events.Dispatcher(connection, hostname=f"late@{queue}")
        for task_id in ids:
            dispatcher.send("task-sent", uuid=task_id, name=NAME, queue=queue, routing_key=queue, exchange="")
        dispatcher.flush()

    wait_for(lambda: exporter.scrape().value("celery_task_expired_total", name=NAME, queue_name=queue) == TASKS,
             30, message="every expiry attributed to its task")
    m = exporter.scrape()
    assert m.find("celery_task_expired_total", name="unknown") == []
    assert m.value("celery_task_revoked_total", name=NAME, hostname=worker.hostname, queue_name=queue) == TASKS
    assert m.value("celery_exporter_unattributed_task_events_total") == 0
    assert m.value("celery_exporter_tracked_tasks") == 0  # no record left waiting for a start
