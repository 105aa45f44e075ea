"""The Celery app of the RabbitMQ-as-production tests (TLS, least privilege, quorum queues).

Broker from TEST_BROKER_URL; TLS options as JSON in TEST_BROKER_USE_SSL (py-amqp
reads none from the URL); TEST_QUEUE_TYPE=quorum declares every task queue as a
quorum queue, the way Celery 5.5+ clusters run.
"""
import json
import os
import ssl
import threading

from celery import Celery

_CERT_REQS = {"CERT_NONE": ssl.CERT_NONE, "CERT_OPTIONAL": ssl.CERT_OPTIONAL, "CERT_REQUIRED": ssl.CERT_REQUIRED}


def configure(app: Celery, use_ssl: dict | None, queue_type: str) -> Celery:
    if use_ssl:
        app.conf.broker_use_ssl = {k: _CERT_REQS.get(v, v) if k == "cert_reqs" else v for k, v in use_ssl.items()}
    app.conf.update(task_send_sent_event=True, result_backend=None, broker_connection_retry_on_startup=True,
                    task_default_queue_type=queue_type, task_create_missing_queue_type=queue_type)
    return app


app = configure(Celery("rabbitapp", broker=os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")),
                json.loads(os.environ.get("TEST_BROKER_USE_SSL") or "null"), os.environ.get("TEST_QUEUE_TYPE", "classic"))
app.conf.update(worker_send_task_events=True, worker_hijack_root_logger=False, worker_prefetch_multiplier=1)

_never = threading.Event()


@app.task(name="rabbit.add")
def add(x, y):
    return x + y


@app.task(name="rabbit.hold", acks_late=True)
def hold():
    """Runs until the worker is killed: its message stays delivered and unacked."""
    _never.wait()


def client(broker_url: str, use_ssl: dict | None = None, queue_type: str = "classic") -> Celery:
    """A publisher that declares queues as the workers do (a quorum queue redeclared classic is refused)."""
    return configure(Celery("rabbit-publisher", broker=broker_url, set_as_current=False), use_ssl, queue_type)


def publish_workload(publisher: Celery, *, holes: int, hold: bool) -> None:
    """What the RabbitMQ tests watch: three tasks on "work", ``holes`` on "hole" (a queue
    nobody consumes) and, with ``hold``, one on "work" that stays delivered and unacked."""
    for i in range(3):
        publisher.send_task("rabbit.add", args=(i, i), queue="work")
    for _ in range(holes):
        publisher.send_task("rabbit.add", args=(0, 0), queue="hole")
    if hold:
        publisher.send_task("rabbit.hold", queue="work")


def worked(m, hostname: str, *, holes: int) -> bool:
    """The workload seen in a scrape: the three tasks counted, the hole's length, a consumer on "work"."""
    return (m.value("celery_task_succeeded_total", name="rabbit.add", hostname=hostname, queue_name="work") == 3
            and m.value("celery_queue_length", queue_name="hole") == holes
            and m.value("celery_active_consumer_count", queue_name="work") == 1)
