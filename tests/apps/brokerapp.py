"""The Celery app of the broker-poller tests: tasks that hold their message unacked.

Broker from TEST_BROKER_URL; transport options (visibility_timeout,
global_keyprefix, how often kombu restores unacked messages...) as JSON in
TEST_TRANSPORT_OPTIONS, so that the worker and the publisher agree with the
exporter's ``--broker-transport-option``.
"""
import json
import os
import threading

from celery import Celery

TRANSPORT_OPTIONS = json.loads(os.environ.get("TEST_TRANSPORT_OPTIONS") or "{}")

app = Celery("brokerapp", broker=os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_send_sent_event=True,
    worker_send_task_events=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_backend=None,
    worker_prefetch_multiplier=1,
    broker_transport_options=TRANSPORT_OPTIONS,
)

_never = threading.Event()


@app.task(name="brokers.hold", acks_late=True)
def hold():
    """Runs until the worker is killed: its message stays delivered and unacked."""
    _never.wait()


@app.task(name="brokers.noop")
def noop():
    return None


def client(broker_url: str, transport_options: dict | None = None) -> Celery:
    """A publisher with the same transport options as the workers and the exporter."""
    publisher = Celery("broker-publisher", broker=broker_url, set_as_current=False)
    publisher.conf.update(task_send_sent_event=True, result_backend=None, broker_connection_retry_on_startup=True,
                          broker_transport_options=dict(transport_options or {}))
    return publisher


def publish_with(python: str, broker_url: str, transport_options: dict, queue: str, priorities) -> None:
    """Publish ``brokers.noop`` once per priority from another interpreter (another kombu), the
    way ``client(...).send_task`` does here: what the exporter reads is what that kombu wrote."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent.parent
    subprocess.run([python, "-m", "tests.apps.brokerapp", broker_url, json.dumps(transport_options), queue,
                    *map(str, priorities)], cwd=root, check=True, timeout=60)


if __name__ == "__main__":  # python -m tests.apps.brokerapp URL OPTIONS_JSON QUEUE PRIORITY...
    import sys

    url, options, queue, *priorities = sys.argv[1:]
    publisher = client(url, json.loads(options))
    for priority in priorities:
        publisher.send_task("brokers.noop", queue=queue, priority=int(priority))
