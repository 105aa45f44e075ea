"""The in-memory model of a Celery cluster, fed by events, read at scrape time.

Pure Python, no I/O: every method takes ``now`` so tests control time. Memory
is bounded: the in-flight task table has a hard cap (oldest evicted and
counted), workers that stay gone are purged with all their series.

Thread model: sources apply events from their own threads and the HTTP server
renders from another; both hold ``ClusterState.lock`` while they touch it.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from .cardinality import OTHER, CardinalityCaps
from .crashes import CrashState, lost_on_main_exit
from .events import (MAX_COUNT, MAX_DURATION, MalformedEvent, count, duration, event_timestamp, event_type,
                     exception_class, interval, task_exception, text, timestamp)
from .histogram import Histogram
from .queues import BrokerState
from .hosts import HostState
from .publishers import PublisherState
from .beat import BeatState

UNKNOWN = "unknown"
GENERIC = "generic"  # the hostname of --generic-hostname-* (prometheus-exporter-celery's value)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MAX_EVENT_TYPES = 64  # custom event types are user-defined strings: keep the label bounded
CHILD_TASK_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 500, 1000)
HOOK_REASONS = ("memory", "tasks", "signal", "error")
# Worker events that end a task and name no task: without the task's earlier events
# they cannot be attributed to a task name and queue (see ClusterState.unattributed).
TERMINAL_EVENTS = frozenset({"task-succeeded", "task-failed", "task-retried", "task-revoked", "task-rejected"})
MAX_UNATTRIBUTED = 10_000  # held terminal events; past it the oldest is counted at once


def local_utcoffset() -> float:
    """This host's offset to UTC in hours, as Celery computes it for its events
    (``celery.utils.time.utcoffset``): hours WEST of UTC, so Berlin is -1 or -2.
    Both ends must use the same sign, or every timestamp is off by twice the offset."""
    seconds_west = time.altzone if time.localtime().tm_isdst else time.timezone
    return seconds_west / 3600


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


class WorkerState:
    __slots__ = ("hostname", "up", "online", "last_heartbeat", "freq", "active", "processed",
                 "sw_ident", "sw_ver", "sw_sys", "pid", "first_seen", "down_since", "flows",
                 "start_time", "restarts", "unclean_shutdowns", "epoch", "running", "busy_since", "progress_at",
                 "pool_processes", "max_concurrency", "prefetch_count", "max_tasks_per_child",
                 "max_memory_per_child", "limits_from_hook", "child_pids", "child_pids_of", "child_replacements",
                 "child_tasks", "child_peak_rss", "hook_snapshot", "revoked", "revoked_limit", "revoked_at",
                 "inspect_prefetched", "inspect_oldest_start", "vanish_check", "vanish_due")

    def __init__(self, hostname: str, now: float):
        self.hostname = hostname
        self.up = False
        self.online = False  # False after worker-offline, until it comes back
        self.last_heartbeat: float | None = None  # local wall time of the last worker event
        # started tasks `inspect active` did not list: uuid -> (deadline, record, its start); see
        # ClusterState.apply_active_ids. vanish_due: the earliest deadline, checked at every heartbeat.
        self.vanish_check: dict[str, tuple[float, TaskRecord, float | None]] = {}
        self.vanish_due: float | None = None
        self.freq = 2.0
        self.active: int | None = None
        self.processed: int | None = None
        self.sw_ident = self.sw_ver = self.sw_sys = ""
        self.pid: int | None = None
        self.first_seen = now
        self.down_since: float | None = now
        self.flows: dict[tuple[str, str], TaskFlow] = {}
        # lifecycle
        self.start_time: float | None = None
        self.restarts = 0
        self.unclean_shutdowns = 0
        self.epoch = 0  # +1 whenever the process behind this node name is gone
        self.running = 0  # started, unfinished tasks of the current process (from events)
        self.busy_since: float | None = None
        self.progress_at = now  # last time the worker finished a task
        # from remote control and the worker hook
        self.pool_processes: int | None = None
        self.max_concurrency: int | None = None
        self.prefetch_count: int | None = None
        self.max_tasks_per_child: int | None = None
        self.max_memory_per_child: int | None = None  # bytes
        self.limits_from_hook = False
        self.child_pids: frozenset | None = None
        self.child_pids_of: int | None = None  # main pid the child pids belong to
        self.child_replacements: dict[str, int] = {}
        self.child_tasks: Histogram | None = None  # only with the hook
        self.child_peak_rss: int | None = None
        self.hook_snapshot: tuple[int, dict] | None = None  # (main pid, last cumulative reply)
        self.revoked: int | None = None
        self.revoked_limit: int | None = None
        self.revoked_at: float | None = None
        # from inspect active/reserved: used for workers that send no task events
        self.inspect_prefetched: int | None = None
        self.inspect_oldest_start: float | None = None

    @property
    def busy(self) -> bool:
        return self.running > 0 or bool(self.active)


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


class ClusterState:
    def __init__(
        self,
        *,
        worker_timeout: float = 15.0,
        purge_offline_after: float = 600.0,
        runtime_buckets: tuple = (0.1, 1, 10),
        queue_wait_buckets: tuple = (0.1, 1, 10),
        task_histograms_by_worker: bool = True,
        max_tracked_tasks: int = 100_000,
        stall_after: float = 300.0,
        lost_task_grace: float = 30.0,
        task_sent_grace: float = 0.0,  # the daemon passes --task-sent-grace; 0 counts at once
        task_sent_hostname: bool = True,
        generic_worker_task_hostname: bool = False,
        unknown_queue: str = UNKNOWN,
        caps: CardinalityCaps | None = None,
        utcoffset: float | None = None,
        now: float | None = None,
    ):
        self.lock = threading.Lock()
        # Label values come from whoever writes to the broker: bounded, the excess folded into "other".
        self.cardinality = caps if caps is not None else CardinalityCaps()
        self.stall_after = stall_after
        self.lost_task_grace = lost_task_grace
        self.task_sent_grace = task_sent_grace
        # celery_task_sent_total's hostname: the publisher's host part, or GENERIC for every publisher
        # (--generic-hostname-task-sent-metric: publishers in pods with random names).
        self.task_sent_hostname = task_sent_hostname
        # The queue label of a task whose queue nothing tells (--default-queue-name).
        self.unknown_queue = unknown_queue
        self.worker_timeout = worker_timeout
        self.purge_offline_after = purge_offline_after
        self.runtime_buckets = tuple(runtime_buckets)
        self.queue_wait_buckets = tuple(queue_wait_buckets)
        # Without hostname, the run-time and queue-wait histograms are one pair per
        # (name, queue) that every worker's flow observes into: served instead of the flows'.
        self.task_histograms: dict[tuple[str, str], tuple[Histogram, Histogram, Histogram]] | None = (
            None if task_histograms_by_worker else {})
        # --generic-hostname-worker-task-metric: one flow per (name, queue), labelled
        # hostname="generic", that every worker's flows of that key are.
        self.generic_flows: dict[tuple[str, str], TaskFlow] | None = {} if generic_worker_task_hostname else None
        self.max_tracked_tasks = max_tracked_tasks
        self.utcoffset = local_utcoffset() if utcoffset is None else utcoffset

        self.workers: dict[str, WorkerState] = {}
        self.sent: dict[tuple[str, str, str], int] = {}  # (name, publisher's host, queue)
        self.tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        self.tracked_evicted = 0
        self.tracked_vanished = 0
        # Events of one task can arrive out of order (workers batch them): a late
        # task-retried after the retry's own task-succeeded still finds its name here.
        self.finished: OrderedDict[str, TaskRecord] = OrderedDict()
        self.max_finished = min(max_tracked_tasks, 10_000)
        self.queue_of_name: dict[str, str] = {}  # learned from task-sent: routing is usually per name
        self.worker_queues: dict[str, frozenset] = {}  # from remote control, when available
        # Until when the last remote-control poll tells who consumes what; None while no
        # poll succeeded (poller off, or failing from the start): consumer counts unknown.
        self.remote_control_valid_until: float | None = None
        self.events_by_type: dict[str, int] = {}
        self.malformed: dict[str, int] = {}
        self.event_lag = Histogram(LAG_BUCKETS)
        self.task_events = 0
        self.expired: dict[tuple[str, str], int] = {}
        self.lost: dict[tuple[str, str, str], int] = {}
        self.unpicklable: dict[tuple[str, str], int] = {}
        # (deadline, hostname, epoch that ended, which task states count as lost)
        self.pending_lost: list[tuple[float, str, int, tuple]] = []
        # A task's task-sent comes over the publisher's connection, its other events over
        # the worker's, and either can come first: a worker can discard an expired task
        # (task-revoked, which names no task) or receive a task (task-received, which names
        # no queue) before its task-sent arrives. Such events wait here, uuid -> [(deadline,
        # kind, event, now, ts)], up to task_sent_grace seconds for the task-sent that names
        # the task and its queue; then they are applied with what is known ("unknown") and
        # counted in unattributed_terminal_events.
        self.unattributed: OrderedDict[str, list[tuple[float, str, dict, float, float]]] = OrderedDict()
        self.unattributed_terminal_events = 0
        # Task names whose task-received waited in vain once: their publishers send no task-sent
        # (task_send_sent_event off), so their tasks are counted at once from then on.
        self.names_without_task_sent: OrderedDict[str, None] = OrderedDict()
        # While the exporter receives no events, a worker's silence says nothing about it.
        self.events_interrupted_at: float | None = None

        self._handlers = {
            "task-sent": self._on_task_sent,
            "task-received": self._on_task_received,
            "task-started": self._on_task_started,
            "task-succeeded": self._on_task_succeeded,
            "task-failed": self._on_task_failed,
            "task-retried": self._on_task_retried,
            "task-revoked": self._on_task_revoked,
            "task-rejected": self._on_task_rejected,
            "worker-online": self._on_worker_online,
            "worker-heartbeat": self._on_worker_heartbeat,
            "worker-offline": self._on_worker_offline,
        }
        self.broker = BrokerState()  # queues as the broker poller last saw them
        # worker processes seen by the host agent
        self.hosts = HostState(purge_after=purge_offline_after, report=self.count_malformed)
        self.publishers = PublisherState(self)  # publisher hook totals (registers its event handler)
        self.crashes = CrashState(self)  # workers that stop on an unrecoverable error (registers its handler)
        self.beat = BeatState(self)  # periodic tasks, from the beat hook (registers its handlers)

    def register_handler(self, event_type: str, handler) -> None:
        """Let a part of the model outside this class take an event type of its
        own (e.g. the publisher hook's custom event). ``handler(event, now, ts)``."""
        self._handlers[event_type] = handler

    # ----------------------------------------------------------------- input

    def apply(self, event, now: float) -> None:
        """Apply one decoded event. Malformed events are counted, never raised."""
        try:
            kind = event_type(event)
            handler = self._handlers.get(kind)
            self._count_type(kind)
            ts = event_timestamp(event, now, self.utcoffset, self.count_malformed)
            if ts is not None:
                self.event_lag.observe(max(0.0, now - ts))
            if handler is not None and not self._held_for_task_sent(kind, event, now, ts):
                handler(event, now, ts if ts is not None else now)
                if self.unattributed and kind not in TERMINAL_EVENTS:  # it may have made a held task known
                    held = self.unattributed.pop(text(event, "uuid") or "", None)
                    if held is not None:
                        self._release_unattributed(held, attributed=True)
        except MalformedEvent as exc:
            self.count_malformed(exc.reason)

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

    def count_malformed(self, reason: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1

    def _count_type(self, kind: str) -> None:
        counts = self.events_by_type
        if kind not in counts and len(counts) >= MAX_EVENT_TYPES:
            kind = "other"
        counts[kind] = counts.get(kind, 0) + 1

    # ---------------------------------------------------------------- workers

    def _worker(self, event: dict, now: float) -> WorkerState:
        hostname = text(event, "hostname")
        if hostname is None:
            raise MalformedEvent("missing_hostname")
        hostname = self.cardinality.hostname.fold(hostname)
        worker = self.workers.get(hostname)
        if worker is None:
            worker = self.workers[hostname] = WorkerState(hostname, now)
        return worker

    def _seen_alive(self, worker: WorkerState, event: dict, now: float, ts: float, kind: str) -> int | None:
        """Returns the event's processed count (None when absent or bad)."""
        pid = count(event.get("pid"), self.count_malformed)
        processed = count(event.get("processed"), self.count_malformed)
        if worker.last_heartbeat is not None and worker.hostname != OTHER and (  # "other" is many workers
            kind == "worker-online"  # sent only when a worker process starts
            or (pid is not None and worker.pid is not None and pid != worker.pid)
            or (processed is not None and worker.processed is not None and processed < worker.processed)
        ):
            self._restarted(worker, now)
        if kind == "worker-online":
            worker.start_time = ts
        worker.last_heartbeat = now
        if worker.vanish_due is not None and ts > worker.vanish_due:
            self._vanish(worker, ts)
        worker.online = True
        worker.up = True
        worker.down_since = None
        freq = interval(event.get("freq"), self.count_malformed)
        if freq is not None:
            worker.freq = freq
        if pid is not None:
            worker.pid = pid
        for key in ("sw_ident", "sw_ver", "sw_sys"):
            value = text(event, key)
            if value is not None:
                setattr(worker, key, value)
        return processed

    def _restarted(self, worker: WorkerState, now: float) -> None:
        """A known node name came back as a new process."""
        worker.restarts += 1
        if worker.up and worker.online:
            # The old process vanished without worker-offline before the timeout noticed.
            worker.unclean_shutdowns += 1
            self._went_down(worker, now, lost_states=("RECEIVED", "STARTED"))
        worker.processed = None
        worker.active = None
        worker.start_time = None
        worker.child_pids = None
        worker.hook_snapshot = None
        worker.busy_since = None
        worker.progress_at = now

    def _went_down(self, worker: WorkerState, now: float, lost_states: tuple) -> None:
        """The process behind this node name is gone: what it held may be lost."""
        self.pending_lost.append((now + self.lost_task_grace, worker.hostname, worker.epoch, lost_states))
        self.crashes.worker_down(worker.hostname, now)
        worker.epoch += 1
        worker.running = 0
        worker.busy_since = None

    def _on_worker_online(self, event: dict, now: float, ts: float) -> None:
        self._seen_alive(self._worker(event, now), event, now, ts, "worker-online")

    def _on_worker_heartbeat(self, event: dict, now: float, ts: float) -> None:
        worker = self._worker(event, now)
        processed = self._seen_alive(worker, event, now, ts, "worker-heartbeat")
        # A heartbeat that answers the `heartbeat` control command carries no counts.
        active = count(event.get("active"), self.count_malformed)
        if active is not None:
            worker.active = active
        if processed is not None:
            if worker.processed is not None and processed > worker.processed:
                worker.progress_at = now
            worker.processed = processed
        self._update_busy(worker, now)

    def _on_worker_offline(self, event: dict, now: float, ts: float) -> None:
        worker = self._worker(event, now)
        was_up = worker.up
        worker.online = False
        worker.up = False
        worker.down_since = now
        worker.active = 0
        if was_up:
            # A warm shutdown hands reserved tasks back to the broker: only started
            # ones that never finished are lost.
            self._went_down(worker, now, lost_states=("STARTED",))

    @staticmethod
    def _update_busy(worker: WorkerState, now: float) -> None:
        if worker.busy:
            if worker.busy_since is None:
                worker.busy_since = now
        else:
            worker.busy_since = None

    def worker_timeout_for(self, worker: WorkerState) -> float:
        """Seconds of silence before a worker counts as down: the flag, or two
        heartbeat intervals for workers configured with a slower heartbeat."""
        return max(self.worker_timeout, 2 * worker.freq)

    def events_interrupted(self, now: float) -> None:
        """The events source lost the broker. Until it is back, workers are not timed
        out: every one of them would look dead (an unclean shutdown, its tasks lost)."""
        if self.events_interrupted_at is None:
            self.events_interrupted_at = now

    def events_resumed(self, now: float) -> None:
        """Events flow again: the time of the outage is given back to every live worker
        (heartbeat age and progress), so a worker is judged on what it sent around it."""
        started, self.events_interrupted_at = self.events_interrupted_at, None
        if started is None:
            return
        gap = max(0.0, now - started)
        for worker in self.workers.values():
            if worker.up and worker.last_heartbeat is not None:
                worker.last_heartbeat += gap
                worker.progress_at += gap
                if worker.busy_since is not None:
                    worker.busy_since += gap

    def is_stalled(self, worker: WorkerState, now: float) -> bool:
        """Holds tasks and has finished none for stall_after seconds: the healthy
        consumer that consumes nothing (a deadlocked task holding its messages)."""
        if not worker.up or not worker.busy or worker.busy_since is None:
            return False
        return now - max(worker.busy_since, worker.progress_at) > self.stall_after

    def tick(self, now: float) -> None:
        """Every time-driven transition of the model, in one place, run by the exporter's
        timer (once a second) and never by readers: silent workers go down, their
        unfinished tasks are declared lost after the grace period, long-gone workers
        are purged, terminal events still waiting for their task-sent are counted as
        unknown, crash, beat and publisher records expire."""
        judging = self.events_interrupted_at is None
        for hostname, worker in list(self.workers.items()):
            if judging and worker.up and worker.last_heartbeat is not None and (
                now - worker.last_heartbeat > self.worker_timeout_for(worker)
            ):
                worker.up = False
                worker.down_since = now
                if worker.online:  # heartbeats stopped without worker-offline: killed, OOM, crash
                    worker.unclean_shutdowns += 1
                self._went_down(worker, now, lost_states=("RECEIVED", "STARTED"))
            if not worker.up and worker.down_since is not None and (
                now - worker.down_since > self.purge_offline_after
            ):
                del self.workers[hostname]
                self.worker_queues.pop(hostname, None)
                self.crashes.forget(hostname)
                self.cardinality.hostname.forget(hostname)
        if self.pending_lost and self.pending_lost[0][0] <= now:
            self._declare_lost(now)
        self.crashes.expire(now)
        self.beat.expire(now)
        self.publishers.expire(now)
        while self.unattributed:  # in arrival order, so in deadline order
            uuid, held = next(iter(self.unattributed.items()))
            if held[0][0] > now:
                break
            del self.unattributed[uuid]
            self._release_unattributed(held, attributed=False)

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

    # ------------------------------------------------------------------ tasks

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
            name, hostname, _queue = flow.labels
            self.crashes.task_lost(hostname, name, self.workers[hostname].up, now)
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

    # ------------------------------------------------- remote control and hook

    def apply_stats(self, hostname: str, stats: dict, now: float) -> None:
        """`inspect stats` of one worker."""
        worker = self.workers.get(hostname)
        if worker is None or not isinstance(stats, dict):
            return
        report = self.count_malformed
        uptime = duration(stats.get("uptime"), report)
        if uptime is not None:
            worker.start_time = now - uptime
        worker.prefetch_count = count(stats.get("prefetch_count"), report)
        pool = stats.get("pool") if isinstance(stats.get("pool"), dict) else {}
        worker.max_concurrency = count(pool.get("max-concurrency"), report)
        processes = pool.get("processes")
        if isinstance(processes, list):
            pids = frozenset(p for p in processes if isinstance(p, int))
            worker.pool_processes = len(pids)
            main_pid = count(stats.get("pid"), report)
            if worker.hook_snapshot is None and worker.child_pids is not None and worker.child_pids_of == main_pid:
                # Without the hook, children replaced between two polls are all we can see.
                new = len(pids - worker.child_pids)
                if new:
                    worker.child_replacements["unknown"] = worker.child_replacements.get("unknown", 0) + new
            worker.child_pids, worker.child_pids_of = pids, main_pid
        else:
            worker.pool_processes = None  # solo, threads, gevent: no child processes
        if not worker.limits_from_hook:
            worker.max_tasks_per_child = count(pool.get("max-tasks-per-child"), report) or 0

    def apply_conf(self, hostname: str, conf: dict) -> None:
        """`inspect conf`: the limits when set in configuration (a CLI flag is not visible here)."""
        worker = self.workers.get(hostname)
        if worker is None or not isinstance(conf, dict) or worker.limits_from_hook:
            return
        max_memory = count(conf.get("worker_max_memory_per_child"), self.count_malformed, MAX_COUNT // 1024)  # KiB
        worker.max_memory_per_child = max_memory * 1024 if max_memory else 0
        max_tasks = count(conf.get("worker_max_tasks_per_child"), self.count_malformed)
        if max_tasks and not worker.max_tasks_per_child:
            worker.max_tasks_per_child = max_tasks

    def remote_control_polled(self, now: float, valid_for: float) -> None:
        """A remote-control poll completed: the workers that answered are all there
        are (none answering means no worker consumes anything), until ``valid_for``
        seconds pass without another one."""
        self.remote_control_valid_until = now + valid_for

    def apply_active_queues(self, hostname: str, queues) -> None:
        if hostname in self.workers and isinstance(queues, list):
            names = frozenset(q["name"] for q in queues if isinstance(q, dict) and isinstance(q.get("name"), str))
            self.worker_queues[hostname] = names

    def apply_active_reserved(self, hostname: str, active, reserved, now: float | None = None) -> None:
        worker = self.workers.get(hostname)
        if worker is None:
            return
        now = time.time() if now is None else now
        if isinstance(reserved, list):
            worker.inspect_prefetched = len(reserved)
        if isinstance(active, list):
            # time_start: the worker's wall clock when the task started; a task may run for long
            starts = [timestamp(r.get("time_start"), now, self.count_malformed, MAX_DURATION)
                      for r in active if isinstance(r, dict)]
            starts = [start for start in starts if start is not None]
            worker.inspect_oldest_start = min(starts) if starts else None

    def apply_active_ids(self, listed: dict[str, set], asked_at: float, settle: float) -> None:
        """Reconcile the in-flight table with ``inspect active`` (task ids per worker
        that replied; the broadcast was sent at ``asked_at``, our clock).

        A started task its worker no longer runs has finished; its terminal event is
        either on its way or lost (a cut subscription, a message RabbitMQ dropped, a
        sharded replica that got it). A worker publishes its events in order, so once
        one of its heartbeats sent ``settle`` seconds after the question has been
        applied, a terminal event sent before the answer would have been applied too:
        the tasks still "started" then are ghosts. Left alone they would age forever
        in celery_worker_oldest_active_task_age_seconds and look like a stalled worker."""
        missing: dict[str, set] = {hostname: set() for hostname in listed}
        workers = self.workers
        for uuid, record in self.tasks.items():
            ids = listed.get(record.hostname)
            if ids is None or record.state != "STARTED" or uuid in ids:
                continue
            worker = workers.get(record.hostname)
            if worker is not None and worker.epoch == record.epoch and (record.started_local or 0) < asked_at:
                missing[record.hostname].add(uuid)
        for hostname, uuids in missing.items():
            worker = workers.get(hostname)
            if worker is None:
                continue
            # A task missing from several answers keeps its first deadline: while the
            # exporter lags, a heartbeat past a deadline renewed at every poll would never come.
            before = worker.vanish_check
            worker.vanish_check = {
                uuid: before[uuid] if uuid in before and before[uuid][1] is self.tasks[uuid]
                else (asked_at + settle, self.tasks[uuid], self.tasks[uuid].started_local)
                for uuid in uuids}
            worker.vanish_due = min((due for due, _, _ in worker.vanish_check.values()), default=None)

    def _vanish(self, worker: WorkerState, ts: float) -> None:
        """Drop the flagged tasks whose deadline the worker's event at ``ts`` has passed."""
        waiting = {}
        for uuid, (due, flagged, started_local) in worker.vanish_check.items():
            record = self.tasks.get(uuid)
            if record is not flagged or record.state != "STARTED" or record.started_local != started_local \
                    or record.epoch != worker.epoch:
                continue  # finished, lost, or started again (a retry of the same id) meanwhile
            if due >= ts:
                waiting[uuid] = (due, flagged, started_local)
                continue
            del self.tasks[uuid]
            self._retire(uuid, record)  # a terminal event that still comes keeps the task's name
            self.tracked_vanished += 1
        worker.vanish_check = waiting
        worker.vanish_due = min((due for due, _, _ in waiting.values()), default=None)

    def apply_revoked_count(self, hostname: str, count: int, limit: int | None, now: float) -> None:
        worker = self.workers.get(hostname)
        if worker is not None:
            worker.revoked, worker.revoked_at = count, now
            if limit is not None:
                worker.revoked_limit = limit

    def apply_hook(self, hostname: str, reply: dict, now: float) -> None:
        """The worker hook's cumulative numbers for its main process (see celery_health_exporter.hooks.worker).
        Counters are turned into deltas per main pid, so a worker restart never makes ours go back.
        A bad number among the cumulative ones drops the whole reply (a delta against it would be wrong)."""
        worker = self.workers.get(hostname)
        if worker is None or not isinstance(reply, dict):
            return
        report = self.count_malformed
        pid = count(reply.get("pid"), report)
        replacements = reply.get("replacements") if isinstance(reply.get("replacements"), dict) else {}
        replacements = {reason: count(n, report) for reason, n in replacements.items()
                        if reason in HOOK_REASONS and n is not None}
        tasks_hist = reply.get("child_tasks") if isinstance(reply.get("child_tasks"), dict) else {}
        counts = tasks_hist.get("counts")
        counts = ([count(n, report) for n in counts]
                  if isinstance(counts, list) and len(counts) == len(CHILD_TASK_BUCKETS) + 1 else None)
        total = count(tasks_hist.get("sum"), report)  # a sum of task counts
        if (None in replacements.values() or (counts is not None and None in counts)
                or (tasks_hist.get("sum") is not None and total is None)):
            return
        previous = worker.hook_snapshot[1] if worker.hook_snapshot and worker.hook_snapshot[0] == pid else {}
        old_replacements = previous.get("replacements", {})
        for reason in HOOK_REASONS:  # every reason exists from the first reply, so increase() sees the first one
            worker.child_replacements.setdefault(reason, 0)
        for reason, n in replacements.items():
            delta = n - old_replacements.get(reason, 0)
            if delta > 0:
                worker.child_replacements[reason] = worker.child_replacements.get(reason, 0) + delta
        if counts is not None:
            if worker.child_tasks is None:
                worker.child_tasks = Histogram(CHILD_TASK_BUCKETS)
            old = previous.get("counts") or [0] * len(counts)
            for i, (new, before) in enumerate(zip(counts, old)):
                if new > before:
                    worker.child_tasks.counts[i] += new - before
            old_total = previous.get("sum") or 0
            if total is not None and total > old_total:
                worker.child_tasks.sum += total - old_total
        peak = count(reply.get("child_peak_rss_bytes"), report)
        if peak is not None:
            worker.child_peak_rss = peak
        max_tasks = count(reply.get("max_tasks_per_child"), report)
        max_memory = count(reply.get("max_memory_per_child_bytes"), report)
        if max_tasks is not None and max_memory is not None:
            worker.max_tasks_per_child, worker.max_memory_per_child = max_tasks, max_memory
            worker.limits_from_hook = True
        revoked, limit = count(reply.get("revoked"), report), count(reply.get("revoked_limit"), report)
        if revoked is not None:
            self.apply_revoked_count(hostname, revoked, limit, now)
        worker.hook_snapshot = (pid, {"replacements": {**old_replacements, **replacements},
                                      "counts": counts if counts is not None else previous.get("counts"),
                                      "sum": total if total is not None else previous.get("sum")})

    # ---------------------------------------------------------------- reading

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

    def seconds_without_task_events(self, now: float) -> float | None:
        """How long workers have sent heartbeats while no task event arrived
        (None when there are no live workers or task events do arrive)."""
        if self.task_events or not any(w.up for w in self.workers.values()):
            return None
        return now - min(w.first_seen for w in self.workers.values() if w.up)


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
