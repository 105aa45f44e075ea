"""Task flow metrics: same names and label keys as prometheus-exporter-celery / celery-mixin."""
from __future__ import annotations

from dataclasses import replace
from operator import attrgetter

from .definitions import counter, gauge, histogram
from .text import Column

FLOW_LABELS = ("name", "hostname", "queue_name")

SENT = counter("task_sent", "Tasks published, from task-sent events (needs task_send_sent_event on publishers). "
               "hostname: the host part of the publisher's node name (gen123@web-1 -> web-1), or `generic` with "
               "--generic-hostname-task-sent-metric.", *FLOW_LABELS)
RECEIVED = counter("task_received", "Tasks received by a worker.", *FLOW_LABELS)
STARTED = counter("task_started", "Tasks started by a worker.", *FLOW_LABELS)
SUCCEEDED = counter("task_succeeded", "Tasks that succeeded.", *FLOW_LABELS)
FAILED = counter("task_failed", "Tasks that failed, by exception class name.", *FLOW_LABELS, "exception")
RETRIED = counter("task_retried", "Tasks that asked to be retried.", *FLOW_LABELS)
REVOKED = counter("task_revoked", "Tasks revoked (including expired ones).", *FLOW_LABELS)
REJECTED = counter("task_rejected", "Tasks rejected by a worker.", *FLOW_LABELS)
RUNTIME = histogram("task_runtime", "Run time in seconds of tasks that succeeded or failed.", *FLOW_LABELS)
QUEUE_WAIT = histogram(
    "task_queue_wait_time",
    "Seconds from publication (the task-sent's timestamp, or the ETA when later) to task-started: the time "
    "the task waited in the broker's queue and the worker's prefetch buffer. For a task whose task-sent was not "
    "seen before its task-started (publishers without task_send_sent_event), from task-received instead: only "
    "the prefetch wait, a lower bound (see celery_task_prefetch_wait_time). Publisher and worker clocks must "
    "agree; a negative difference counts as 0.",
    *FLOW_LABELS)
PREFETCH_WAIT = histogram(
    "task_prefetch_wait_time",
    "Seconds from task-received (or the ETA when later) to task-started, on the worker's clock: the time the "
    "task sat in the worker's prefetch buffer behind other tasks (worker_prefetch_multiplier).", *FLOW_LABELS)
# The same families under --no-hostname-in-task-histograms (one name, one contract: not listed twice).
RUNTIME_NO_HOSTNAME = replace(RUNTIME, labels=("name", "queue_name"))
QUEUE_WAIT_NO_HOSTNAME = replace(QUEUE_WAIT, labels=("name", "queue_name"))
PREFETCH_WAIT_NO_HOSTNAME = replace(PREFETCH_WAIT, labels=("name", "queue_name"))

EXPIRED = counter("task_expired", "Tasks discarded because their `expires` had passed (each one also grows the "
                  "workers' revoked sets).", "name", "queue_name")
LOST = counter("task_lost", "Tasks that will never finish. reason=worker_lost: received or started by a worker that "
               "then went away (after a warm shutdown: started only), with no terminal event within "
               "--lost-task-grace.", "name", "queue_name", "reason")
UNPICKLABLE = counter("task_unpicklable_exceptions", "Retries and failures whose exception could not be pickled "
                      "(UnpickleableExceptionWrapper): the cause of worker crash loops on Celery < 5.3.",
                      "name", "exception")
ACTIVE_OLDEST = gauge("task_active_oldest_age_seconds", "Age of the longest-running unfinished task of this name.",
                      "name")

DEFINITIONS = (SENT, RECEIVED, STARTED, SUCCEEDED, FAILED, RETRIED, REVOKED, REJECTED, RUNTIME, QUEUE_WAIT,
               PREFETCH_WAIT, EXPIRED, LOST, UNPICKLABLE, ACTIVE_OLDEST)


_FLOW_COUNTERS = ((RECEIVED, "received"), (STARTED, "started"), (SUCCEEDED, "succeeded"), (RETRIED, "retried"),
                  (REVOKED, "revoked"), (REJECTED, "rejected"))


def collect(ctx):
    state = ctx.state
    for key, count in state.sent.items():
        yield SENT, key, count
    # One Column per family over all flows (the renderer's fast path; see text.Column).
    flows = state.all_flows()
    labels = [flow.labels for flow in flows]
    for definition, attribute in _FLOW_COUNTERS:
        yield definition, None, Column(labels, list(map(attrgetter(attribute), flows)))
    failing = [flow for flow in flows if flow.failed]
    yield FAILED, None, Column([(*flow.labels, exception) for flow in failing for exception in flow.failed],
                               [count for flow in failing for count in flow.failed.values()])
    if state.task_histograms is None:
        yield RUNTIME, None, Column(labels, [flow.runtime for flow in flows])
        yield QUEUE_WAIT, None, Column(labels, [flow.queue_wait for flow in flows])
        yield PREFETCH_WAIT, None, Column(labels, [flow.prefetch_wait for flow in flows])
    else:
        keys = list(state.task_histograms)
        triples = list(state.task_histograms.values())
        yield RUNTIME_NO_HOSTNAME, None, Column(keys, [runtime for runtime, _, _ in triples])
        yield QUEUE_WAIT_NO_HOSTNAME, None, Column(keys, [queue_wait for _, queue_wait, _ in triples])
        yield PREFETCH_WAIT_NO_HOSTNAME, None, Column(keys, [prefetch for _, _, prefetch in triples])
    for (name, queue), count in state.expired.items():
        yield EXPIRED, (name, queue), count
    for key, count in state.lost.items():
        yield LOST, key, count
    for key, count in state.unpicklable.items():
        yield UNPICKLABLE, key, count
    for name, started in ctx.in_flight[2].items():
        yield ACTIVE_OLDEST, (name,), max(0.0, ctx.now - started)
