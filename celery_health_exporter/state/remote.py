"""What remote control (``inspect``) and the worker hook tell about workers: pool and
limits, consumed queues, prefetched and running tasks (and the started tasks a worker no
longer runs), revoked-set sizes, child-process replacements.

A part of ``ClusterState`` (see state/model.py): the methods here use its tables."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .events import MAX_COUNT, MAX_DURATION, count, duration, timestamp
from .histogram import Histogram

if TYPE_CHECKING:
    from .workers import WorkerState

CHILD_TASK_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 500, 1000)
HOOK_REASONS = ("memory", "tasks", "signal", "error")


class RemoteControlData:
    """Remote-control replies and the worker hook's numbers (mixed into ClusterState)."""

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
