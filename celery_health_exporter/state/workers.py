"""Workers in the model: their lifecycle from worker events (online, heartbeats, offline),
restarts, going down and being purged, and what makes one look stalled.

A part of ``ClusterState`` (see state/model.py): the methods here use its tables."""
from __future__ import annotations

from .cardinality import OTHER
from .events import MalformedEvent, count, interval, text
from .histogram import Histogram
from .tasks import TaskFlow, TaskRecord

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



class WorkerEvents:
    """Worker events and the workers' time-driven transitions (mixed into ClusterState)."""

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

    def seconds_without_task_events(self, now: float) -> float | None:
        """How long workers have sent heartbeats while no task event arrived
        (None when there are no live workers or task events do arrive)."""
        if self.task_events or not any(w.up for w in self.workers.values()):
            return None
        return now - min(w.first_seen for w in self.workers.values() if w.up)

    def _time_out_workers(self, now: float) -> None:
        """Workers silent past their timeout go down (their tasks may be lost); workers
        down for purge_offline_after are forgotten with their series."""
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
