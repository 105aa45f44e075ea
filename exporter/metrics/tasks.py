"""Task flow metrics: same names and label keys as prometheus-exporter-celery / celery-mixin."""
from __future__ import annotations

from .definitions import counter, gauge, histogram

FLOW_LABELS = ("name", "hostname", "queue_name")

SENT = counter("task_sent", "Tasks published, from task-sent events (needs task_send_sent_event on publishers).",
               "name", "queue_name")
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
    "Seconds from task-received (or its ETA, when later) to task-started, on the worker's clock.",
    *FLOW_LABELS)

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
               EXPIRED, LOST, UNPICKLABLE, ACTIVE_OLDEST)


def collect(ctx):
    state = ctx.state
    for (name, queue), count in state.sent.items():
        yield SENT, (name, queue), count
    for hostname, worker in state.workers.items():
        for (name, queue), flow in worker.flows.items():
            labels = (name, hostname, queue)
            yield RECEIVED, labels, flow.received
            yield STARTED, labels, flow.started
            yield SUCCEEDED, labels, flow.succeeded
            yield RETRIED, labels, flow.retried
            yield REVOKED, labels, flow.revoked
            yield REJECTED, labels, flow.rejected
            for exception, count in flow.failed.items():
                yield FAILED, (*labels, exception), count
            yield RUNTIME, labels, flow.runtime
            yield QUEUE_WAIT, labels, flow.queue_wait
    for (name, queue), count in state.expired.items():
        yield EXPIRED, (name, queue), count
    for key, count in state.lost.items():
        yield LOST, key, count
    for key, count in state.unpicklable.items():
        yield UNPICKLABLE, key, count
    for name, started in ctx.in_flight[2].items():
        yield ACTIVE_OLDEST, (name,), max(0.0, ctx.now - started)
