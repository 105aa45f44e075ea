"""The diagnosis: what is wrong with the cluster, in sentences with numbers, and the fix.

One engine for the daemon's status page (``/``, ``/api/findings``) and the
``doctor`` command. Pure: it reads the state (the caller holds its lock) and
returns findings, worst first. Thresholds are the ones the alert rules use,
so that a finding and its alert agree.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
RUNBOOKS = "docs/runbooks.md"
MINGLE_BYTES_PER_ID = 40
REVOKES_MAX_DEFAULT = 50_000


@dataclass(frozen=True)
class Finding:
    id: str  # stable: kind and subject, e.g. "worker_stalled:celery@web1"
    kind: str
    severity: str  # critical | warning | info
    subject: str  # the worker, queue, task or publisher concerned
    summary: str  # what is wrong, one sentence with the numbers
    why: str  # the consequence
    fix: str  # the setting or command that fixes it
    metric: str  # the metric that tracks it
    alert: str  # the alert rule that pages on it ("" when none)

    def as_dict(self) -> dict:
        return asdict(self)


def _mb(value: float) -> str:
    return f"{value / 1024 / 1024:.0f} MB"


def _version(text: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", text or "")
    return tuple(int(n) for n in numbers[:2])


def diagnose(state, now: float, *, stall_after: float | None = None, hint_after: float = 60.0) -> list[Finding]:
    """Every finding the state supports right now, worst first."""
    found: list[Finding] = []
    found += _workers(state, now, hint_after)
    found += _tasks(state, now)
    found += _children(state)
    found += _revoked(state)
    found += _queues(state, now)
    found += _publishers(state)
    found += _hosts(state)
    found += _exporter(state)
    found.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.kind, f.subject))
    return found


# --------------------------------------------------------------------- workers

def _workers(state, now: float, hint_after: float) -> list[Finding]:
    out = []
    prefetched, oldest_by_worker, _ = state.in_flight()
    up = {h: w for h, w in state.workers.items() if w.up}
    idle = [h for h, w in up.items() if not w.busy and not prefetched.get(h)]
    for hostname, worker in state.workers.items():
        if worker.restarts >= 2:
            out.append(Finding(
                f"restart_loop:{hostname}", "restart_loop", "critical", hostname,
                f"{hostname} restarted {worker.restarts} times since the exporter started "
                f"({worker.unclean_shutdowns} without a clean shutdown).",
                "A worker in a restart loop runs few tasks and may crash on the same message again and again; "
                "a supervisor keeps it 'up'.",
                "Read the worker log just before each start: an 'Unrecoverable error' (e.g. an unpicklable "
                "exception) or an OOM kill. Fix the cause; on Celery <= 5.2 the worker exits 0 even then.",
                "celery_worker_restarts_total", "CeleryWorkerRestartLoop"))
        if worker.unclean_shutdowns:
            out.append(Finding(
                f"unclean_shutdown:{hostname}", "unclean_shutdown", "warning", hostname,
                f"{hostname} stopped {worker.unclean_shutdowns} time(s) without saying goodbye "
                "(heartbeats stopped, no worker-offline).",
                "Killed workers (SIGKILL, OOM killer, crash) lose the tasks they were running unless acks_late "
                "is on.",
                "Check the kernel log for OOM kills (dmesg) and the supervisor's stop signal and timeout "
                "(stopwaitsecs, terminationGracePeriodSeconds).",
                "celery_worker_unclean_shutdowns_total", "CeleryWorkerUncleanShutdown"))
        if state.is_stalled(worker, now):
            age = now - oldest_by_worker[hostname] if hostname in oldest_by_worker else None
            held = f"its oldest task has run for {age:.0f}s" if age is not None else "it holds tasks"
            out.append(Finding(
                f"worker_stalled:{hostname}", "worker_stalled", "critical", hostname,
                f"{hostname} holds {max(worker.running, worker.active or 0)} active task(s) and has finished "
                f"none for {now - max(worker.busy_since, worker.progress_at):.0f}s; {held}.",
                "A healthy-looking consumer that consumes nothing: its messages stay unacknowledged while the "
                "queue grows.",
                "Dump the stuck task's stack (py-spy dump --pid <child pid>) to find the deadlock; set "
                "task_time_limit so a hung task is killed.",
                "celery_worker_stalled", "CeleryWorkerStalled"))
        if worker.up and not worker.flows and now - worker.first_seen > hint_after:
            out.append(Finding(
                f"no_task_events:{hostname}", "no_task_events", "warning", hostname,
                f"{hostname} sends heartbeats but no task events for {now - worker.first_seen:.0f}s.",
                "Without task events there are no task counts, runtimes, lost tasks or stalls for this worker.",
                "Start the worker with -E (or worker_send_task_events = True), or run the exporter with "
                "--enable-events.",
                "celery_task_received_total", "CeleryExporterNoEvents"))
        if worker.up and _version(worker.sw_ver) and _version(worker.sw_ver) < (5, 3):
            out.append(Finding(
                f"old_celery:{hostname}", "old_celery", "warning", hostname,
                f"{hostname} runs Celery {worker.sw_ver}.",
                "Celery <= 5.2 exits with code 0 after an 'Unrecoverable error': supervisors and Kubernetes do "
                "not see the crash, and restart loops stay invisible.",
                "Upgrade to Celery 5.3 or later (celery#7544).",
                "celery_worker_info", "CeleryWorkerRestartLoop"))
        hoarded = prefetched.get(hostname, 0)
        if worker.up and hoarded >= 4 and any(h != hostname for h in idle):
            others = ", ".join(sorted(h for h in idle if h != hostname)[:3])
            out.append(Finding(
                f"prefetch_hoarding:{hostname}", "prefetch_hoarding", "warning", hostname,
                f"{hostname} holds {hoarded} tasks it has not started while {others} sit idle.",
                "Prefetched tasks wait behind long ones on one worker instead of running elsewhere.",
                "Lower worker_prefetch_multiplier (1 for long tasks) and use acks_late, or -O fair.",
                "celery_worker_prefetched_tasks", ""))
    return out


# ----------------------------------------------------------------------- tasks

def _tasks(state, now: float) -> list[Finding]:
    out = []
    _, _, oldest_by_name = state.in_flight()
    runtimes = state.runtime_by_name()
    for name, started in oldest_by_name.items():
        age = now - started
        count, total = runtimes.get(name, (0, 0.0))
        typical = total / count if count else None
        if age > 60 and (typical is None or age > 10 * typical):
            peers = f"{typical:.1f}s on average" if typical is not None else "no finished run to compare with"
            out.append(Finding(
                f"task_running_long:{name}", "task_running_long", "warning", name,
                f"A {name} task has been running for {age:.0f}s ({peers}).",
                "A task far beyond its peers is often hung (a lock, a socket without timeout) and holds a pool "
                "slot and its message.",
                "Set soft_time_limit/time_limit on the task; find the worker with celery inspect active.",
                "celery_task_active_oldest_age_seconds", "CeleryTaskRunningTooLong"))
    for (name, queue, reason), count in state.lost.items():
        out.append(Finding(
            f"tasks_lost:{name}:{queue}", "tasks_lost", "critical", name,
            f"{count} {name} task(s) from queue {queue} were lost ({reason}): their worker went away before "
            "finishing them.",
            "Those tasks will never run unless something republishes them.",
            "Use acks_late=True with task_reject_on_worker_lost=True for tasks that must not be lost, and find "
            "why the worker died (unclean shutdown finding).",
            "celery_task_lost_total", "CeleryTasksLost"))
    for (name, exception), count in state.unpicklable.items():
        out.append(Finding(
            f"unpicklable:{name}:{exception}", "unpicklable_exception", "critical", name,
            f"{name} raised {exception} {count} time(s), an exception that cannot be pickled.",
            "Before Celery 5.3 (and with Reject(exc) still) it kills the worker main process; the retry that "
            "was already published makes it a crash loop.",
            f"Make {exception} picklable: pass every __init__ argument to super().__init__(...) (or define "
            "__reduce__).",
            "celery_task_unpicklable_exceptions_total", "CeleryTaskUnpicklableException"))
    expired = sum(state.expired.values())
    if expired:
        out.append(Finding(
            "tasks_expired", "tasks_expired", "info", "cluster",
            f"{expired} task(s) expired before a worker could run them.",
            "Every expired task is added to every worker's revoked set, which mingle copies at each worker "
            "start.",
            "Run enough workers for the queue, or give the tasks a longer expires.",
            "celery_task_expired_total", "CeleryTasksExpiring"))
    return out


# ----------------------------------------------------------- children, revoked

def _children(state) -> list[Finding]:
    out = []
    for hostname, worker in state.workers.items():
        replaced = sum(worker.child_replacements.values())
        if replaced < 3:
            continue
        hist = worker.child_tasks
        per_child = hist.sum / hist.count if hist is not None and hist.count else None
        processed = worker.processed or 0
        storm = (per_child is not None and per_child < 10) or (per_child is None and processed
                                                               and replaced / processed > 0.2)
        if not storm:
            continue
        memory = worker.child_replacements.get("memory", 0)
        tasks = worker.child_replacements.get("tasks", 0)
        rate = f"every {per_child:.1f} tasks" if per_child is not None else f"{replaced} times for {processed} tasks"
        if memory >= tasks and memory and worker.max_memory_per_child:
            peak = f" while a child peaks at {_mb(worker.child_peak_rss)}" if worker.child_peak_rss else ""
            cause = (f"max_memory_per_child ({_mb(worker.max_memory_per_child)}) is below what a child "
                     f"uses{peak}")
            fix = ("Raise --max-memory-per-child above the children's normal peak RSS (or remove it); "
                   "find what makes a fresh child that large.")
        elif tasks and worker.max_tasks_per_child:
            cause = f"max_tasks_per_child is {worker.max_tasks_per_child}"
            fix = "Raise --max-tasks-per-child (hundreds or more) or remove it."
        else:
            cause = "children exit for a reason the exporter cannot see (install the worker hook)"
            fix = ("Call `celery_health_exporter.hooks.worker.install(app)` in the app module to learn why "
                   "children exit.")
        out.append(Finding(
            f"recycle_storm:{hostname}", "recycle_storm", "critical", hostname,
            f"{hostname} replaces a pool child {rate} ({replaced} replacements): {cause}.",
            "Each new child re-imports the app and warms up: CPU burns and throughput can drop more than "
            "tenfold.",
            fix, "celery_worker_child_replacements_total", "CeleryWorkerChildRecycleStorm"))
    return out


def _revoked(state) -> list[Finding]:
    out = []
    total_ids = 0
    sized = [w for w in state.workers.values() if w.up and w.revoked is not None]
    for worker in sized:
        total_ids += worker.revoked
        limit = worker.revoked_limit or REVOKES_MAX_DEFAULT
        if worker.revoked >= 0.8 * limit:
            out.append(Finding(
                f"revoked_near_limit:{worker.hostname}", "revoked_near_limit", "warning", worker.hostname,
                f"{worker.hostname}'s revoked set holds {worker.revoked} ids of at most {limit}"
                f"{'' if worker.revoked_limit else ' (Celery default assumed)'}.",
                "When full, the oldest revoked id is forgotten silently: a revoked task can then run.",
                "Find why so many tasks are revoked or expire; raise CELERY_WORKER_REVOKES_MAX only with "
                "--without-mingle.",
                "celery_worker_revoked_tasks", "CeleryWorkerRevokedSetNearLimit"))
    copied = len(sized) * total_ids * MINGLE_BYTES_PER_ID
    if copied > 10 * 1024 * 1024:
        out.append(Finding(
            "mingle_revoked", "mingle_revoked", "warning", "cluster",
            f"{len(sized)} workers hold {total_ids} revoked ids: with mingle on, every worker start copies about "
            f"{_mb(copied)}.",
            "Mingle makes each starting worker exchange revoked sets with all others: slow starts and broker "
            "load that grow with every worker.",
            "Start workers with --without-mingle, and stop the flood of expired or revoked tasks.",
            "celery_worker_revoked_tasks", "CeleryWorkerRevokedSetNearLimit"))
    return out


# ---------------------------------------------------------------------- queues

def _queues(state, now: float) -> list[Finding]:
    broker = getattr(state, "broker", None)
    if broker is None or broker.up is None:
        return [Finding(
            "no_queue_source", "no_queue_source", "info", "broker",
            "No broker poller runs: queue lengths, unacked messages and consumers are unknown.",
            "A queue that grows, or that nobody consumes, stays invisible.",
            "Run the exporter without --no-broker-poll (and with --rabbitmq-management-url on RabbitMQ).",
            "celery_queue_length", "CeleryQueueWithoutConsumers")]
    snapshot = broker.snapshot
    if not broker.up or snapshot is None:
        return [Finding(
            "queue_source_down", "queue_source_down", "warning", "broker",
            f"The broker poller is down: {broker.reason}.",
            "Queue lengths and consumers are unknown while it is down.",
            "Check the broker / management API address and credentials in the exporter's log.",
            "celery_exporter_source_up", "CeleryExporterSourceDown")]
    out = []
    consumers_from_workers = broker.consumers_from_workers(state, now) if snapshot.consumers_from_workers else None
    for name, queue in snapshot.queues.items():
        consumers = queue.consumers
        if consumers is None and consumers_from_workers is not None:
            consumers = consumers_from_workers.get(name, 0)
        if queue.ready > 0 and consumers == 0:
            out.append(Finding(
                f"queue_without_consumer:{name}", "queue_without_consumer", "critical", name,
                f"Queue {name} holds {queue.ready} ready message(s) and no worker consumes it.",
                "Tasks routed there never run: a black hole (a typo in task_routes, or a worker started "
                "without -Q for it).",
                f"Start a worker with -Q {name}, or fix the route that sends tasks there.",
                "celery_active_consumer_count", "CeleryQueueWithoutConsumers"))
        if queue.oldest_unacked_at is not None and snapshot.visibility_timeout:
            age = now - queue.oldest_unacked_at
            if age > 0.8 * snapshot.visibility_timeout:
                out.append(Finding(
                    f"unacked_near_visibility:{name}", "unacked_near_visibility", "warning", name,
                    f"A message of {name} has been unacknowledged for {age:.0f}s; the visibility timeout is "
                    f"{snapshot.visibility_timeout:.0f}s.",
                    "Past the visibility timeout kombu delivers it again: the task runs twice (the classic "
                    "'ETA tasks run twice').",
                    "Raise broker_transport_options visibility_timeout above your longest ETA/countdown and "
                    "runtime.",
                    "celery_queue_oldest_unacked_age_seconds", "CeleryQueueUnackedNearVisibilityTimeout"))
        if queue.redelivered and queue.delivered and queue.redelivered >= 10 and \
                queue.redelivered > 0.05 * queue.delivered:
            out.append(Finding(
                f"redeliveries:{name}", "redeliveries", "warning", name,
                f"{queue.redelivered} of {queue.delivered} deliveries of {name} were redeliveries.",
                "Redelivered tasks run again: workers die holding them, or connections drop.",
                "Look for worker crashes and connection churn (celery_broker_connections).",
                "celery_queue_messages_redelivered_total", ""))
    return out


# ------------------------------------------------------- publishers and hosts

def _publishers(state) -> list[Finding]:
    publishers = getattr(state, "publishers", None)
    if publishers is None:
        return []
    out = []
    for name, aggregate in publishers.publishers.items():
        totals = aggregate.total()
        if totals.exceeded:
            out.append(Finding(
                f"publish_policy_exceeded:{name}", "publish_policy_exceeded", "critical", name,
                f"{name} retried {totals.exceeded} publish(es) beyond task_publish_retry_policy's max_retries.",
                "The process blocks in publish far longer than configured (a kombu bug once made it retry "
                "forever).",
                "Upgrade kombu, and check that task_publish_retry_policy reaches apply_async.",
                "celery_publish_retry_policy_exceeded_total", "CeleryPublishRetryPolicyExceeded"))
        if totals.retries:
            failures = sum(totals.failures.values())
            out.append(Finding(
                f"publish_retries:{name}", "publish_retries", "warning", name,
                f"{name} retried publishing {totals.retries} time(s) for {totals.publishes} publish(es); "
                f"{failures} failed for good.",
                "Publishes that retry block web requests; failed ones are tasks that never exist.",
                "Check the broker connection from the publishers (network, broker memory/disk alarms).",
                "celery_publish_retries_total", "CeleryPublishRetries"))
    return out


def _hosts(state) -> list[Finding]:
    hosts = getattr(state, "hosts", None)
    if hosts is None or not hosts.scans:
        return []
    out = []
    scan = hosts.last
    if scan.orphans:
        out.append(Finding(
            "orphaned_processes", "orphaned_processes", "critical", "host",
            f"{scan.orphans} Celery worker process(es) have lost their main process and use "
            f"{_mb(scan.orphan_rss)} of RAM.",
            "Old workers left behind by restarts keep memory (and sometimes consume tasks) until the host "
            "runs out.",
            "Kill them (pids: " + ", ".join(str(p) for p in scan.orphan_pids[:10]) + "); in supervisor set "
            "stopasgroup=true and killasgroup=true.",
            "celery_host_orphaned_processes", "CeleryOrphanedWorkerProcesses"))
    return out


def _exporter(state) -> list[Finding]:
    out = []
    lag = state.event_lag
    if lag.count >= 20:
        # the bucket holding the 95th percentile
        target = 0.95 * lag.count
        for le, cumulative in lag.cumulative():
            if cumulative >= target:
                if le == "+Inf" or float(le) > 5:
                    out.append(Finding(
                        "event_lag", "event_lag", "warning", "exporter",
                        f"95% of events are processed within {le}s of being sent, above 5s.",
                        "Counts and ages lag behind; on RabbitMQ events older than the event queue's TTL are "
                        "dropped.",
                        "Check the exporter's CPU (celery_exporter_* metrics) and the broker's load; see "
                        "docs/scaling.md.",
                        "celery_exporter_event_lag_seconds", "CeleryExporterEventLagHigh"))
                break
    return out
