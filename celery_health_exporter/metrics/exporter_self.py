"""The exporter's own health: what it received, how late, and whether its sources work."""
from __future__ import annotations

from .definitions import counter, gauge, histogram

EVENTS = counter("exporter_events", "Celery events received, by event type.", "type")
MALFORMED = counter("exporter_events_malformed", "Event messages or events that could not be used, and numbers "
                    "refused wherever they come from (events, remote-control and hook replies, the broker's API or "
                    "keys, the host's process table), by reason. Numbers: bad_timestamp (not finite, or more than "
                    "7 days before or 1 day after the exporter's clock), bad_utcoffset (beyond 24 hours: the "
                    "exporter's own is used), bad_duration (negative, beyond 10 years; a heartbeat interval beyond "
                    "1 hour), bad_count (negative or beyond 2**53), bad_number (a ratio outside 0..1); a wrong type "
                    "(a string, a bool), NaN and infinities count under the same reasons. The number is dropped, "
                    "not the event, except where state/events.py says otherwise.", "reason")
EVENT_LAG = histogram("exporter_event_lag_seconds",
                      "Seconds between an event's timestamp (corrected with its utcoffset) and its processing.")
SOURCE_UP = gauge("exporter_source_up", "1 when the source's last attempt to read succeeded.", "source")
SOURCE_LAST_SUCCESS = gauge("exporter_source_last_success_timestamp_seconds",
                            "Unix time of the source's last successful read.", "source")
SOURCE_FAILURES = counter("exporter_source_failures", "Failed reads of the source (connection, protocol or "
                          "permission errors of the broker or the host; every retry during an outage counts): a "
                          "flapping source shows here while celery_exporter_source_up may look fine.", "source")
SOURCE_POLL_DURATION = gauge("exporter_source_poll_duration_seconds", "How long the source's last poll took "
                             "(polling sources: remote control, the broker's queues, the host's processes).",
                             "source")
INTERNAL_ERRORS = counter("exporter_internal_errors", "Bugs of this exporter that were contained: an exception that "
                          "is not a broker or host failure, logged once per place with its traceback; the event, "
                          "poll or metrics area that raised it was skipped and the source carried on. "
                          "source=\"scrape\": a metrics area failed (see "
                          "celery_exporter_scrape_collector_success). Any increase is a bug to report.", "source")
COLLECTOR_SUCCESS = gauge("exporter_scrape_collector_success", "1 when the metrics area's collect succeeded in this "
                          "scrape, 0 when it raised (its series are missing from this scrape, the others are "
                          "served).", "collector")
COLLECTOR_DURATION = gauge("exporter_scrape_collector_duration_seconds", "Seconds the metrics area took to copy "
                           "its samples in this scrape (the state lock is held meanwhile).", "collector")
SCRAPE_DURATION = gauge("exporter_scrape_duration_seconds", "Seconds the previous scrape took to copy and write "
                        "the state's metrics (without gzip and the process_* families).")
RECONNECTS = counter("exporter_broker_reconnects", "Times the events source reconnected to the broker after "
                     "losing it.")
TRACKED = gauge("exporter_tracked_tasks", "Tasks in the in-flight table (bounded by --max-tracked-tasks).")
EVICTED = counter("exporter_tracked_tasks_evicted", "In-flight tasks dropped from the table because it was full.")
VANISHED = counter("exporter_tracked_tasks_vanished", "Started tasks dropped from the in-flight table because their "
                   "worker's `inspect active` no longer listed them and no terminal event came although the "
                   "worker's later events did: the event was lost (or went to another sharded replica).")
UNATTRIBUTED = counter("exporter_unattributed_task_events", "Worker events of tasks whose task-sent did not "
                       "come within --task-sent-grace, applied with what was known without it: name=\"unknown\" "
                       "for events that name no task (e.g. task-revoked of an expired task), queue_name=\"unknown\" "
                       "for a task-received whose queue nothing else told. Publishers without task_send_sent_event "
                       "or a lost task-sent.")

NONFINITE = counter("exporter_nonfinite_samples_dropped", "Samples left out of /metrics because their value was "
                    "NaN or infinite (never served). The model refuses such numbers as they come in (see "
                    "celery_exporter_events_malformed_total), so any increase is a bug: the log names the metric.")

DEFINITIONS = (EVENTS, MALFORMED, EVENT_LAG, SOURCE_UP, SOURCE_LAST_SUCCESS, SOURCE_FAILURES, SOURCE_POLL_DURATION,
               INTERNAL_ERRORS, COLLECTOR_SUCCESS, COLLECTOR_DURATION, SCRAPE_DURATION, RECONNECTS, TRACKED, EVICTED,
               VANISHED, UNATTRIBUTED, NONFINITE)


def collect(ctx):
    """The exporter's own series; the scrape's (collector success, durations) are the collector's own."""
    state = ctx.state
    for kind, count in state.events_by_type.items():
        yield EVENTS, (kind,), count
    for reason, count in state.malformed.items():
        yield MALFORMED, (reason,), count
    yield EVENT_LAG, (), state.event_lag
    yield NONFINITE, (), ctx.nonfinite_dropped
    yield TRACKED, (), state.tracked_tasks
    yield EVICTED, (), state.tracked_evicted
    yield UNATTRIBUTED, (), state.unattributed_terminal_events
    if any(source.name == "inspect" for source in ctx.sources):
        yield VANISHED, (), state.tracked_vanished
    for source in ctx.sources:
        health = source.health
        yield SOURCE_UP, (source.name,), 1 if health.up else 0
        if health.last_success is not None:
            yield SOURCE_LAST_SUCCESS, (source.name,), health.last_success
        yield SOURCE_FAILURES, (source.name,), health.failures
        yield INTERNAL_ERRORS, (source.name,), source.bugs.count
        if health.last_poll_seconds is not None:
            yield SOURCE_POLL_DURATION, (source.name,), health.last_poll_seconds
        if source.name == "events":
            yield RECONNECTS, (), health.reconnects
