"""Periodic tasks, reported by the beat hook `celery_health_exporter.hooks.beat` (docs/beat.md); absent without it."""
from __future__ import annotations

from .definitions import counter, gauge


UP = gauge("beat_up", "1 while the beat process reports; 0 after it stopped (exporter-beat-offline) or was silent "
           "for --beat-timeout (at least twice its report interval).", "beat")
INSTANCES = gauge("beat_instances", "Beat processes currently up (two beats under one label count two): more than 1 "
                  "means every periodic task runs more than once.")
RUNS = counter("beat_entry_runs", "Tasks beat sent for the entry, summed over beats.", "entry", "name")
LAST_RUN = gauge("beat_entry_last_run_timestamp_seconds", "Unix time beat last sent the entry.", "entry", "name")
NEXT_RUN = gauge("beat_entry_next_run_timestamp_seconds", "Unix time the entry is due next (the latest a beat "
                 "reported, or a period after a missed due time); absent once no beat schedules it.",
                 "entry", "name")
MISSED = counter("beat_entry_missed_runs", "Due times that passed, beyond --beat-missed-grace, with no beat sending "
                 "the entry (beat dead, stuck, or its schedule lost); one per period while it lasts.",
                 "entry", "name")
DUPLICATES = counter("beat_duplicate_runs", "Sends of a due time another beat process already sent (within half "
                     "a period): two schedulers run the same schedule.", "entry", "name")
FAILURES = counter("beat_entry_failures", "The entry's tasks that failed (task-failed of a task id beat sent; needs "
                   "workers with task events, -E).", "entry", "name")
SEND_ERRORS = counter("beat_entry_send_errors", "Sends of the entry that raised in beat (e.g. the broker "
                      "unreachable): the run did not happen.", "entry", "name")
LAST_SUCCESS = gauge("beat_entry_last_run_success", "1 when the entry's last finished run succeeded, 0 when it "
                     "failed, was retried, revoked or rejected; absent until one finished.", "entry", "name")
LAST_DURATION = gauge("beat_entry_last_run_duration_seconds", "Run time of the entry's last finished run.",
                      "entry", "name")
INFO = gauge("beat_entry_info", "1 for each entry a beat schedules, with its schedule in words (`every 30 seconds`, "
             "`crontab 0 4 * * *`: minute hour day-of-month month day-of-week).", "entry", "name", "schedule")
HOOK_ERRORS = counter("beat_hook_errors", "The beat hook's own failures by stage (ship = events not sent, the broker "
                      "being unreachable; others = hook bugs, swallowed). Never raised into beat.", "beat", "stage")

DEFINITIONS = (UP, INSTANCES, RUNS, LAST_RUN, NEXT_RUN, MISSED, DUPLICATES, FAILURES, SEND_ERRORS, LAST_SUCCESS,
               LAST_DURATION, INFO, HOOK_ERRORS)


def collect(ctx):
    beat = getattr(ctx.state, "beat", None)
    if beat is None or not beat.seen:
        return
    for label, up in sorted(beat.beats_up().items()):
        yield UP, (label,), up
    yield INSTANCES, (), beat.instances_up()
    for (entry_name, name), entry in sorted(beat.entries.items()):
        labels = (entry_name, name)
        yield RUNS, labels, entry.runs
        yield MISSED, labels, entry.missed
        yield DUPLICATES, labels, entry.duplicates
        yield FAILURES, labels, entry.failures
        yield SEND_ERRORS, labels, entry.send_errors
        if entry.last_run is not None:
            yield LAST_RUN, labels, entry.last_run
        if entry.awaited is not None:
            yield NEXT_RUN, labels, entry.awaited
        if entry.outcome is not None:
            yield LAST_SUCCESS, labels, 1 if entry.outcome == "succeeded" else 0
        if entry.runtime is not None:
            yield LAST_DURATION, labels, entry.runtime
        if entry.schedule is not None and entry.listed_by:
            yield INFO, (entry_name, name, entry.schedule), 1
    for (label, stage), count in sorted(beat.hook_errors().items()):
        yield HOOK_ERRORS, (label, stage), count
