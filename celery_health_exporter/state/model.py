"""The in-memory model of a Celery cluster, fed by events, read at scrape time.

``ClusterState`` holds the tables and dispatches events; its parts live in their own
modules, one reason to change each: workers (state/workers.py), the task table and its
reconciliation (state/tasks.py), remote-control and worker-hook data (state/remote.py);
sub-models with their own tables hang off it (broker, hosts, publishers, crashes, beat,
Flower's bookkeeping).

Pure Python, no I/O: every method takes ``now`` so tests control time. Memory
is bounded: the in-flight task table has a hard cap (oldest evicted and
counted), workers that stay gone are purged with all their series.

Thread model: sources apply events from their own threads, the exporter's ticker runs
``tick`` from another, and a scrape copies what it needs (metrics.StateCollector.snapshot)
from a third; each holds ``ClusterState.lock`` while it touches the model, a scrape only
for the copy. The asyncio loop never takes it.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from .beat import BeatState
from .cardinality import CardinalityCaps
from .crashes import CrashState
from .events import MalformedEvent, event_timestamp, event_type, text
from .histogram import Histogram
from .hosts import HostState
from .publishers import PublisherState
from .queues import BrokerState
from .remote import CHILD_TASK_BUCKETS, HOOK_REASONS, RemoteControlData
from .tasks import GENERIC, TERMINAL_EVENTS, UNKNOWN, TaskFlow, TaskRecord, TaskTable, host_part
from .workers import WorkerEvents, WorkerState

__all__ = ["CHILD_TASK_BUCKETS", "GENERIC", "HOOK_REASONS", "UNKNOWN", "ClusterState", "TaskFlow", "TaskRecord",
           "WorkerState", "host_part", "local_utcoffset"]

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MAX_EVENT_TYPES = 64  # custom event types are user-defined strings: keep the label bounded


def local_utcoffset() -> float:
    """This host's offset to UTC in hours, as Celery computes it for its events
    (``celery.utils.time.utcoffset``): hours WEST of UTC, so Berlin is -1 or -2.
    Both ends must use the same sign, or every timestamp is off by twice the offset."""
    seconds_west = time.altzone if time.localtime().tm_isdst else time.timezone
    return seconds_west / 3600





class ClusterState(WorkerEvents, TaskTable, RemoteControlData):
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
        self.flower = None  # --flower-metrics: a state.flower.FlowerState (registers its handlers)

    def register_handler(self, event_type: str, handler) -> None:
        """Let a part of the model outside this class take an event type of its
        own (e.g. the publisher hook's custom event). ``handler(event, now, ts)``."""
        self._handlers[event_type] = handler

    def follow(self, event_type: str, listener) -> None:
        """Call ``listener(event, now, ts)`` after the model's own handler of ``event_type``
        (a follower with bookkeeping of its own, e.g. Flower's); an event the model refuses
        as malformed reaches no follower, and held events reach them when released."""
        own = self._handlers.get(event_type)

        def both(event: dict, now: float, ts: float) -> None:
            if own is not None:
                own(event, now, ts)
            listener(event, now, ts)

        self._handlers[event_type] = both

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

    def count_malformed(self, reason: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1

    def _count_type(self, kind: str) -> None:
        counts = self.events_by_type
        if kind not in counts and len(counts) >= MAX_EVENT_TYPES:
            kind = "other"
        counts[kind] = counts.get(kind, 0) + 1

    def tick(self, now: float) -> None:
        """Every time-driven transition of the model, in one place, run by the exporter's
        timer (once a second) and never by readers: silent workers go down, their
        unfinished tasks are declared lost after the grace period, long-gone workers
        are purged, crash, beat, publisher and Flower records expire, terminal events
        still waiting for their task-sent are counted as unknown."""
        self._time_out_workers(now)
        if self.pending_lost and self.pending_lost[0][0] <= now:
            self._declare_lost(now)
        self.crashes.expire(now)
        self.beat.expire(now)
        self.publishers.expire(now)
        if self.flower is not None:
            self.flower.expire(now)
        self._release_due_unattributed(now)
