"""The loss path on the real RabbitMQ: what the broker drops from our event queue is counted.

An exporter behind a small ``--event-queue-max-length`` is frozen (SIGSTOP) while
Celery's own EventDispatcher publishes far more event messages than its socket
buffers and its queue can hold. RabbitMQ drops the oldest ones (``x-max-length``,
drop-head); the exporter, once thawed, must report exactly that many in
``celery_exporter_events_lost_messages_total{reason="queue_dropped_own"}`` and count
every event it did get exactly once.

Then the management API is made to hang: event intake must not wait for it.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid

import pytest
from celery import Celery

from celery_health_exporter.broker import make_app
from celery_health_exporter.config import Config
from celery_health_exporter.sources.events import QUEUE_STATS_INTERVAL, EventsSource
from celery_health_exporter.state.model import ClusterState
from tests.harness import HOST, RABBITMQ_API, make_amqp_broker, rabbitmq_api, wait_for

pytestmark = pytest.mark.integration

MAX_LENGTH = 100
TASKS = 10_000  # 40,000 messages: far more than the exporter's socket buffers (8 MiB) and its queue hold
TYPES = ("task-sent", "task-received", "task-started", "task-succeeded")
METRIC = {"task-sent": "celery_task_sent_total", "task-received": "celery_task_received_total",
          "task-started": "celery_task_started_total", "task-succeeded": "celery_task_succeeded_total"}
QUICK = ("--inspect-interval", "0", "--no-broker-poll")  # only the events source is under test


@pytest.fixture
def amqp():
    broker = make_amqp_broker()
    yield broker
    broker.close()


class Publisher:
    """Real-format task events through Celery's own EventDispatcher, one message per
    event (no buffer_group), in one order: task-sent from a publisher, the rest from
    a worker, over one producer (one channel, so RabbitMQ keeps the order)."""

    def __init__(self, broker_url: str):
        self.app = Celery("loss-events", broker=broker_url, set_as_current=False)
        self.app.conf.event_serializer = "json"
        # py-amqp's TCP_USER_TIMEOUT of 1 s would cut a blast that RabbitMQ holds back a little longer
        self.app.conf.broker_transport_options = {"socket_settings": {socket.TCP_USER_TIMEOUT: 60_000}}
        self.connection = self.app.connection_for_write()
        self.connection.ensure_connection(max_retries=3)
        self.publisher = self.app.events.Dispatcher(self.connection, hostname=f"gen{os.getpid()}@{HOST}")
        self.worker = self.app.events.Dispatcher(self.connection, hostname=f"loss-w@{HOST}")
        self.worker.producer = self.publisher.producer
        self.sent: list[str] = []  # event types, in publish order

    def tasks(self, count: int) -> None:
        for i in range(count):
            task_id = str(uuid.uuid4())
            name = f"tests.loss.job{i % 5}"
            self.publisher.send("task-sent", uuid=task_id, name=name, args="()", kwargs="{}", retries=0,
                                eta=None, expires=None, queue="q-loss", exchange="", routing_key="q-loss")
            self.worker.send("task-received", uuid=task_id, name=name, args="()", kwargs="{}", retries=0,
                             eta=None, expires=None)
            self.worker.send("task-started", uuid=task_id)
            self.worker.send("task-succeeded", uuid=task_id, result="'ok'", runtime=0.01)
            self.sent += TYPES

    def close(self):
        self.publisher.close()
        self.worker.close()
        self.connection.release()


def own_queue(vhost: str) -> dict:
    queues = rabbitmq_api("GET", f"/api/queues/{vhost}")
    mine = [q for q in queues if q["name"].startswith("celeryev.celery-health-exporter.")]
    assert len(mine) == 1, [q["name"] for q in queues]
    return mine[0]


def test_messages_rabbitmq_drops_from_our_queue_are_counted_exactly(amqp, make_exporter):
    exporter = make_exporter(amqp.url, "--rabbitmq-management-url", RABBITMQ_API,
                             "--event-queue-max-length", str(MAX_LENGTH), *QUICK)
    assert own_queue(amqp.vhost)["arguments"]["x-max-length"] == MAX_LENGTH
    publisher = Publisher(amqp.url)
    os.kill(exporter.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        publisher.tasks(TASKS)
        publish_seconds = time.monotonic() - started
    finally:
        os.kill(exporter.proc.pid, signal.SIGCONT)
        publisher.close()
    published = len(publisher.sent)

    def settled():
        m = exporter.scrape()
        counted = int(m.sum("celery_exporter_events_total"))
        lost = m.value("celery_exporter_events_lost_messages_total", reason="queue_dropped_own")
        return lost is not None and lost == published - counted and (m, counted, int(lost))
    # Credited when two polls of the API, QUEUE_STATS_INTERVAL apart, agree: the second poll after
    # the storm, 15-30 s from the exporter's start.
    m, counted, lost = wait_for(settled, 3 * QUEUE_STATS_INTERVAL + 5, interval=0.5,
                                message="the dropped messages credited")
    queue = own_queue(amqp.vhost)
    print(f"published {published} messages in {publish_seconds:.1f}s; the exporter counted {counted}, "
          f"reports {lost} lost; RabbitMQ: publish {queue['message_stats']['publish']}, "
          f"deliver_get {queue['message_stats']['deliver_get']}, queued {queue['messages']}")

    assert lost > 0 and counted >= MAX_LENGTH  # RabbitMQ dropped some, kept at least the newest 100
    assert queue["messages"] == 0 and queue["message_stats"]["publish"] == published
    assert queue["message_stats"]["deliver_get"] == counted  # every delivered message counted once
    assert m.value("celery_exporter_events_malformed_total", reason="json") is None

    # Delivered = what went out before the socket filled (a prefix of the stream) and the
    # newest MAX_LENGTH that the queue kept (drop-head): each of those events counted once.
    delivered = publisher.sent[:counted - MAX_LENGTH] + publisher.sent[-MAX_LENGTH:]
    for kind in TYPES:
        assert m.sum("celery_exporter_events_total", type=kind) == delivered.count(kind), kind
        assert m.sum(METRIC[kind]) == delivered.count(kind), kind
    # the rest stays put: a later poll credits nothing more
    assert exporter.scrape().value("celery_exporter_events_lost_messages_total", reason="queue_dropped_own") == lost


class HungApi:
    """A management API that never finishes its answer: it drips one byte of a header
    every 0.5 s, so the client's 2 s read timeout never fires (a proxy or an API
    under load can do this)."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self._closed.wait(0.5):
                conn.sendall(b"x")
        except OSError:
            pass

    def close(self):
        self._closed.set()
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def test_a_hung_management_api_never_stalls_event_intake(amqp):
    api = HungApi()
    config = Config(broker_url=amqp.url, rabbitmq_management_url=api.url, inspect_interval=0)
    source = EventsSource(config, ClusterState(), make_app(config))
    source.start()
    try:
        wait_for(lambda: source.health.up, 20, message="events source consuming")
        wait_for(lambda: api.accepted, 10, message="a request to the management API under way")
        publisher = Publisher(amqp.url)
        try:
            for round_ in range(3):  # ~2 s, all of it with the request hanging
                publisher.tasks(20)
                expected = len(publisher.sent)
                waited = time.monotonic()
                wait_for(lambda: source.ingest.messages == expected, 5, interval=0.01,
                         message=f"round {round_}: every event applied")
                assert time.monotonic() - waited < 0.5  # not held behind the request
                time.sleep(0.6)
        finally:
            publisher.close()
        assert len(api.accepted) == 1 and source._drops_thread.is_alive()  # still in that one request
        assert source.ingest.lost_messages == {}
    finally:
        started = time.monotonic()
        source.stop()
        stopped_in = time.monotonic() - started
        api.close()
    assert stopped_in <= source.stop_timeout + 0.2, stopped_in
    assert not source._thread.is_alive()
    source._drops_thread.join(2.0)  # the request fails once the API goes; the thread sees the stop
    assert not source._drops_thread.is_alive()


def test_without_management_access_no_thread_reads_drops(amqp):
    for config in (Config(broker_url=amqp.url, inspect_interval=0),
                   Config(broker_url="redis://127.0.0.1:6379/0", rabbitmq_management_url=RABBITMQ_API)):
        source = EventsSource(config, ClusterState(), make_app(config))
        assert source._management is None
        source.start()
        try:
            assert source._drops_thread is None
            assert not any(t.name == "events-queue-drops" for t in threading.enumerate())
        finally:
            source.stop()
