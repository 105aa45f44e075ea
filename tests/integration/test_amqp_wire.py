"""FrameReader on a live connection to this machine's RabbitMQ: it installs on the plain
TCP connection kombu opens for the events source, reads the events Celery's own
dispatcher publishes, and py-amqp's synchronous requests and the clean close read their
answers through it. The unit side of the same contract: tests/unit/test_amqp_contract.py.
"""
from __future__ import annotations

import socket
import uuid

import pytest
from celery import Celery
from celery.events.event import get_exchange
from kombu import Queue

from celery_health_exporter.sources.amqp_wire import FrameReader
from celery_health_exporter.state.events import decode_body
from tests.harness import make_amqp_broker, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def amqp_broker():
    broker = make_amqp_broker()
    yield broker
    broker.close()


def test_frame_reader_installs_on_a_live_connection_and_reads_events(amqp_broker):
    app = Celery("wire", broker=amqp_broker.url, set_as_current=False)
    app.conf.event_serializer = "json"
    task_ids = [str(uuid.uuid4()) for _ in range(50)]
    with app.connection_for_read(heartbeat=10, connect_timeout=5) as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.channel()
        queue = Queue(f"celeryev.wire-{uuid.uuid4().hex[:8]}", exchange=get_exchange(connection),
                      routing_key="#", auto_delete=True)
        queue(channel).declare()
        messages = []
        channel.basic_consume(queue=queue.name, no_ack=True, callback=messages.append)  # py-amqp messages
        amqp_connection = connection.connection
        reader = FrameReader.install(amqp_connection)
        assert reader is not None, "a plain amqp:// connection has no TCPTransport: FrameReader did not install"
        assert amqp_connection.transport.read_frame == reader.read_frame

        # a worker's dispatcher with its task buffer (task.multi batches), as prefork workers send
        with app.connection_for_write() as publish_connection:
            dispatcher = app.events.Dispatcher(publish_connection, hostname="wire@test", buffer_group={"task"},
                                               buffer_limit=10)
            for task_id in task_ids:
                dispatcher.send("task-succeeded", uuid=task_id, result="'ok'", runtime=0.01)
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=len(task_ids))
            dispatcher.flush()
            dispatcher.close()

        def received():
            try:
                reader.drain(amqp_connection, 0.2)
            except socket.timeout:
                pass
            events = [e for m in messages for e in decode_body(m.body)]
            return events if len(events) >= len(task_ids) + 1 else None

        events = wait_for(received, 20, 0.05, message="the published events through FrameReader")
        assert sorted(e["uuid"] for e in events if e["type"] == "task-succeeded") == sorted(task_ids)
        assert [e["hostname"] for e in events if e["type"] == "worker-heartbeat"] == ["wire@test"]
        assert any(m.delivery_info["routing_key"] == "task.multi" for m in messages)

        # py-amqp's own synchronous wait (a passive declare's answer) reads through FrameReader
        frames_before = amqp_connection.bytes_recv
        _, ready, consumers = channel.queue_declare(queue=queue.name, passive=True)
        assert (ready, consumers) == (0, 1)
        assert amqp_connection.bytes_recv > frames_before
        assert amqp_connection.transport.read_frame == reader.read_frame
        connection.heartbeat_check()
        channel.close()  # the close-ok too
    assert not reader.pending
