"""The Celery app of the beat tests: a beat schedule of short entries, the beat hook installed.

``celery -A tests.apps.beatapp beat`` runs its beat, ``celery -A tests.apps.beatapp worker``
its tasks. Broker from TEST_BROKER_URL; the hook's label from TEST_BEAT_NAME and its
report interval from TEST_BEAT_INTERVAL (seconds); TEST_BEAT_ENTRIES (comma-separated)
keeps only those entries of the schedule (default: all).

Entries (every task name belongs to one entry, so the task-sent events of a name are
the sends of that entry):

- ``every-second``: ``tests.beat.tick`` every second;
- ``always-fails``: ``tests.beat.fail`` every second, raises every time;
- ``every-minute``: ``tests.beat.minutely``, ``crontab()`` (each minute, on the minute).
"""
import os
from datetime import timedelta

from celery import Celery
from celery.schedules import crontab

from celery_health_exporter.hooks.beat import install

app = Celery("beatapp", broker=os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_send_sent_event=True,
    worker_send_task_events=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_backend=None,
    worker_prefetch_multiplier=1,
    timezone="UTC",
)
SCHEDULE = {
    "every-second": {"task": "tests.beat.tick", "schedule": timedelta(seconds=1)},
    "always-fails": {"task": "tests.beat.fail", "schedule": timedelta(seconds=1)},
    "every-minute": {"task": "tests.beat.minutely", "schedule": crontab()},
}
_only = [name for name in os.environ.get("TEST_BEAT_ENTRIES", "").split(",") if name]
app.conf.beat_schedule = {name: entry for name, entry in SCHEDULE.items() if not _only or name in _only}

install(app, interval=float(os.environ.get("TEST_BEAT_INTERVAL", "10")), beat=os.environ.get("TEST_BEAT_NAME"))


class PeriodicError(Exception):
    pass


@app.task(name="tests.beat.tick")
def tick():
    return "tick"


@app.task(name="tests.beat.fail")
def fail():
    raise PeriodicError("this periodic task always fails")


@app.task(name="tests.beat.minutely")
def minutely():
    return "minute"
