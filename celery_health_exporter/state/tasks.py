"""Tasks in the model: the in-flight task table, the task flows (counters and histograms
per name, queue and worker), the task events, their reconciliation when a task-sent comes
late (``unattributed``) and the tasks declared lost with their worker.

A part of ``ClusterState`` (see state/model.py): the methods here use its tables."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .crashes import lost_on_main_exit
from .events import MalformedEvent, duration, exception_class, task_exception, text
from .histogram import Histogram

if TYPE_CHECKING:
    from .workers import WorkerState

UNKNOWN = "unknown"
GENERIC = "generic"  # the hostname of --generic-hostname-* (prometheus-exporter-celery's value)
# Worker events that end a task and name no task: without the task's earlier events
# they cannot be attributed to a task name and queue (see ClusterState.unattributed).
TERMINAL_EVENTS = frozenset({"task-succeeded", "task-failed", "task-retried", "task-revoked", "task-rejected"})
MAX_UNATTRIBUTED = 10_000  # held terminal events; past it the oldest is counted at once


class TaskFlow:
    """Counters and histograms of one (task name, queue) on one worker.

    All counters exist from the moment the label set is first seen, at 0, so
    that ``increase()`` sees the first success/failure/retry of a task.
    """

    __slots__ = ("labels", "received", "started", "succeeded", "retried", "revoked", "rejected", "failed",
                 "runtime", "queue_wait", "prefetch_wait", "created")

    def __init__(self, labels: tuple[str, str, str], runtime: Histogram, queue_wait: Histogram,
                 prefetch_wait: Histogram, now: float):
        self.labels = labels  # (name, hostname, queue): made once, read at every scrape
        self.received = self.started = self.succeeded = 0
        self.retried = self.revoked = self.rejected = 0
        self.failed: dict[str, int] = {}
        # Per flow, or shared by every worker's flow of a (name, queue): see task_histograms.
        self.runtime = runtime
        self.queue_wait = queue_wait  # from publication (task-sent) when known, else from task-received
        self.prefetch_wait = prefetch_wait  # from task-received: time in the worker's prefetch buffer
        self.created = now


class TaskRecord:
    """A task between its first event and its terminal one."""

    __slots__ = ("name", "queue", "hostname", "state", "sent_at", "received_at", "started_at", "eta",
                 "started_local", "epoch")

    def __init__(self, name: str | None):
        self.name = name
        self.queue: str | None = None
        self.hostname: str | None = None
        self.state = "PENDING"
        self.sent_at: float | None = None  # publisher's clock, from task-sent
        self.received_at: float | None = None
        self.started_at: float | None = None
        self.eta: float | None = None
        self.started_local: float | None = None  # our clock: ages must not depend on the worker's
        self.epoch = 0  # the worker process epoch the task was running in



class TaskTable:
    """Task events, the in-flight table and its reconciliation (mixed into ClusterState)."""

    def _held_for_task_sent(self, kind: str, event: dict, now: float, ts: float | None) -> bool:
        """Hold the events of a task whose task-sent is still on its way (see ``unattributed``):
        a terminal event of a task not known at all, or the task-received of a task whose queue
        nothing else tells (once per task name whose publishers turn out to send no task-sent).
        The task's later events queue up behind the first one held, so that they are applied
        in order."""
        if self.task_sent_grace <= 0 or kind == "task-sent":
            return False
        uuid = text(event, "uuid")
        if uuid is None:
            return False
        if uuid not in self.unattributed:
            if uuid in self.tasks or uuid in self.finished:
                return False
            if kind == "task-received":
                name = text(event, "name")
                if name in self.names_without_task_sent or self._queue_known(name, text(event, "hostname")):
                    return False
            elif kind not in TERMINAL_EVENTS:
                return False
            if len(self.unattributed) >= MAX_UNATTRIBUTED:
                self._release_unattributed(self.unattributed.popitem(last=False)[1], attributed=False)
        self.unattributed.setdefault(uuid, []).append(
            (now + self.task_sent_grace, kind, event, now, ts if ts is not None else now))
        return True

    def _queue_known(self, name: str | None, hostname: str | None) -> bool:
        """Whether a task of this name received by this worker has a queue without its task-sent."""
        if name is None:
            return False
        queue = self._queue_for(None, self.cardinality.name.fold(name), hostname)
        return queue != self.unknown_queue

    def _release_unattributed(self, held: list, attributed: bool) -> None:
        """Apply held events: after their task-sent made the task known, or when the grace
        is over, with what is known then ("unknown" name or queue)."""
        if not attributed:
            self.unattributed_terminal_events += len(held)
            first_kind, first_event = held[0][1], held[0][2]
            if first_kind == "task-received":  # its publisher sends no task-sent: do not wait for it again
                self.names_without_task_sent[text(first_event, "name")] = None
                if len(self.names_without_task_sent) > MAX_UNATTRIBUTED:
                    self.names_without_task_sent.popitem(last=False)
        for _deadline, kind, event, now, ts in held:
            try:
                self._handlers[kind](event, now, ts)
            except MalformedEvent as exc:
                self.count_malformed(exc.reason)

    def _declare_lost(self, now: float) -> None:
        due = [p for p in self.pending_lost if p[0] <= now]
        self.pending_lost = [p for p in self.pending_lost if p[0] > now]
        for _deadline, hostname, epoch, states in due:
            for uuid, record in list(self.tasks.items()):
                if record.hostname == hostname and record.epoch == epoch and record.state in states:
                    # kept among the finished: a dead worker's late WorkerLostError still finds its name
                    del self.tasks[uuid]
                    self._retire(uuid, record)
                    name = record.name or UNKNOWN
                    key = (name, self._queue_for(record, name, hostname), "worker_lost")
                    self.lost[key] = self.lost.get(key, 0) + 1

    def _record(self, uuid: str, name: str | None) -> TaskRecord:
        if name is not None:
            name = self.cardinality.name.fold(name)
        record = self.tasks.get(uuid)
        if record is None:
            if len(self.tasks) >= self.max_tracked_tasks:
                _, oldest = self.tasks.popitem(last=False)
                self._leave_started(oldest)
                self.tracked_evicted += 1
            record = self.tasks[uuid] = TaskRecord(name)
            earlier = self.finished.get(uuid)  # a retry comes back with the same id
            if earlier is not None:
                record.name = record.name or earlier.name
                record.queue = earlier.queue
        elif name is not None:
            record.name = name
        return record

    def _uuid(self, event: dict) -> str:
        uuid = text(event, "uuid")
        if uuid is None:
            raise MalformedEvent("missing_uuid")
        self.task_events += 1
        return uuid

    def _queue_for(self, record: TaskRecord | None, name: str, hostname: str | None) -> str:
        if record is not None and record.queue:
            return record.queue
        queue = self.queue_of_name.get(name)
        if queue:
            return queue
        consumed = self.worker_queues.get(hostname) if hostname else None
        if consumed and len(consumed) == 1:
            return self.cardinality.queue_name.fold(next(iter(consumed)))
        return self.unknown_queue

    def queue_for(self, record: TaskRecord | None) -> str:
        """The queue a task is attributed to (the same rules as its counters)."""
        name = (record.name if record is not None else None) or UNKNOWN
        return self._queue_for(record, name, record.hostname if record is not None else None)

    def _flow(self, event: dict, now: float, record: TaskRecord | None) -> tuple[TaskFlow, WorkerState]:
        worker = self._worker(event, now)
        name = (record.name if record is not None else None) or UNKNOWN
        key = (name, self._queue_for(record, name, worker.hostname))
        flow = worker.flows.get(key)
        if flow is None:
            generic = self.generic_flows
            flow = generic.get(key) if generic is not None else None
            if flow is None:
                shared = self.task_histograms
                histograms = shared.get(key) if shared is not None else None
                if histograms is None:
                    histograms = (Histogram(self.runtime_buckets), Histogram(self.queue_wait_buckets),
                                  Histogram(self.queue_wait_buckets))
                    if shared is not None:
                        shared[key] = histograms
                hostname = GENERIC if generic is not None else worker.hostname
                flow = TaskFlow((key[0], hostname, key[1]), *histograms, now)
                if generic is not None:
                    generic[key] = flow
            worker.flows[key] = flow
        return flow, worker

    def all_flows(self) -> list[TaskFlow]:
        """Every task flow once (with --generic-hostname-worker-task-metric, workers share theirs)."""
        if self.generic_flows is not None:
            return list(self.generic_flows.values())
        return [flow for worker in self.workers.values() for flow in worker.flows.values()]

    def runtime_by_name(self) -> dict[str, tuple[int, float]]:
        """(count, sum) of the run times of each task name, over every worker and queue."""
        if self.task_histograms is not None:
            histograms = ((name, pair[0]) for (name, _queue), pair in self.task_histograms.items())
        else:
            histograms = ((flow.labels[0], flow.runtime) for flow in self.all_flows())
        totals: dict[str, tuple[int, float]] = {}
        for name, histogram in histograms:
            count, total = totals.get(name, (0, 0.0))
            totals[name] = (count + histogram.count, total + histogram.sum)
        return totals

    def _on_task_sent(self, event: dict, now: float, ts: float) -> None:
        uuid = self._uuid(event)
        name = self.cardinality.name.fold(text(event, "name") or UNKNOWN)
        queue = self.cardinality.queue_name.fold(text(event, "queue") or text(event, "routing_key")
                                                 or self.unknown_queue)
        if queue != self.unknown_queue:
            self.queue_of_name[name] = queue
        if self.task_sent_hostname:
            publisher = self.cardinality.publisher.fold(host_part(text(event, "hostname") or UNKNOWN))
        else:
            publisher = GENERIC
        key = (name, publisher, queue)
        self.sent[key] = self.sent.get(key, 0) + 1
        earlier = self.finished.get(uuid)
        if earlier is not None and earlier.state == "FINISHED" and uuid not in self.tasks:
            # The publisher's events and the worker's travel apart: a quick task can finish
            # before its task-sent arrives. A record made now would wait in the queue for ever
            # (celery_queue_oldest_unstarted_task_age_seconds). A retry is a new message with
            # the same id, so after task-retried (state RETRIED) the record is made.
            return
        record = self._record(uuid, name)
        record.queue = queue
        record.sent_at = ts

    def _on_task_received(self, event: dict, now: float, ts: float) -> None:
        uuid = self._uuid(event)
        record = self._record(uuid, text(event, "name"))
        flow, worker = self._flow(event, now, record)
        self._move(record, "RECEIVED", worker)
        record.received_at = ts
        record.eta = _iso_timestamp(event.get("eta"))
        flow.received += 1

    def _on_task_started(self, event: dict, now: float, ts: float) -> None:
        uuid = self._uuid(event)
        record = self._record(uuid, None)
        flow, worker = self._flow(event, now, record)
        self._move(record, "STARTED", worker)
        record.started_at = ts
        record.started_local = now
        worker.running += 1
        self._update_busy(worker, now)
        flow.started += 1
        # Waiting from publication (or the ETA, when later) needs the task-sent; without it (a
        # publisher without task_send_sent_event, or a task-sent still on its way) only the wait
        # from receipt is known, a lower bound. Clocks of publisher and worker may differ: >= 0.
        eta = record.eta or 0.0
        since = record.sent_at if record.sent_at is not None else record.received_at
        if since is not None:
            flow.queue_wait.observe(max(0.0, ts - max(since, eta)))
        if record.received_at is not None:
            flow.prefetch_wait.observe(max(0.0, ts - max(record.received_at, eta)))

    def _move(self, record: TaskRecord, state: str, worker: WorkerState) -> None:
        """The task is now in ``state`` on the current process of ``worker``."""
        self._leave_started(record)
        record.state = state
        record.hostname = worker.hostname
        record.epoch = worker.epoch

    def _leave_started(self, record: TaskRecord) -> None:
        """Keep the worker's running count right when a task stops running."""
        if record.state == "STARTED":
            worker = self.workers.get(record.hostname)
            if worker is not None and worker.epoch == record.epoch and worker.running > 0:
                worker.running -= 1

    def _retire(self, uuid: str, record: TaskRecord) -> None:
        """A record out of the in-flight table goes to the bounded recently-finished one."""
        self._leave_started(record)
        record.state = "FINISHED"
        self.finished[uuid] = record
        if len(self.finished) > self.max_finished:
            self.finished.popitem(last=False)

    def _finish(self, event: dict, now: float) -> tuple[TaskFlow, TaskRecord | None]:
        uuid = self._uuid(event)
        record = self.tasks.pop(uuid, None)
        if record is None:
            record = self.finished.get(uuid)
        else:
            self._retire(uuid, record)
        self.beat.task_finished(uuid, event, record, now)
        flow, worker = self._flow(event, now, record)
        worker.progress_at = now
        self._update_busy(worker, now)
        return flow, record

    def _on_task_succeeded(self, event: dict, now: float, ts: float) -> None:
        flow, _ = self._finish(event, now)
        flow.succeeded += 1
        runtime = duration(event.get("runtime"), self.count_malformed)
        if runtime is not None:
            flow.runtime.observe(runtime)

    def _count_exception(self, event: dict, record: TaskRecord | None) -> str:
        exc_name, wrapped = exception_class(task_exception(event))
        exc_name = self.cardinality.exception.fold(exc_name)
        if wrapped:
            key = ((record.name if record else None) or UNKNOWN, exc_name)
            self.unpicklable[key] = self.unpicklable.get(key, 0) + 1
        return exc_name

    def _on_task_failed(self, event: dict, now: float, ts: float) -> None:
        flow, record = self._finish(event, now)
        exc_name = self._count_exception(event, record)
        flow.failed[exc_name] = flow.failed.get(exc_name, 0) + 1
        if lost_on_main_exit(task_exception(event)):
            worker = self._worker(event, now)  # flow.labels says "generic" with --generic-hostname-worker-...
            self.crashes.task_lost(worker.hostname, flow.labels[0], worker.up, now)
        runtime = duration(event.get("runtime"), self.count_malformed)
        if event.get("runtime") is None and record is not None and record.started_at is not None:
            runtime = ts - record.started_at  # both timestamps bounded: finite
        if runtime is not None and runtime >= 0:
            flow.runtime.observe(runtime)

    def _on_task_retried(self, event: dict, now: float, ts: float) -> None:
        # The retry is a new message with the same id; a fresh task-received follows.
        flow, record = self._finish(event, now)
        if record is not None:
            record.state = "RETRIED"  # its next message (task-sent, task-received) is awaited
        self._count_exception(event, record)
        flow.retried += 1

    def _on_task_revoked(self, event: dict, now: float, ts: float) -> None:
        flow, record = self._finish(event, now)
        flow.revoked += 1
        if event.get("expired") is True:
            name = (record.name if record else None) or UNKNOWN
            key = (name, self._queue_for(record, name, text(event, "hostname")))
            self.expired[key] = self.expired.get(key, 0) + 1

    def _on_task_rejected(self, event: dict, now: float, ts: float) -> None:
        flow, _ = self._finish(event, now)
        flow.rejected += 1

    @property
    def tracked_tasks(self) -> int:
        return len(self.tasks)

    def in_flight(self) -> tuple[dict, dict, dict]:
        """One pass over the in-flight table: per worker the tasks received but
        not started (prefetched) and the start time of the oldest running task,
        and per task name the oldest start. Tasks of a worker process that is
        gone (awaiting the lost-task verdict) are left out."""
        prefetched: dict[str, int] = {}
        oldest_by_worker: dict[str, float] = {}
        oldest_by_name: dict[str, float] = {}
        workers = self.workers
        for record in self.tasks.values():
            worker = workers.get(record.hostname)
            if worker is None or worker.epoch != record.epoch:
                continue
            if record.state == "RECEIVED":
                prefetched[worker.hostname] = prefetched.get(worker.hostname, 0) + 1
            elif record.state == "STARTED" and record.started_local is not None:
                started = record.started_local
                if started < oldest_by_worker.get(worker.hostname, float("inf")):
                    oldest_by_worker[worker.hostname] = started
                name = record.name or UNKNOWN
                if started < oldest_by_name.get(name, float("inf")):
                    oldest_by_name[name] = started
        return prefetched, oldest_by_worker, oldest_by_name

    def _release_due_unattributed(self, now: float) -> None:
        """Held events whose task-sent did not come within the grace are applied as they are."""
        while self.unattributed:  # in arrival order, so in deadline order
            uuid, held = next(iter(self.unattributed.items()))
            if held[0][0] > now:
                break
            del self.unattributed[uuid]
            self._release_unattributed(held, attributed=False)



def host_part(nodename: str) -> str:
    """``gen123@web-1`` -> ``web-1``: a publisher's node name carries its pid (a new series per
    process); the host part is what prometheus-exporter-celery labels celery_task_sent_total with."""
    return nodename.split("@", 1)[-1] or nodename


def _iso_timestamp(value) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
