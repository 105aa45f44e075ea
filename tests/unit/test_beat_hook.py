"""The beat hook on a real ``celery.beat.Scheduler`` (Celery's own class, kombu's in-memory
transport): what it records for each send and entry, and that nothing it does changes
what beat does. The exporter side, with real beat processes on real brokers, is
tests/integration/test_beat.py."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery
from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import crontab, schedule

from celery_health_exporter.hooks.beat import BeatHook, describe, due_after, due_times


@pytest.fixture
def app():
    app = Celery("beat-hook-unit", broker="memory://", set_as_current=False)
    app.conf.update(timezone="Europe/Berlin", beat_schedule={}, task_send_sent_event=False)
    return app


def test_schedules_in_words(app):
    assert describe(schedule(timedelta(seconds=1))) == "every 1 second"
    assert describe(schedule(timedelta(seconds=90))) == "every 90 seconds"
    assert describe(schedule(timedelta(minutes=5))) == "every 5 minutes"
    assert describe(schedule(timedelta(hours=24))) == "every 1 day"
    assert describe(schedule(timedelta(seconds=0.5))) == "every 0.5 seconds"
    assert describe(crontab()) == "crontab * * * * *"
    assert describe(crontab(minute=0, hour=4, day_of_week="mon-fri")) == "crontab 0 4 * * mon-fri"


def test_crontab_due_times_are_exact_in_the_apps_timezone(app):
    daily = crontab(minute=0, hour=4, app=app)  # 04:00 in Berlin: 03:00 or 02:00 UTC
    entry = ScheduleEntry("nightly", "tests.nightly", schedule=daily, app=app)
    due, period = due_times(entry)
    at = datetime.fromtimestamp(due, tz=daily.tz)
    assert (at.hour, at.minute, at.second, at.microsecond) == (4, 0, 0, 0)
    assert time.time() < due <= time.time() + 86400 + 3600 and period in (82800.0, 86400.0, 90000.0)
    every = schedule(timedelta(seconds=30), app=app)
    last = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert due_after(every, last) == last.timestamp() + 30


def scheduler_with(app, entries: dict) -> Scheduler:
    app.conf.beat_schedule = entries
    return Scheduler(app, lazy=False)


def test_every_send_recorded_with_its_due_time_and_beat_unchanged(app):
    sched = scheduler_with(app, {"often": {"task": "tests.often", "schedule": timedelta(seconds=0.2)}})
    hook = BeatHook(app, beat="unit", interval=60)
    hook._start_thread = lambda: None  # no shipping thread: the records are read here
    hook.flush_at_exit = False
    hook.attach(sched)
    deadline = time.monotonic() + 5
    while hook.sends < 3 and time.monotonic() < deadline:
        time.sleep(max(0.0, min(sched.tick(), 0.05)))  # beat's own loop (Service.start sleeps what tick says)
    records = list(hook._pending)
    assert [r["seq"] for r in records][:3] == [1, 2, 3] and all(r["error"] is None for r in records
                                                                  if "error" in r)
    for record in records:
        assert record["entry"] == "often" and record["task"] == "tests.often" and record["id"]
        assert record["due"] <= record["sent"] < record["due"] + 0.5  # sent when due, not before
        assert record["period"] == 0.2 and abs(record["next"] - (record["sent"] + 0.2)) < 0.01
    assert [e["entry"] for e in hook.heartbeat_event()["entries"]] == ["often"]
    assert hook.hook_errors == {}


def test_a_send_that_raises_is_recorded_and_beat_goes_on(app):
    """An argument the serializer refuses: Celery raises SchedulingError out of apply_async and
    apply_entry logs it; the hook counts the send with its error and lets it through."""
    sched = scheduler_with(app, {"broken": {"task": "tests.broken", "schedule": timedelta(seconds=0.1),
                                            "args": (object(),)}})
    hook = BeatHook(app, beat="unit", interval=60)
    hook._start_thread = lambda: None
    hook.flush_at_exit = False
    hook.attach(sched)
    entry = sched.schedule["broken"]
    with pytest.raises(Exception) as raised:
        sched.apply_async(entry, advance=False)
    assert type(raised.value).__name__ == "SchedulingError"
    sched.apply_entry(entry)  # beat's own path: logged there, never raised
    assert [r["error"] for r in hook._pending] == ["SchedulingError", "SchedulingError"]
    assert all(r["id"] is None for r in hook._pending)


def test_a_broken_schedule_is_counted_in_the_hook_and_does_not_stop_the_send(app):
    class Odd(crontab):
        def remaining_delta(self, last_run_at, tz=None, ffwd=None):
            raise ValueError("odd")

    sched = scheduler_with(app, {})
    hook = BeatHook(app, beat="unit", interval=60)
    hook._start_thread = lambda: None
    hook.flush_at_exit = False
    hook.attach(sched)
    entry = ScheduleEntry("odd", "tests.odd", schedule=Odd(app=app), app=app)
    result = sched.apply_async(entry, advance=False)
    assert result.id and hook.sends == 1
    assert hook._pending[0]["due"] is None and hook._pending[0]["id"] == result.id
    assert hook.hook_errors == {"due": 1}


def test_shipping_to_an_unreachable_broker_is_counted_and_keeps_the_sends(app):
    app.conf.broker_url = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens on port 1
    hook = BeatHook(app, beat="unit", interval=60, connect_timeout=0.5)
    hook._pending.append({"entry": "x", "task": "t", "id": "1", "due": 0, "sent": 0, "next": 1, "period": 1,
                          "seq": 1})
    assert hook.ship_sends() is False and hook.ship_heartbeat() is False
    assert hook.hook_errors["ship"] == 2 and len(hook._pending) == 1
