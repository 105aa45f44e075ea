"""Flower's Prometheus bookkeeping, for ``--flower-metrics``: what Flower 2.x's ``/metrics`` shows.

Pure Python, no I/O, every method takes ``now``. Flower (``flower/events.py``,
``PrometheusMetrics.observe_task`` / ``observe_worker``, version 2.2.0) keeps, per
``worker`` label (the event's ``hostname``: a worker's node name, or for task-sent
the publisher's, e.g. ``gen4242@web-1``) and ``task`` label (the task name, ``""``
when no event of the task named it):

- ``flower_events_total{worker,type,task}``: every task event, by type;
- ``flower_task_runtime_seconds{worker,task}``: the ``runtime`` field of the events
  that carry a non-zero one (task-succeeded), in prometheus_client's default buckets;
- ``flower_worker_prefetched_tasks{worker,task}``: +1 at task-received, -1 at
  task-started, -1 at task-revoked / task-rejected of a task not started, for tasks
  without an ETA (``eta`` of task-sent or task-received) whose task-received was seen;
- ``flower_task_prefetch_time_seconds{worker,task}``: at task-started, started minus
  received (the event timestamps); back to 0 at task-succeeded / task-failed;
- ``flower_worker_online{worker}``: 1 at worker-online and worker-heartbeat, 0 at
  worker-offline;
- ``flower_worker_number_of_currently_executing_tasks{worker}``: a heartbeat's ``active``.

Where Flower's values go stale, the exporter's model corrects them (docs/dashboards-
and-alerts.md, Migrating from Flower): a worker the model counts down (no heartbeat
for --worker-timeout) or that went offline is online 0 with nothing executing or
prefetched; a worker that starts (worker-online) has an empty prefetch buffer; a
prefetched count never goes below 0. Flower keeps a series until the process ends;
here a ``worker`` value silent for ``purge_after`` seconds (--purge-offline-after)
loses its series, unless the model still holds the worker.

Fed through ``ClusterState.follow``: each of Celery's task and worker
event types goes first to the model's handler, then here, with the same event,
``now`` and corrected timestamp ``ts`` (held events too, when the model releases
them). Time moves it in ``expire(now)``, run once a second with ``ClusterState.tick``. Bounded: label values are capped like ours (worker node names
and task names by the model's caps, --max-workers and --max-task-names; publishers'
node names, one per publishing process, by a cap of their own of --max-publishers
values, so that they do not take the slots of celery_task_sent_total's publisher
hosts); the table of tasks in flight holds --max-tracked-tasks (oldest evicted).
Guarded by ``ClusterState.lock``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from prometheus_client import Histogram as _PrometheusHistogram

from .cardinality import LabelCap
from .events import count, duration, ignore, text
from .histogram import Histogram

# Flower's default --task_runtime_metric_buckets: prometheus_client's (our Histogram adds +Inf itself).
RUNTIME_BUCKETS = tuple(b for b in _PrometheusHistogram.DEFAULT_BUCKETS if not math.isinf(b))
TASK_EVENTS = ("task-sent", "task-received", "task-started", "task-succeeded", "task-failed", "task-retried",
               "task-revoked", "task-rejected")
WORKER_EVENTS = ("worker-online", "worker-heartbeat", "worker-offline")
# After these a task leaves the in-flight table (a retried task comes back with the same id).
FINAL = frozenset({"task-succeeded", "task-failed", "task-revoked", "task-rejected"})
MAX_FINISHED = 10_000  # names of finished tasks, for their late events


class FlowerTask:
    """What Flower's ``celery.events.state.Task`` holds that its metrics read."""

    __slots__ = ("name", "received", "started", "eta")

    def __init__(self, name: str):
        self.name = name
        self.received: float | None = None
        self.started: float | None = None
        self.eta = False


class LabelSeries:
    """Every series of one ``worker`` label value."""

    __slots__ = ("events", "runtime", "prefetch_time", "prefetched", "online", "active", "last_seen", "worker",
                 "publisher")

    def __init__(self, now: float):
        self.events: dict[tuple[str, str], int] = {}  # (type, task) -> count
        self.runtime: dict[str, Histogram] = {}
        self.prefetch_time: dict[str, float] = {}
        self.prefetched: dict[str, int] = {}
        self.online: int | None = None  # None until a worker event
        self.active: int | None = None
        self.last_seen = now
        self.worker = False  # a worker's events came under this value
        self.publisher = False  # task-sent events came under it: it holds a slot of the publisher cap

    def empty_buffer(self) -> None:
        """The worker process is gone or new: nothing waits in its prefetch buffer."""
        for task in self.prefetched:
            self.prefetched[task] = 0
        for task in self.prefetch_time:
            self.prefetch_time[task] = 0.0


class FlowerState:
    def __init__(self, cluster, *, max_tasks: int | None = None, purge_after: float | None = None,
                 buckets: tuple = RUNTIME_BUCKETS):
        self.cluster = cluster
        self.max_tasks = max_tasks if max_tasks is not None else cluster.max_tracked_tasks
        self.purge_after = purge_after if purge_after is not None else cluster.purge_offline_after
        self.buckets = tuple(buckets)
        self.labels: dict[str, LabelSeries] = {}
        self.tasks: OrderedDict[str, FlowerTask] = OrderedDict()
        self.finished: OrderedDict[str, str] = OrderedDict()  # uuid -> task name
        self.evicted = 0
        # Flower's worker label of task-sent: gen<pid>@host, a value per publishing process.
        self.publisher_cap = LabelCap("flower_publisher", cluster.cardinality.publisher.limit)
        for kind in TASK_EVENTS:
            cluster.follow(kind, self.on_task)
        for kind in WORKER_EVENTS:
            cluster.follow(kind, self.on_worker)

    # ------------------------------------------------------------------ input
    def _series(self, hostname: str, now: float, publisher: bool) -> LabelSeries:
        label = (self.publisher_cap if publisher else self.cluster.cardinality.hostname).fold(hostname)
        series = self.labels.get(label)
        if series is None:
            series = self.labels[label] = LabelSeries(now)
        series.last_seen = now
        if publisher:
            series.publisher = True
        else:
            series.worker = True
        return series

    def _task(self, uuid: str, name: str) -> FlowerTask:
        task = self.tasks.get(uuid)
        if task is None:
            if len(self.tasks) >= self.max_tasks:
                self.tasks.popitem(last=False)
                self.evicted += 1
            task = self.tasks[uuid] = FlowerTask(name or self.finished.get(uuid, ""))
        else:
            self.tasks.move_to_end(uuid)
        if name:
            task.name = name
        return task

    def on_task(self, event: dict, now: float, ts: float) -> None:
        kind = event.get("type")
        hostname, uuid = text(event, "hostname"), text(event, "uuid")
        if hostname is None or uuid is None:
            return
        name = text(event, "name")
        if name is not None:
            name = self.cluster.cardinality.name.fold(name)
        series = self._series(hostname, now, publisher=kind == "task-sent")
        if kind in FINAL and uuid not in self.tasks:
            # finished and gone, or never seen: only its count, with the name known
            task = FlowerTask(name or self.finished.get(uuid, ""))
        else:
            task = self._task(uuid, name or "")
        series.events[(kind, task.name)] = series.events.get((kind, task.name), 0) + 1
        runtime = duration(event.get("runtime"), ignore)  # the model reports a bad one
        if runtime:
            histogram = series.runtime.get(task.name)
            if histogram is None:
                histogram = series.runtime[task.name] = Histogram(self.buckets)
            histogram.observe(runtime)
        if kind in ("task-sent", "task-received") and "eta" in event:
            task.eta = bool(event["eta"])
        if kind == "task-received":
            task.received = ts
        elif kind == "task-started":
            task.started = ts
        self._prefetch(series, kind, task)
        if kind in FINAL:
            self.tasks.pop(uuid, None)
            self.finished[uuid] = task.name
            self.finished.move_to_end(uuid)
            if len(self.finished) > MAX_FINISHED:
                self.finished.popitem(last=False)

    @staticmethod
    def _prefetch(series: LabelSeries, kind: str, task: FlowerTask) -> None:
        """Flower's prefetch gauges: only for tasks without an ETA whose task-received was seen."""
        if task.eta or task.received is None:
            return
        name = task.name
        if kind == "task-received":
            series.prefetched[name] = series.prefetched.get(name, 0) + 1
        elif kind == "task-started" and task.started is not None:
            series.prefetch_time[name] = max(0.0, task.started - task.received)
            series.prefetched[name] = max(0, series.prefetched.get(name, 0) - 1)
        elif kind in ("task-succeeded", "task-failed") and task.started is not None:
            series.prefetch_time[name] = 0.0
        elif kind in ("task-revoked", "task-rejected") and task.started is None:
            series.prefetched[name] = max(0, series.prefetched.get(name, 0) - 1)

    def on_worker(self, event: dict, now: float, ts: float) -> None:
        hostname = text(event, "hostname")
        if hostname is None:
            return
        kind = event.get("type")
        series = self._series(hostname, now, publisher=False)
        if kind == "worker-offline":
            series.online, series.active = 0, 0
            series.empty_buffer()
            return
        if kind == "worker-online":
            series.empty_buffer()
        series.online = 1
        active = count(event.get("active"), ignore)  # the model reports a bad one
        if active is not None:
            series.active = active

    # ------------------------------------------------------------------- time
    def expire(self, now: float) -> None:
        """Workers the model counts down show it; series silent for purge_after go.

        Nothing is purged while the exporter receives no events (their silence says nothing)."""
        if self.cluster.events_interrupted_at is not None:
            return
        workers = self.cluster.workers
        for label, series in list(self.labels.items()):
            worker = workers.get(label) if series.worker else None
            if worker is not None and not worker.up and worker.last_heartbeat is not None:
                # timed out (killed, OOM, partitioned): it executes and holds nothing
                if series.online is not None:
                    series.online = 0
                if series.active is not None:
                    series.active = 0
                series.empty_buffer()
            if worker is None and now - series.last_seen > self.purge_after:
                del self.labels[label]
                if series.publisher:
                    self.publisher_cap.forget(label)
