"""A Celery app for the host-agent tests (run by real prefork workers).

``HOSTAPP_KEEP_CHILDREN=1`` undoes, in each pool child, the parent-death
signal that Celery 5.3+ sets (``platforms.set_pdeathsig('SIGKILL')`` in
``process_initializer``): the children then outlive a SIGKILLed main process
exactly as they do on Celery <= 5.2 or under process managers that leave them
behind, which gives the tests real orphans to find.
"""
import os
import time

from celery import Celery
from celery.signals import worker_process_init

app = Celery("hostapp", broker=os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    worker_send_task_events=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue=os.environ.get("TEST_DEFAULT_QUEUE", "celery"),
    result_backend=None,
    worker_prefetch_multiplier=1,
)


@worker_process_init.connect
def _keep_children_after_main_death(**_):
    if os.environ.get("HOSTAPP_KEEP_CHILDREN") == "1":
        from billiard.util import set_pdeathsig

        set_pdeathsig(0)  # 0 = no signal when the parent dies (the pre-5.3 behaviour)


@app.task(name="hostapp.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="hostapp.allocate")
def allocate(megabytes, seconds=0.0):
    """Grow this pool child's RSS by ``megabytes`` (kept until the child exits)."""
    _ballast.append(bytearray(megabytes * 1024 * 1024))
    time.sleep(seconds)
    return len(_ballast)


_ballast = []
