"""The Celery app the integration tests run in real workers.

Broker from TEST_BROKER_URL; each test gets its own vhost / Redis db.
"""
import os
import threading
import time

from celery import Celery

app = Celery("testapp", broker=os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_send_sent_event=True,
    worker_send_task_events=os.environ.get("TEST_TASK_EVENTS", "1") == "1",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue=os.environ.get("TEST_DEFAULT_QUEUE", "celery"),
    result_backend=None,
    worker_prefetch_multiplier=1,
)


class CustomError(Exception):
    pass


@app.task(name="tests.add")
def add(x, y):
    return x + y


@app.task(name="tests.fail")
def fail(message="boom"):
    raise CustomError(message)


@app.task(name="tests.retry_once", bind=True, max_retries=3, default_retry_delay=0)
def retry_once(self):
    if self.request.retries == 0:
        raise self.retry(exc=CustomError("again"), countdown=0)
    return "done"


@app.task(name="tests.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds


_never = threading.Event()


@app.task(name="tests.block")
def block():
    _never.wait()


@app.task(name="tests.reject", bind=True, acks_late=True)
def reject(self):
    from celery.exceptions import Reject

    raise Reject("not for us", requeue=False)


def client(broker_url: str) -> Celery:
    """A publisher app for the tests: same task names, sent events on."""
    publisher = Celery("test-publisher", broker=broker_url, set_as_current=False)
    publisher.conf.update(task_send_sent_event=True, result_backend=None, broker_connection_retry_on_startup=True)
    return publisher


class UnpicklableError(Exception):
    """Needs two arguments: pickling keeps only args, so unpickling fails."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@app.task(name="tests.retry_unpicklable", bind=True, max_retries=1, default_retry_delay=0)
def retry_unpicklable(self):
    if self.request.retries == 0:
        raise self.retry(exc=UnpicklableError(1, "nope"), countdown=0)
    return "ok"


@app.task(name="tests.allocate")
def allocate(megabytes):
    """Grow the child's memory (for max-memory-per-child recycling)."""
    blob = bytearray(megabytes * 1024 * 1024)
    return len(blob)


if os.environ.get("TEST_WORKER_HOOK") == "1":
    import celery_health_exporter.hooks.worker  # noqa: F401,E402


@app.task(name="tests.record_pid")
def record_pid(key):
    """Ground truth for recycling tests: which pool child ran each task (a Redis list)."""
    import redis

    redis.Redis.from_url(os.environ["TEST_PID_LOG"]).rpush(key, os.getpid())
