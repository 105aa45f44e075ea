"""The periodic-task part of the model (state/beat.py): beats up and down, runs, missed
runs, duplicates and failures from the beat hook's events and the task events.

The events are the hook's own (``BeatHook.heartbeat_event`` fields and send records as
``tests/integration/test_beat.py`` sees them on a real broker); the clock is the test's."""
import pytest

from celery_health_exporter.hooks.protocol import BEAT_EVENT_TYPE, BEAT_OFFLINE_EVENT_TYPE, BEAT_SENT_EVENT_TYPE
from celery_health_exporter.metrics import StateCollector
from celery_health_exporter.state.model import ClusterState

NOW = 1_700_000_000.0


def envelope(kind, beat="beat-a", instance="i-a", ts=NOW, interval=1.0):
    return {"type": kind, "hostname": beat, "timestamp": ts, "utcoffset": 0, "pid": 42, "clock": 0, "format": 1,
            "instance": instance, "interval": interval, "started": NOW - 10, "hook_errors": {}}


def heartbeat(ts, *entries, **kw):
    return {**envelope(BEAT_EVENT_TYPE, ts=ts, **kw), "scheduler": "celery.beat.PersistentScheduler",
            "entries": [{"entry": name, "task": task, "schedule": "every 10 seconds", "next": due, "period": 10.0}
                        for name, task, due in entries], "sends": 0}


def sent(ts, seq, due, *, entry="job", task="tests.job", task_id=None, period=10.0, error=None, **kw):
    record = {"entry": entry, "task": task, "id": task_id or f"id-{seq}-{kw.get('instance', 'i-a')}", "due": due,
              "sent": ts, "next": ts + period, "period": period, "seq": seq}
    if error:
        record["error"] = error
    return {**envelope(BEAT_SENT_EVENT_TYPE, ts=ts, **kw), "sends": [record]}


@pytest.fixture
def state():
    s = ClusterState(utcoffset=0, purge_offline_after=600)
    s.beat.timeout = 5.0
    s.beat.missed_grace = 2.0
    return s


def entry(state, name="job", task="tests.job"):
    return state.beat.entries[(name, task)]


def test_runs_counted_once_per_send_even_when_shipped_twice(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    for seq in (1, 2):
        state.apply(sent(NOW + 10 * seq, seq, NOW + 10 * seq), NOW + 10 * seq)
    state.apply(sent(NOW + 20, 2, NOW + 20), NOW + 20.5)  # the same batch again (publish confirmed late)
    e = entry(state)
    assert (e.runs, e.last_run, e.awaited) == (2, NOW + 20, NOW + 30)
    assert state.beat.beats_up() == {"beat-a": 1} and state.beat.instances_up() == 1


def test_a_dead_beat_goes_down_after_the_timeout_and_its_due_times_are_missed_one_per_period(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    state.tick(NOW + 5)
    assert state.beat.beats_up() == {"beat-a": 1}
    state.tick(NOW + 5.1)
    assert state.beat.beats_up() == {"beat-a": 0} and state.beat.instances_up() == 0
    state.tick(NOW + 12)  # due at +10, grace 2: not yet
    assert entry(state).missed == 0
    state.tick(NOW + 12.01)
    assert entry(state).missed == 1 and entry(state).awaited == NOW + 20
    state.tick(NOW + 42.5)  # +20, +30, +40 passed their grace too
    assert entry(state).missed == 4 and entry(state).awaited == NOW + 50


def test_a_clean_stop_is_down_at_once(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    state.apply(envelope(BEAT_OFFLINE_EVENT_TYPE, ts=NOW + 1), NOW + 1)
    assert state.beat.beats_up() == {"beat-a": 0}


def test_sends_on_time_are_never_missed(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    for seq in range(1, 6):
        t = NOW + 10 * seq + 0.5  # half a second late each time: within the grace
        state.apply(sent(t, seq, NOW + 10 * seq), t)
        state.tick(t + 1.4)
    assert entry(state).missed == 0 and entry(state).runs == 5


def test_two_beats_sending_the_same_due_times_count_duplicates(state):
    for beat, instance in (("beat-a", "i-a"), ("beat-b", "i-b")):
        state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10), beat=beat, instance=instance), NOW)
    assert state.beat.instances_up() == 2
    for seq in range(1, 4):
        due = NOW + 10 * seq
        state.apply(sent(due + 0.01, seq, due, beat="beat-a", instance="i-a"), due + 0.01)
        state.apply(sent(due + 3.0, seq, due + 2.9, beat="beat-b", instance="i-b"), due + 3.0)  # its own phase
    assert entry(state).duplicates == 3 and entry(state).runs == 6


def test_one_beat_alone_is_no_duplicate(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    for seq in range(1, 4):
        state.apply(sent(NOW + 10 * seq, seq, NOW + 10 * seq), NOW + 10 * seq)
    assert entry(state).duplicates == 0


def failed(task_id, ts):
    return {"type": "task-failed", "uuid": task_id, "hostname": "w@h", "timestamp": ts, "utcoffset": 0,
            "exception": "PeriodicError('no')"}


def succeeded(task_id, ts, runtime=0.25):
    return {"type": "task-succeeded", "uuid": task_id, "hostname": "w@h", "timestamp": ts, "utcoffset": 0,
            "runtime": runtime}


def test_failures_of_the_ids_beat_sent_in_either_order(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    state.apply(sent(NOW + 10, 1, NOW + 10, task_id="t1"), NOW + 10)
    state.apply(failed("t1", NOW + 10.1), NOW + 10.1)
    state.apply(failed("t2", NOW + 20.05), NOW + 20.05)  # the worker's event before beat's
    state.apply(sent(NOW + 20, 2, NOW + 20, task_id="t2"), NOW + 20.1)
    state.apply(failed("other", NOW + 20.2), NOW + 20.2)  # not beat's
    assert entry(state).failures == 2 and entry(state).outcome == "failed"
    state.apply(sent(NOW + 30, 3, NOW + 30, task_id="t3"), NOW + 30)
    state.apply(succeeded("t3", NOW + 30.3, runtime=0.25), NOW + 30.3)
    assert (entry(state).failures, entry(state).outcome, entry(state).runtime) == (2, "succeeded", 0.25)


def test_a_send_that_raised_is_a_send_error_not_a_run(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    state.apply(sent(NOW + 10, 1, NOW + 10, error="SchedulingError"), NOW + 10)
    assert (entry(state).runs, entry(state).send_errors) == (0, 1)


def test_an_entry_removed_from_the_schedule_is_no_longer_awaited(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10), ("old", "tests.old", NOW + 10)), NOW)
    state.apply(heartbeat(NOW + 1, ("job", "tests.job", NOW + 10)), NOW + 1)
    state.tick(NOW + 30)
    assert entry(state, "old", "tests.old").missed == 0 and entry(state, "old", "tests.old").awaited is None
    assert entry(state).missed == 2


def test_due_times_while_the_exporter_was_blind_are_not_missed(state):
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    state.events_interrupted(NOW + 1)
    state.tick(NOW + 40)
    assert state.beat.beats_up() == {"beat-a": 1} and entry(state).missed == 0
    state.events_resumed(NOW + 40)
    state.tick(NOW + 40.1)  # +10, +20, +30 fell due while blind
    assert entry(state).missed == 0 and entry(state).awaited == NOW + 40


def test_malformed_beat_events_are_counted_not_raised(state):
    state.apply({**sent(NOW, 1, NOW), "sends": "nope"}, NOW)
    state.apply({**heartbeat(NOW), "instance": None}, NOW)
    state.apply({**heartbeat(NOW), "entries": [{"entry": "x", "task": None}, 5]}, NOW)
    state.apply(sent(NOW, 2, float("nan")), NOW)
    assert state.malformed.get("beat_sends") == 1 and state.malformed.get("beat_instance") == 1
    assert state.malformed.get("beat_entry") == 2 and state.malformed.get("bad_timestamp") == 1


def test_metrics_exist_only_once_a_beat_reported(state):
    collector = StateCollector(state, [])
    assert "celery_beat" not in collector.render()
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    state.apply(sent(NOW + 10, 1, NOW + 10, task_id="t1"), NOW + 10)
    text = collector.render()
    for line in ('celery_beat_up{beat="beat-a"}', 'celery_beat_entry_runs_total{entry="job",name="tests.job"} 1\n',
                 'celery_beat_entry_info{entry="job",name="tests.job",schedule="every 10 seconds"} 1\n',
                 "celery_beat_instances "):
        assert line in text


def test_an_entry_beat_holds_back_for_good_is_not_awaited(state):
    """The hook reports next=None for an entry beat will not send again (e.g. an expired
    django-celery-beat task, which its scheduler reschedules decades away)."""
    state.apply(heartbeat(NOW, ("job", "tests.job", NOW + 10)), NOW)
    held = heartbeat(NOW + 1, ("job", "tests.job", None))
    state.apply(held, NOW + 1)
    state.tick(NOW + 60)
    assert entry(state).awaited is None and entry(state).missed == 0


def test_hook_errors_are_cumulative_and_bounded(state):
    state.apply({**heartbeat(NOW), "hook_errors": {"ship": 3}}, NOW)
    state.apply({**heartbeat(NOW + 1), "hook_errors": {"ship": 2}}, NOW + 1)  # never backwards
    for i in range(3):
        state.apply({**heartbeat(NOW + 2), "hook_errors": {f"forged-{i}-{j}": 1 for j in range(16)}}, NOW + 2)
    errors = state.beat.hook_errors()
    assert errors[("beat-a", "ship")] == 3 and len(errors) == 16


def test_the_metric_names_the_issue_asks_for():
    from celery_health_exporter.metrics import beat as beat_metrics

    exposed = {(d.exposed_name(), d.labels) for d in beat_metrics.DEFINITIONS}
    entry = ("entry", "name")
    assert {("celery_beat_up", ("beat",)), ("celery_beat_instances", ()),
            ("celery_beat_entry_runs_total", entry), ("celery_beat_entry_last_run_timestamp_seconds", entry),
            ("celery_beat_entry_next_run_timestamp_seconds", entry), ("celery_beat_entry_missed_runs_total", entry),
            ("celery_beat_duplicate_runs_total", entry), ("celery_beat_entry_failures_total", entry)} <= exposed


@pytest.mark.parametrize("behind", [100.0, -100.0])
def test_a_beat_whose_clock_is_off_is_judged_on_ours(state, behind):
    """The beat host's clock ``behind`` seconds late (or early): its due times are moved by
    what its events' timestamps say, so on-time sends are never missed runs."""
    beat_now = NOW - behind
    state.apply(heartbeat(beat_now, ("job", "tests.job", beat_now + 10)), NOW)
    for seq in range(1, 4):
        state.apply(sent(beat_now + 10 * seq, seq, beat_now + 10 * seq), NOW + 10 * seq)
        state.tick(NOW + 10 * seq + 1.5)
    e = entry(state)
    assert (e.missed, e.runs, e.awaited, e.last_run) == (0, 3, NOW + 40, NOW + 30)
    state.tick(NOW + 40 + state.beat.missed_grace + 0.1)
    assert e.missed == 1
