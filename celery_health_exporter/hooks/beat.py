"""Beat hook: what the beat process schedules and sends, shipped to the exporter as Celery events.

One line in the module the beat process imports (``celery -A proj beat``)::

    from celery_health_exporter.hooks.beat import install; install(app)

It works at the level of Celery's ``Scheduler``, whatever stores the schedule
(the default ``PersistentScheduler``'s shelve file, django-celery-beat's
``DatabaseScheduler``, or any other subclass): on ``beat_init`` it wraps the
scheduler instance's ``apply_async`` (every send beat makes goes through it) and
``tick`` (to read the schedule from the scheduler's heap, in beat's own thread:
the hook never reads the storage). It reports (see ``docs/beat.md``):

- ``exporter-beat`` every ``interval`` seconds: the beat is alive, and each entry
  of its schedule (name, task, schedule in words, next due time, period);
- ``exporter-beat-sent`` as soon as beat sent something: per send, the entry, the
  task name and id, the due time, the send time, the next due time, or the
  exception class when the send raised;
- ``exporter-beat-offline`` when the beat process exits cleanly.

The events go out over a connection of the hook's own, from a daemon thread: the
beat loop only appends to a bounded list. Nothing the hook does raises into beat:
its own failures are swallowed and counted (``hook_errors``, shipped too).
It imports nothing but Celery, kombu and the standard library.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from datetime import timedelta

from ._events import EventLink
from .protocol import BEAT_EVENT_FORMAT as FORMAT
from .protocol import BEAT_EVENT_TYPE as EVENT_TYPE
from .protocol import BEAT_OFFLINE_EVENT_TYPE as OFFLINE_EVENT_TYPE
from .protocol import BEAT_SENT_EVENT_TYPE as SENT_EVENT_TYPE

__all__ = ["BeatHook", "install", "describe"]

MAX_ENTRIES = 1000  # entries reported per beat; more are counted in hook_errors["entries_over_limit"]
MAX_PENDING = 10_000  # sends kept while the broker is unreachable; older ones are dropped and counted
MAX_SENDS_PER_EVENT = 200
NOT_EXPECTED_AFTER = 365 * 86400.0  # a due time further away is reported as none
_ATTR = "_celery_health_exporter_beat_hook"

log = logging.getLogger("celery_health_exporter.hooks.beat")


def _plural(n: float, unit: str) -> str:
    n = int(n) if float(n).is_integer() else round(n, 3)
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def describe(schedule) -> str:
    """The schedule in words: ``every 2 seconds``, ``crontab 0 4 * * *`` (minute hour
    day-of-month month day-of-week, as in crontab(5)), ``solar sunset 52.5,13.4``."""
    from celery.schedules import crontab, solar
    from celery.schedules import schedule as interval

    if isinstance(schedule, crontab):
        fields = ("_orig_minute", "_orig_hour", "_orig_day_of_month", "_orig_month_of_year", "_orig_day_of_week")
        return "crontab " + " ".join(str(getattr(schedule, f, "?")) for f in fields)
    if isinstance(schedule, solar):
        return f"solar {schedule.event} {schedule.lat},{schedule.lon}"
    if isinstance(schedule, interval):
        seconds = schedule.run_every.total_seconds()
        for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
            if seconds >= size and (seconds / size).is_integer():
                return "every " + _plural(seconds / size, unit)
        return "every " + _plural(seconds, "second")
    return f"{type(schedule).__name__} {schedule}"[:200]


def _seconds(delta) -> float:
    return delta.total_seconds() if isinstance(delta, timedelta) else float(delta)


def due_after(schedule, last_run_at) -> float:
    """The Unix time ``schedule`` is due after a run at ``last_run_at``: exact (a crontab's
    due times fall on whole minutes), computed as Celery's ``remaining_estimate`` does."""
    from celery.utils.time import remaining

    if hasattr(schedule, "remaining_delta"):  # crontab and its subclasses (django-celery-beat's too)
        start, ends_in, now = schedule.remaining_delta(last_run_at)
        return (now + remaining(start, ends_in, now)).timestamp()
    run_every = getattr(schedule, "run_every", None)
    if isinstance(run_every, timedelta) and hasattr(schedule, "maybe_make_aware"):  # an interval
        return (schedule.maybe_make_aware(last_run_at) + run_every).timestamp()
    now = time.time()
    return now + _seconds(schedule.remaining_estimate(last_run_at))  # solar, clocked, others


def due_times(entry) -> tuple[float, float | None]:
    """(the entry's due time, the period of its schedule after it), in Unix time.
    The due time follows from the entry's last run (what beat's heap holds)."""
    schedule = entry.schedule
    due = due_after(schedule, entry.last_run_at)
    return due, period_after(schedule, due)


def period_after(schedule, due: float) -> float | None:
    """Seconds from the due time ``due`` to the one after it (a crontab's gaps vary)."""
    from datetime import datetime, timezone

    run_every = getattr(schedule, "run_every", None)
    if isinstance(run_every, timedelta) and not hasattr(schedule, "remaining_delta"):
        return run_every.total_seconds()  # an interval
    try:
        at = datetime.fromtimestamp(due, tz=getattr(schedule, "tz", None) or timezone.utc)
        following = due_after(schedule, at)
    except Exception:
        return None
    return following - due if following > due else None


class BeatHook:
    """The schedule and sends of one beat process, and the thread that ships them. Use ``install()``."""

    def __init__(self, app, *, interval: float = 10.0, beat: str | None = None, connect_timeout: float = 2.0):
        self.app = app
        self.interval = float(interval) if interval and interval > 0 else 10.0
        self.beat = beat if isinstance(beat, str) and beat else socket.gethostname()
        self.instance = uuid.uuid4().hex
        self.started_at = time.time()
        self.scheduler_class = None
        self.hook_errors: dict[str, int] = {}
        self.shipped = 0
        self.sends = 0  # sends made (successful or not)
        self._seq = 0
        self._lock = threading.Lock()
        self._ship_lock = threading.Lock()
        self._pending: deque = deque()
        self._entries: list[dict] = []
        self._entries_at = 0.0
        self._heap_seen = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._link = EventLink(app, connect_timeout)
        self.scheduler = None

    # ------------------------------------------------------------- install
    def install(self) -> "BeatHook":
        from celery import signals

        ref = weakref.ref(self)
        signals.beat_init.connect(lambda sender=None, **kw: _call(ref, "on_beat_init", sender), weak=False)
        return self

    def on_beat_init(self, service) -> None:
        if getattr(service, "app", self.app) is not self.app and getattr(service.app, "main", None) != self.app.main:
            return  # another app's beat in this process
        self.attach(service.scheduler)

    def attach(self, scheduler) -> None:
        """Wrap this scheduler instance's ``apply_async`` and ``tick`` and start shipping."""
        if getattr(scheduler, _ATTR, None) is self:
            return
        self.scheduler = scheduler
        self.scheduler_class = f"{type(scheduler).__module__}.{type(scheduler).__qualname__}"
        scheduler.apply_async = self._wrap_apply_async(scheduler.apply_async)
        scheduler.tick = self._wrap_tick(scheduler.tick)
        setattr(scheduler, _ATTR, self)
        self._start_thread()
        if self.flush_at_exit:
            atexit.register(_call, weakref.ref(self), "_at_exit")

    flush_at_exit = True

    def _wrap_apply_async(self, apply_async):
        hook = self

        def wrapped(entry, *args, **kwargs):
            try:
                due, period = due_times(entry)
            except Exception:
                hook._internal_error("due")
                due = period = None
            try:
                result = apply_async(entry, *args, **kwargs)
            except BaseException as exc:
                hook._record_send(entry, due, period, None, type(exc).__name__)
                raise
            hook._record_send(entry, due, period, getattr(result, "id", None), None)
            return result

        wrapped.__wrapped__ = apply_async
        return wrapped

    def _wrap_tick(self, tick):
        hook = self

        def wrapped(*args, **kwargs):
            result = tick(*args, **kwargs)
            try:
                heap = getattr(hook.scheduler, "_heap", None)
                if heap is not hook._heap_seen or time.monotonic() - hook._entries_at >= hook.interval / 2:
                    hook._heap_seen = heap
                    hook._snapshot_entries(heap)
            except Exception:
                hook._internal_error("entries")
            return result

        wrapped.__wrapped__ = tick
        return wrapped

    # ----------------------------------------------------------- recording
    def _record_send(self, entry, due, period, task_id, error) -> None:
        try:
            sent = time.time()
            try:
                next_due = due_after(entry.schedule, entry.schedule.now())
            except Exception:
                next_due = None
            record = {"entry": str(entry.name), "task": str(entry.task), "id": task_id, "due": due,
                      "sent": sent, "next": next_due, "period": period}
            if error is not None:
                record["error"] = error
            with self._lock:
                self._seq += 1
                record["seq"] = self._seq
                self.sends += 1
                if len(self._pending) >= MAX_PENDING:
                    self._pending.popleft()
                    self.hook_errors["dropped"] = self.hook_errors.get("dropped", 0) + 1
                self._pending.append(record)
            self._wake.set()
        except Exception:
            self._internal_error("record")

    def _snapshot_entries(self, heap) -> None:
        """The schedule as beat's heap holds it (read in beat's thread, never from the storage)."""
        entries = []
        now = time.time()
        for event in list(heap or ()):
            entry = event[2]
            if len(entries) >= MAX_ENTRIES:
                self._internal_error("entries_over_limit")
                break
            try:
                due, period = due_times(entry)
                words = describe(entry.schedule)
            except Exception:
                self._internal_error("entry")
                continue
            when = event[0]  # beat's own time for it (Unix time): later when is_due holds it back
            if isinstance(when, (int, float)) and when - due > 1.0:  # (django-celery-beat's start_time)
                due = float(when)
            if due > now + NOT_EXPECTED_AFTER:  # held back for good (an expired django-celery-beat task)
                due = None
            entries.append({"entry": str(entry.name), "task": str(entry.task), "schedule": words,
                            "next": due, "period": period})
        self._entries = entries
        self._entries_at = time.monotonic()

    def _internal_error(self, stage: str) -> None:
        try:
            with self._lock:
                self.hook_errors[stage] = self.hook_errors.get(stage, 0) + 1
        except Exception:
            pass

    # ------------------------------------------------------------ events
    def _envelope(self, kind: str) -> dict:
        from celery.utils.time import utcoffset

        with self._lock:
            hook_errors = dict(self.hook_errors)
        return {"type": kind, "hostname": self.beat, "timestamp": time.time(), "utcoffset": utcoffset(),
                "pid": os.getpid(), "clock": 0, "format": FORMAT, "instance": self.instance,
                "interval": self.interval, "started": self.started_at, "hook_errors": hook_errors}

    def heartbeat_event(self) -> dict:
        return {**self._envelope(EVENT_TYPE), "scheduler": self.scheduler_class, "entries": list(self._entries),
                "sends": self.sends}

    # ------------------------------------------------------------ shipping
    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=_run, args=(weakref.ref(self), self._stop, self._wake),
                                            name="celery-health-exporter-beat", daemon=True)
        self._thread.start()

    def ship_sends(self) -> bool:
        """Ship the pending sends; they stay pending when the broker is unreachable."""
        while True:
            with self._lock:
                batch = [self._pending[i] for i in range(min(len(self._pending), MAX_SENDS_PER_EVENT))]
            if not batch:
                return True
            if not self._publish({**self._envelope(SENT_EVENT_TYPE), "sends": batch}):
                return False
            with self._lock:
                for _ in batch:  # only this thread removes: the first len(batch) are the ones sent
                    self._pending.popleft()

    def ship_heartbeat(self) -> bool:
        return self._publish(self.heartbeat_event())

    def _publish(self, body: dict) -> bool:
        try:
            with self._ship_lock:
                self._link.publish(body, body["type"].replace("-", "."), self.beat)
                self.shipped += 1
            return True
        except Exception:
            self._internal_error("ship")
            return False

    def stop(self, offline: bool = True, timeout: float = 2.0) -> None:
        """Stop the thread, ship what is pending, and say the beat is gone."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if isinstance(thread, threading.Thread) and thread is not threading.current_thread():
            thread.join(timeout)
        self.ship_sends()
        if offline:
            self._publish(self._envelope(OFFLINE_EVENT_TYPE))
        self._link.close()

    def _at_exit(self) -> None:
        if self._thread is not None and not self._stop.is_set():
            self.stop(offline=True, timeout=1.0)


def _call(ref, method: str, *args) -> None:
    hook = ref()
    if hook is not None:
        try:
            getattr(hook, method)(*args)
        except Exception:
            try:
                hook._internal_error(method)
            except Exception:
                pass


def _run(ref, stop: threading.Event, wake: threading.Event) -> None:
    """The shipping loop: sends at once, the heartbeat every interval (the hook held weakly)."""
    next_heartbeat = 0.0
    while not stop.is_set():
        hook = ref()
        if hook is None:
            return
        try:
            wake.clear()
            if hook._pending:
                hook.ship_sends()
            if time.monotonic() >= next_heartbeat:
                hook.ship_heartbeat()
                next_heartbeat = time.monotonic() + hook.interval
            wait = max(0.05, next_heartbeat - time.monotonic())
            if hook._pending:  # the broker refused: try again soon, not at once
                wait = min(wait, 1.0)
        except Exception:
            hook._internal_error("loop")
            wait = 1.0
        del hook
        wake.wait(wait)


def install(app, interval: float = 10, beat: str | None = None, **options) -> BeatHook | None:
    """Report the schedule and the sends of the beat that runs ``app`` in this process.

    ``beat`` is the label the exporter shows (default: this host's name; two beat
    processes under one label still count as two instances). ``interval``: seconds
    between liveness reports (the exporter's ``--beat-timeout`` must be longer).
    Options: ``connect_timeout``. Calling it again for the same app returns the
    same hook. Importing this module in a process that runs no beat costs nothing:
    the hook starts at ``beat_init``. Never raises: on an internal error it logs one
    warning and returns None.
    """
    try:
        existing = getattr(app, _ATTR, None)
        if existing is not None:
            return existing
        hook = BeatHook(app, interval=interval, beat=beat, **options).install()
        setattr(app, _ATTR, hook)
        return hook
    except Exception as exc:  # beat must start whatever happens here
        log.warning("celery-health-exporter beat hook not installed: %s: %s", type(exc).__name__, exc)
        return None
