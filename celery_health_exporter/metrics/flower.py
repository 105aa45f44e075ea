"""Flower 2.x's metrics under Flower's names and labels, with `--flower-metrics` only (absent without it; `--metric-prefix` does not apply).

Computed by ``state.flower.FlowerState`` from the same events as ours; what differs
from Flower's own values is in docs/dashboards-and-alerts.md (Migrating from Flower).
"""
from __future__ import annotations

from .cardinality import DISTINCT, FOLDED
from .definitions import counter, gauge, histogram
from .text import Column

FLOWER = "flower_"

EVENTS = counter("events", "Flower's count of task events by type (task-sent, task-received, task-started, "
                 "task-succeeded, task-failed, task-retried, task-revoked, task-rejected). worker: the node name "
                 "that sent the event (the publisher's for task-sent); task: the task name, empty when unknown.",
                 "worker", "type", "task", prefix=FLOWER)
RUNTIME = histogram("task_runtime_seconds", "Run time of the tasks that succeeded (the runtime field of "
                    "task-succeeded), in Flower's default buckets.", "worker", "task", prefix=FLOWER)
PREFETCH_TIME = gauge("task_prefetch_time_seconds", "Seconds the task that started last (of this name, on this "
                      "worker) waited in the worker's prefetch buffer (task-received to task-started); 0 once it "
                      "finished. Tasks with an ETA are left out.", "worker", "task", prefix=FLOWER)
PREFETCHED = gauge("worker_prefetched_tasks", "Tasks of this name received by the worker and not started yet "
                   "(tasks with an ETA left out); 0 while the worker is down.", "worker", "task", prefix=FLOWER)
ONLINE = gauge("worker_online", "1 while the worker sends heartbeats; 0 after worker-offline or --worker-timeout "
               "without a heartbeat.", "worker", prefix=FLOWER)
EXECUTING = gauge("worker_number_of_currently_executing_tasks", "Tasks the worker's last heartbeat said it was "
                  "executing (its `active`); 0 while the worker is down.", "worker", prefix=FLOWER)

DEFINITIONS = (EVENTS, RUNTIME, PREFETCH_TIME, PREFETCHED, ONLINE, EXECUTING)


def collect(ctx):
    flower = getattr(ctx.state, "flower", None)
    if flower is None:  # --flower-metrics off
        return
    labels = flower.labels.items()
    events = [(worker, kind, task, n) for worker, series in labels for (kind, task), n in series.events.items()]
    yield EVENTS, None, Column([e[:3] for e in events], [e[3] for e in events])
    for definition, attribute in ((RUNTIME, "runtime"), (PREFETCH_TIME, "prefetch_time"),
                                  (PREFETCHED, "prefetched")):
        pairs = [((worker, task), value) for worker, series in labels
                 for task, value in getattr(series, attribute).items()]
        yield definition, None, Column([p[0] for p in pairs], [p[1] for p in pairs])
    for worker, series in labels:
        if series.online is not None:
            yield ONLINE, (worker,), series.online
    for worker, series in labels:
        if series.active is not None:
            yield EXECUTING, (worker,), series.active
    cap = flower.publisher_cap  # beside the model's caps in celery_exporter_label_values*
    yield FOLDED, (cap.label,), cap.folded
    yield DISTINCT, (cap.label,), len(cap)
