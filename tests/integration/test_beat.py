"""Periodic tasks with real ``celery beat`` processes, real workers and the exporter, on both brokers.

The schedule (tests/apps/beatapp.py): ``every-second`` (tests.beat.tick, 1 s), ``always-fails``
(tests.beat.fail, 1 s, raises every time) and ``every-minute`` (tests.beat.minutely, ``crontab()``).
Ground truth is the broker's own event stream, read by a receiver of the test's (``EventTally``):
every task-sent event of a task name is a send of its entry (each name belongs to one entry),
every task-failed event of those ids a failure. The crontab entry fires once a minute, too slow
to wait for: its schedule in words and its next due time (on a minute boundary, within the next
minute) are checked instead.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import pytest
from celery import Celery

from tests.harness import ROOT, wait_for

pytestmark = pytest.mark.integration

HOOK_INTERVAL = 0.5  # the hook's report interval in the test beats
BEAT_TIMEOUT = 2.0
MISSED_GRACE = 1.0
EXPORTER_FLAGS = ("--no-broker-poll", "--inspect-interval", "0", "--beat-timeout", str(BEAT_TIMEOUT),
                  "--beat-missed-grace", str(MISSED_GRACE))
TICK = {"entry": "every-second", "name": "tests.beat.tick"}
FAILS = {"entry": "always-fails", "name": "tests.beat.fail"}
MINUTELY = {"entry": "every-minute", "name": "tests.beat.minutely"}


class BeatProcess:
    """A real ``celery beat`` in its own process group, with the beat hook (label ``name``)."""

    def __init__(self, broker_url: str, name: str, tmp_path, *, app: str = "tests.apps.beatapp",
                 scheduler: str | None = None, env: dict | None = None, python: str | None = None):
        self.name = name
        self.log_path = tmp_path / f"beat-{name}.log"
        self.log_file = open(self.log_path, "ab")
        args = [python or sys.executable, "-m", "celery", "-A", app, "beat", "--pidfile=", "-l", "info"]
        args += ["-S", scheduler] if scheduler else ["-s", str(tmp_path / f"schedule-{name}")]
        self.proc = subprocess.Popen(
            args, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "TEST_BROKER_URL": broker_url, "TEST_BEAT_NAME": name,
                 "TEST_BEAT_INTERVAL": str(HOOK_INTERVAL), **(env or {})})

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"beat {self.name} did not stop within {timeout}s of SIGTERM:\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log_file.close()


class EventTally:
    """Every task event on the broker, counted by (event type, task name), apart from the exporter."""

    def __init__(self, broker_url: str):
        self.app = Celery("tally", broker=broker_url, set_as_current=False)
        self.counts: Counter = Counter()
        self.names: dict[str, str] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.receiver = None
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.ready.is_set() or self.error, 20, message="event receiver consuming")
        assert self.error is None, self.error

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as conn:
                receiver = self.app.events.Receiver(conn, handlers={"*": self._on})
                consume_ready = receiver.on_consume_ready

                def on_consume_ready(*args, **kwargs):
                    consume_ready(*args, **kwargs)
                    self.ready.set()

                receiver.on_consume_ready = on_consume_ready
                self.receiver = receiver
                receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception as exc:  # reported by the test's next read
            self.error = exc

    def _on(self, event: dict) -> None:
        kind, task_id = event.get("type", ""), event.get("uuid")
        if not kind.startswith("task-") or not task_id:
            return
        with self.lock:
            if event.get("name"):
                self.names[task_id] = event["name"]
            self.counts[(kind, self.names.get(task_id))] += 1

    def count(self, kind: str, name: str) -> int:
        assert self.error is None, self.error
        with self.lock:
            return self.counts[(kind, name)]

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)


@pytest.fixture
def tally(broker):
    t = EventTally(broker.url)
    yield t
    t.close()


@pytest.fixture
def make_beat(tmp_path):
    started = []

    def start(broker_url, name, **kwargs):
        beat = BeatProcess(broker_url, name, tmp_path, **kwargs)
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.close()


def value(exporter, metric, **labels):
    return exporter.scrape().value(metric, **labels)


def at_least(exporter, metric, n, **labels):
    found = value(exporter, metric, **labels)
    return found is not None and found >= n and found


def wait_quiet_phase(exporter, *entries):
    """Until the last sends of the 1-second entries are 0.25 to 0.6 s old: beat is asleep
    and its hook has shipped them, so a SIGKILL now loses no send."""
    def quiet():
        m = exporter.scrape()
        ages = [time.time() - m.value("celery_beat_entry_last_run_timestamp_seconds", **e) for e in entries]
        return all(0.25 <= age <= 0.6 for age in ages)
    wait_for(quiet, 20, interval=0.05, message="the 1-second entries between two sends")


def test_beat_killed_runs_failures_missed_runs_and_the_crontab_entry(broker, tally, make_exporter, make_worker,
                                                                     make_beat):
    exporter = make_exporter(broker.url, *EXPORTER_FLAGS)
    worker = make_worker(broker.url, "beatw", app="tests.apps.beatapp")
    beat = make_beat(broker.url, "beat-a")
    wait_for(lambda: at_least(exporter, "celery_beat_entry_runs_total", 3, **TICK), 30,
             message=f"3 runs of every-second\n{beat.log()}")
    wait_for(lambda: at_least(exporter, "celery_beat_entry_failures_total", 2, **FAILS), 30,
             message=f"2 failures of always-fails\n{worker.log()}")

    m = exporter.scrape()
    assert m.value("celery_beat_up", beat="beat-a") == 1 and m.value("celery_beat_instances") == 1
    assert m.value("celery_beat_entry_info", schedule="every 1 second", **TICK) == 1
    assert m.value("celery_beat_entry_info", schedule="crontab * * * * *", **MINUTELY) == 1
    next_minute = m.value("celery_beat_entry_next_run_timestamp_seconds", **MINUTELY)
    assert next_minute % 60 == 0 and time.time() - 1 < next_minute <= time.time() + 60, next_minute
    assert m.value("celery_beat_entry_runs_total", **MINUTELY) in (0, 1)  # a minute boundary may have passed
    assert m.value("celery_beat_entry_next_run_timestamp_seconds", **TICK) <= time.time() + 1.5
    assert m.value("celery_beat_entry_missed_runs_total", **TICK) == 0
    assert m.value("celery_beat_duplicate_runs_total", **TICK) == 0  # one beat: no duplicates

    wait_quiet_phase(exporter, TICK, FAILS)
    beat.kill()
    killed = time.monotonic()
    wait_for(lambda: value(exporter, "celery_beat_up", beat="beat-a") == 0, 10, interval=0.1, message="beat down")
    down_after = time.monotonic() - killed
    assert down_after <= BEAT_TIMEOUT + 1.0, down_after
    assert value(exporter, "celery_beat_instances") == 0

    # Away: each 1-second due time past its grace is a missed run, and the count keeps growing.
    first = wait_for(lambda: at_least(exporter, "celery_beat_entry_missed_runs_total", 2, **TICK), 10,
                     message="missed runs while beat is dead")
    wait_for(lambda: at_least(exporter, "celery_beat_entry_missed_runs_total", first + 2, **TICK), 10,
             message="more missed runs")
    assert at_least(exporter, "celery_beat_entry_missed_runs_total", 2, **FAILS)
    assert value(exporter, "celery_beat_entry_next_run_timestamp_seconds", **TICK) > time.time() - 2 * MISSED_GRACE

    # Runs are exactly beat's task-sent events; failures exactly the worker's task-failed events.
    for entry in (TICK, FAILS):
        wait_for(lambda: value(exporter, "celery_beat_entry_runs_total", **entry)
                 == tally.count("task-sent", entry["name"]), 10, message=f"runs of {entry} = its task-sent events")
    wait_for(lambda: tally.count("task-failed", FAILS["name"]) == tally.count("task-sent", FAILS["name"])
             and value(exporter, "celery_beat_entry_failures_total", **FAILS)
             == tally.count("task-failed", FAILS["name"]), 15, message="every failure counted")
    m = exporter.scrape()
    assert tally.count("task-sent", TICK["name"]) >= 3 and tally.count("task-failed", TICK["name"]) == 0
    assert m.value("celery_beat_entry_failures_total", **TICK) == 0
    assert m.value("celery_beat_entry_last_run_success", **TICK) == 1
    assert m.value("celery_beat_entry_last_run_success", **FAILS) == 0
    assert 0 <= m.value("celery_beat_entry_last_run_duration_seconds", **TICK) < 5

    # Back: the same beat again (a new process); misses stop, runs go on.
    make_beat(broker.url, "beat-a")
    wait_for(lambda: value(exporter, "celery_beat_up", beat="beat-a") == 1, 20, message="beat back")
    runs = value(exporter, "celery_beat_entry_runs_total", **TICK)
    wait_for(lambda: at_least(exporter, "celery_beat_entry_runs_total", runs + 2, **TICK), 10, message="runs again")
    missed = value(exporter, "celery_beat_entry_missed_runs_total", **TICK)
    wait_for(lambda: at_least(exporter, "celery_beat_entry_runs_total", runs + 4, **TICK), 10, message="runs again")
    assert value(exporter, "celery_beat_entry_missed_runs_total", **TICK) == missed


def test_two_beats_with_the_same_schedule_count_duplicates(broker, tally, make_exporter, make_beat):
    exporter = make_exporter(broker.url, *EXPORTER_FLAGS)
    beats = [make_beat(broker.url, name) for name in ("beat-a", "beat-b")]
    wait_for(lambda: value(exporter, "celery_beat_instances") == 2, 30, message="two beats up")
    duplicates = wait_for(lambda: at_least(exporter, "celery_beat_duplicate_runs_total", 3, **TICK), 20,
                          message="duplicate runs")
    m = exporter.scrape()
    assert m.value("celery_beat_up", beat="beat-a") == 1 and m.value("celery_beat_up", beat="beat-b") == 1
    assert duplicates <= m.value("celery_beat_entry_runs_total", **TICK) / 2 + 1  # one per due time, not per send
    assert m.value("celery_beat_entry_missed_runs_total", **TICK) == 0

    for beat in beats:  # a clean stop: down at once, its last sends shipped
        assert beat.terminate() == 0, beat.log()
    wait_for(lambda: value(exporter, "celery_beat_instances") == 0, BEAT_TIMEOUT, interval=0.1,
             message="both down before the timeout (exporter-beat-offline)")
    wait_for(lambda: value(exporter, "celery_beat_entry_runs_total", **TICK) == tally.count("task-sent", TICK["name"]),
             10, message="runs of both beats = their task-sent events")


@pytest.fixture
def beat_database():
    """A PostgreSQL database of this test's own (127.0.0.1:5432, user postgres), dropped after."""
    import psycopg  # a test extra (with django-celery-beat): missing, the test fails rather than skips
    name = f"beat_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_database_scheduler_on_postgresql(broker, beat_database, tally, make_exporter, make_beat):
    """django-celery-beat's DatabaseScheduler: the schedule in PostgreSQL, an entry that exists
    only there; the hook sees it through the scheduler, never reading the database itself."""
    env = {"TEST_DATABASE_NAME": beat_database}
    subprocess.run([sys.executable, "-m", "tests.apps.beatdjango", "db-only", "tests.beat.db_only", "1"],
                   cwd=ROOT, env={**os.environ, **env}, check=True, timeout=60)
    exporter = make_exporter(broker.url, *EXPORTER_FLAGS)
    beat = make_beat(broker.url, "beat-db", app="tests.apps.beatdjango",
                     scheduler="django_celery_beat.schedulers:DatabaseScheduler", env=env)
    db_only = {"entry": "db-only", "name": "tests.beat.db_only"}
    wait_for(lambda: at_least(exporter, "celery_beat_entry_runs_total", 3, **db_only), 30,
             message=f"runs of the database's entry\n{beat.log()}")
    wait_for(lambda: at_least(exporter, "celery_beat_entry_runs_total", 3, **TICK), 10, message="runs of every-second")
    m = exporter.scrape()
    assert m.value("celery_beat_up", beat="beat-db") == 1
    assert m.value("celery_beat_entry_info", schedule="every 1 second", **db_only) == 1
    assert m.value("celery_beat_entry_info", schedule="crontab * * * * *", **MINUTELY) == 1
    assert m.value("celery_beat_entry_next_run_timestamp_seconds", **MINUTELY) % 60 == 0
    assert m.value("celery_beat_entry_missed_runs_total", **db_only) == 0
    assert beat.terminate() == 0, beat.log()
    wait_for(lambda: value(exporter, "celery_beat_up", beat="beat-db") == 0, BEAT_TIMEOUT, interval=0.1,
             message="down at once after a clean stop")
    wait_for(lambda: value(exporter, "celery_beat_entry_runs_total", **db_only)
             == tally.count("task-sent", db_only["name"]), 10, message="runs = task-sent events")


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_the_hook_under_the_oldest_celery(broker, tally, make_exporter, make_beat):
    """A beat on Celery 5.2.7 / kombu 5.2.4 (tests/celery_versions.py): the same scheduler
    internals (beat_init, apply_async, tick, the heap), the same reports."""
    from tests.celery_versions import OLDEST, python_for

    exporter = make_exporter(broker.url, *EXPORTER_FLAGS)
    beat = make_beat(broker.url, "beat-old", python=python_for(OLDEST["celery"]))
    wait_for(lambda: at_least(exporter, "celery_beat_entry_runs_total", 3, **TICK), 60,
             message=f"runs under Celery 5.2.7\n{beat.log()}")
    m = exporter.scrape()
    assert m.value("celery_beat_entry_info", schedule="crontab * * * * *", **MINUTELY) == 1
    assert m.value("celery_beat_entry_next_run_timestamp_seconds", **MINUTELY) % 60 == 0
    assert beat.terminate() == 0, beat.log()
    wait_for(lambda: value(exporter, "celery_beat_up", beat="beat-old") == 0, BEAT_TIMEOUT, interval=0.1,
             message="down at once after a clean stop")
    wait_for(lambda: value(exporter, "celery_beat_entry_runs_total", **TICK) == tally.count("task-sent", TICK["name"]),
             10, message="runs = task-sent events")
