"""Worker liveness, lifecycle and pool health: heartbeats, restarts, stalls, child recycling, revoked sets."""
from __future__ import annotations

from .definitions import counter, gauge, histogram

UP = gauge("worker_up", "1 while the worker sends heartbeats; 0 after worker-offline or --worker-timeout "
           "seconds of silence.", "hostname")
TASKS_ACTIVE = gauge("worker_tasks_active", "Tasks the worker is running, from its last heartbeat.", "hostname")
INFO = gauge("worker_info", "Worker software, always 1.", "hostname", "sw_ident", "sw_ver", "sw_sys")
HEARTBEAT_AGE = gauge("worker_heartbeat_age_seconds", "Seconds since the worker's last event.", "hostname")
PROCESSED = counter("worker_tasks_processed", "Tasks the worker process has processed, from its heartbeats "
                    "(resets when the worker restarts).", "hostname")
START_TIME = gauge("worker_start_time_seconds", "Unix time the current worker process started (worker-online, "
                   "or inspect stats uptime).", "hostname")
RESTARTS = counter("worker_restarts", "Times a known node name came back as a new process (worker-online again, "
                   "new pid, or its processed count reset).", "hostname")
UNCLEAN = counter("worker_unclean_shutdowns", "Worker processes whose heartbeats stopped without worker-offline "
                  "(killed, OOM, crash).", "hostname")
UNRECOVERABLE = counter("worker_unrecoverable_errors", "Worker main processes that stopped on an unrecoverable "
                        "error (\"Unrecoverable error: ...\" in the worker log; exit code 0 on Celery <= 5.2, so a "
                        "supervisor calls it a clean exit), by exception class: reported by the worker hook; without "
                        "it, exception=\"unknown\" when a task failed with WorkerLostError exit code 0 and its "
                        "worker went down (a lower bound).", "hostname", "exception")
PREFETCHED = gauge("worker_prefetched_tasks", "Tasks the worker received and has not started (from events; from "
                   "inspect reserved for workers without task events).",
                   "hostname")
OLDEST_ACTIVE = gauge("worker_oldest_active_task_age_seconds", "Age of the longest-running unfinished task on the "
                      "worker (0 when none), from events.", "hostname")
STALLED = gauge("worker_stalled", "1 when the worker holds active tasks and has finished none for --stall-after "
                "seconds (a deadlocked task holding its messages), else 0.", "hostname")
POOL_PROCESSES = gauge("worker_pool_processes", "Pool child processes, from inspect stats (prefork only).",
                       "hostname")
MAX_CONCURRENCY = gauge("worker_pool_max_concurrency", "Pool max concurrency, from inspect stats.", "hostname")
PREFETCH_COUNT = gauge("worker_prefetch_count", "The worker's current prefetch count, from inspect stats.",
                       "hostname")
CHILD_REPLACEMENTS = counter(
    "worker_child_replacements",
    "Pool children that were replaced. reason=memory|tasks|signal|error with the worker hook (exact); "
    "reason=unknown without it: new child pids seen between two inspect polls, a lower bound.",
    "hostname", "reason")
CHILD_TASKS = histogram("worker_child_tasks", "Tasks a pool child ran before it was replaced (worker hook).",
                        "hostname")
CHILD_PEAK_RSS = gauge("worker_child_peak_rss_bytes", "Largest peak RSS (ru_maxrss, what billiard compares with "
                       "max_memory_per_child) of the last 5 children that exited (worker hook).", "hostname")
MAX_TASKS_PER_CHILD = gauge("worker_max_tasks_per_child", "max_tasks_per_child in effect, 0 = none (exact with the "
                            "hook; from inspect stats otherwise).", "hostname")
MAX_MEMORY_PER_CHILD = gauge("worker_max_memory_per_child_bytes", "max_memory_per_child in effect, 0 = none "
                             "(exact with the hook; without it only a value set in configuration is visible).",
                             "hostname")
REVOKED = gauge("worker_revoked_tasks", "Size of the worker's revoked set (hook, or inspect revoked with "
                "--revoked-interval).", "hostname")
REVOKED_LIMIT = gauge("worker_revoked_tasks_limit", "maxlen of the worker's revoked set (worker hook).",
                      "hostname")

DEFINITIONS = (UP, TASKS_ACTIVE, INFO, HEARTBEAT_AGE, PROCESSED, START_TIME, RESTARTS, UNCLEAN, UNRECOVERABLE,
               PREFETCHED,
               OLDEST_ACTIVE, STALLED, POOL_PROCESSES, MAX_CONCURRENCY, PREFETCH_COUNT, CHILD_REPLACEMENTS,
               CHILD_TASKS, CHILD_PEAK_RSS, MAX_TASKS_PER_CHILD, MAX_MEMORY_PER_CHILD, REVOKED, REVOKED_LIMIT)

_OPTIONAL = ((START_TIME, "start_time"), (POOL_PROCESSES, "pool_processes"), (MAX_CONCURRENCY, "max_concurrency"),
             (PREFETCH_COUNT, "prefetch_count"), (CHILD_PEAK_RSS, "child_peak_rss"),
             (MAX_TASKS_PER_CHILD, "max_tasks_per_child"), (MAX_MEMORY_PER_CHILD, "max_memory_per_child"),
             (REVOKED, "revoked"), (REVOKED_LIMIT, "revoked_limit"))


def collect(ctx):
    state = ctx.state
    now = ctx.now
    prefetched, oldest_by_worker, _ = ctx.in_flight
    for (hostname, exception), count in state.crashes.errors.items():
        yield UNRECOVERABLE, (hostname, exception), count
    for hostname, worker in state.workers.items():
        labels = (hostname,)
        yield UP, labels, 1 if worker.up else 0
        if worker.active is not None:
            yield TASKS_ACTIVE, labels, worker.active if worker.up else 0
        if worker.sw_ident or worker.sw_ver:
            yield INFO, (hostname, worker.sw_ident, worker.sw_ver, worker.sw_sys), 1
        if worker.last_heartbeat is not None:
            yield HEARTBEAT_AGE, labels, max(0.0, now - worker.last_heartbeat)
        if worker.processed is not None:
            yield PROCESSED, labels, worker.processed
        yield RESTARTS, labels, worker.restarts
        yield UNCLEAN, labels, worker.unclean_shutdowns
        if worker.flows:
            yield PREFETCHED, labels, prefetched.get(hostname, 0)
            started = oldest_by_worker.get(hostname)
        else:  # no task events from this worker: what remote control said, if anything
            if worker.inspect_prefetched is not None:
                yield PREFETCHED, labels, worker.inspect_prefetched
            started = worker.inspect_oldest_start
        yield OLDEST_ACTIVE, labels, 0.0 if started is None else max(0.0, now - started)
        yield STALLED, labels, 1 if state.is_stalled(worker, now) else 0
        for definition, attribute in _OPTIONAL:
            value = getattr(worker, attribute)
            if value is not None:
                yield definition, labels, value
        for reason, count in worker.child_replacements.items():
            yield CHILD_REPLACEMENTS, (hostname, reason), count
        if worker.child_tasks is not None:
            yield CHILD_TASKS, labels, worker.child_tasks
