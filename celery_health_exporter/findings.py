"""The diagnosis: what is wrong with the cluster, in sentences with numbers, and the fix.

One engine for the daemon's status page (``/``, ``/api/findings``) and the
``doctor`` command. Pure: it reads the state (the caller holds its lock) and
returns findings, worst first.

A finding whose ``alert`` is set evaluates that alert's thresholds and has its
severity, both read from celery_health_exporter/thresholds.py at every call (the
rules are generated from the same module); where the state cannot compute the
rule's window, thresholds.py says what the finding uses instead (``Alert.finding``).
KIND_ALERT lists which finding kind stands for which alert.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from . import thresholds

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
RUNBOOKS = "docs/runbooks.md"

# The finding kind that evaluates each alert's condition (tests/unit/test_thresholds.py checks
# that thresholds.py's Alert.finding names the same kind).
KIND_ALERT = {
    "restart_loop": "CeleryWorkerRestartLoop",
    "unclean_shutdown": "CeleryWorkerUncleanShutdown",
    "unrecoverable_error": "CeleryWorkerUnrecoverableError",
    "worker_stalled": "CeleryWorkerStalled",
    "task_running_long": "CeleryTaskRunningTooLong",
    "recycle_storm": "CeleryWorkerChildRecycleStorm",
    "child_memory_near_limit": "CeleryWorkerChildMemoryNearLimit",
    "revoked_near_limit": "CeleryWorkerRevokedSetNearLimit",
    "tasks_expired": "CeleryTasksExpiring",
    "queue_without_consumer": "CeleryQueueWithoutConsumers",
    "queue_consumers_unknown": "CeleryQueueConsumersUnknown",
    "unacked_near_visibility": "CeleryQueueUnackedNearVisibilityTimeout",
    "tasks_lost": "CeleryTasksLost",
    "task_high_fail_rate": "CeleryTaskHighFailRate",
    "unpicklable_exception": "CeleryTaskUnpicklableException",
    "publish_retries": "CeleryPublishRetries",
    "publish_policy_exceeded": "CeleryPublishRetryPolicyExceeded",
    "orphaned_processes": "CeleryOrphanedWorkerProcesses",
    "beat_down": "CeleryBeatDown",
    "periodic_task_missed": "CeleryPeriodicTaskMissed",
    "duplicate_schedulers": "CeleryBeatDuplicateSchedulers",
    "periodic_task_failing": "CeleryPeriodicTaskFailing",
    "queue_source_down": "CeleryExporterSourceDown",
    "event_lag": "CeleryExporterEventLagHigh",
    "internal_errors": "CeleryExporterInternalErrors",
}


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


def _rule(kind: str) -> thresholds.Alert:
    return thresholds.alert(KIND_ALERT[kind])


def _paging(kind: str, subject: str, summary: str, why: str, fix: str, metric: str, *, key: str = "",
            ident: str = "") -> Finding:
    """A finding that stands for an alert: its severity and alert name come from thresholds.py.
    Its id is kind:subject (kind:key), or `ident` where an older id is kept stable."""
    rule = _rule(kind)
    return Finding(ident or f"{kind}:{key or subject}", kind, rule.severity, subject, summary, why, fix, metric,
                   rule.name)


def _unrecoverable(state) -> list[Finding]:
    over = _rule("unrecoverable_error")["count"]
    counts: dict[str, int] = {}
    for (hostname, _exception), count in state.crashes.errors.items():
        counts[hostname] = counts.get(hostname, 0) + count
    out = []
    for hostname, count in counts.items():
        if count <= over:
            continue
        _at, exception, exit_code, task = state.crashes.last[hostname]
        cause = f"{exception}" if exception != "unknown" else "an error the worker hook would name"
        exited = f" and exits with code {exit_code}" if exit_code is not None else ""
        during = f", running {task}" if task and task != "unknown" else ""
        out.append(_paging(
            "unrecoverable_error", hostname,
            f"{hostname} stopped {count} time(s) on an unrecoverable error: {cause}{during}{exited}.",
            "The worker's main process logs 'Unrecoverable error' and stops; on Celery <= 5.2 with exit code 0, "
            "so its supervisor restarts it as if it had stopped cleanly, and the task that caused it (already "
            "published again for a retry) kills it again.",
            "Read the 'Unrecoverable error' traceback in the worker log. For a TypeError from unpickling, make "
            "the task's exception picklable (pass every __init__ argument to super().__init__) and upgrade to "
            "Celery >= 5.3, which exits 1 and wraps such exceptions.",
            "celery_worker_unrecoverable_errors_total"))
    return out


def _mb(value: float) -> str:
    return f"{value / 1024 / 1024:.0f} MB"


def _version(text: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", text or "")
    return tuple(int(n) for n in numbers[:2])


def diagnose(state, now: float, *, stall_after: float | None = None, hint_after: float = 60.0,
             internal_errors: dict[str, int] | None = None) -> list[Finding]:
    """Every finding the state supports right now, worst first. ``internal_errors``: the bugs
    contained so far per source (celery_exporter_internal_errors_total), which the sources and
    the metrics collector count outside the state."""
    found: list[Finding] = []
    found += _workers(state, now, hint_after)
    found += _tasks(state, now)
    found += _children(state)
    found += _revoked(state)
    found += _queues(state, now)
    found += _publishers(state)
    found += _beat(state, now)
    found += _hosts(state)
    found += _exporter(state)
    found += _internal_errors(internal_errors or {})
    found.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.kind, f.subject))
    return found


# --------------------------------------------------------------------- workers

def _workers(state, now: float, hint_after: float) -> list[Finding]:
    out = []
    prefetched, oldest_by_worker, _ = state.in_flight()
    up = {h: w for h, w in state.workers.items() if w.up}
    idle = [h for h, w in up.items() if not w.busy and not prefetched.get(h)]
    loop = _rule("restart_loop")
    unclean = _rule("unclean_shutdown")
    hoarding = thresholds.FINDINGS_ONLY["prefetch_hoarding_tasks"]
    for hostname, worker in state.workers.items():
        if worker.restarts >= loop["restarts"]:
            out.append(_paging(
                "restart_loop", hostname,
                f"{hostname} restarted {worker.restarts} times since the exporter started "
                f"({worker.unclean_shutdowns} without a clean shutdown).",
                "A worker in a restart loop runs few tasks and may crash on the same message again and again; "
                "a supervisor keeps it 'up'.",
                "Read the worker log just before each start: an 'Unrecoverable error' (e.g. an unpicklable "
                "exception) or an OOM kill. Fix the cause; on Celery <= 5.2 the worker exits 0 even then.",
                "celery_worker_restarts_total"))
        if worker.unclean_shutdowns > unclean["shutdowns"]:
            out.append(_paging(
                "unclean_shutdown", hostname,
                f"{hostname} stopped {worker.unclean_shutdowns} time(s) without saying goodbye "
                "(heartbeats stopped, no worker-offline).",
                "Killed workers (SIGKILL, OOM killer, crash) lose the tasks they were running unless acks_late "
                "is on.",
                "Check the kernel log for OOM kills (dmesg) and the supervisor's stop signal and timeout "
                "(stopwaitsecs, terminationGracePeriodSeconds).",
                "celery_worker_unclean_shutdowns_total"))
        if state.is_stalled(worker, now):
            age = now - oldest_by_worker[hostname] if hostname in oldest_by_worker else None
            held = f"its oldest task has run for {age:.0f}s" if age is not None else "it holds tasks"
            out.append(_paging(
                "worker_stalled", hostname,
                f"{hostname} holds {max(worker.running, worker.active or 0)} active task(s) and has finished "
                f"none for {now - max(worker.busy_since, worker.progress_at):.0f}s; {held}.",
                "A healthy-looking consumer that consumes nothing: its messages stay unacknowledged while the "
                "queue grows.",
                "Dump the stuck task's stack (py-spy dump --pid <child pid>) to find the deadlock; set "
                "task_time_limit so a hung task is killed.",
                "celery_worker_stalled"))
        if worker.up and not worker.flows and now - worker.first_seen > hint_after:
            out.append(Finding(
                f"no_task_events:{hostname}", "no_task_events", "warning", hostname,
                f"{hostname} sends heartbeats but no task events for {now - worker.first_seen:.0f}s.",
                "Without task events there are no task counts, runtimes, lost tasks or stalls for this worker.",
                "Start the worker with -E (or worker_send_task_events = True), or run the exporter with "
                "--enable-events.",
                "celery_task_received_total", ""))
        if worker.up and _version(worker.sw_ver) and _version(worker.sw_ver) < (5, 3):
            out.append(Finding(
                f"old_celery:{hostname}", "old_celery", "warning", hostname,
                f"{hostname} runs Celery {worker.sw_ver}.",
                "Celery <= 5.2 exits with code 0 after an 'Unrecoverable error': supervisors and Kubernetes do "
                "not see the crash, and restart loops stay invisible.",
                "Upgrade to Celery 5.3 or later (celery#7544).",
                "celery_worker_info", ""))
        hoarded = prefetched.get(hostname, 0)
        if worker.up and hoarded >= hoarding and any(h != hostname for h in idle):
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
    too_long = _rule("task_running_long")["age"]
    for name, started in oldest_by_name.items():
        age = now - started
        count, total = runtimes.get(name, (0, 0.0))
        typical = total / count if count else None
        if age > too_long:
            peers = f"{typical:.1f}s on average" if typical is not None else "no finished run to compare with"
            out.append(_paging(
                "task_running_long", name,
                f"A {name} task has been running for {age:.0f}s ({peers}).",
                "A task far beyond its peers is often hung (a lock, a socket without timeout) and holds a pool "
                "slot and its message.",
                "Set soft_time_limit/time_limit on the task; find the worker with celery inspect active.",
                "celery_task_active_oldest_age_seconds"))
    lost_over = _rule("tasks_lost")["lost"]
    for (name, queue, reason), count in state.lost.items():
        if count <= lost_over:
            continue
        out.append(_paging(
            "tasks_lost", name,
            f"{count} {name} task(s) from queue {queue} were lost ({reason}): their worker went away before "
            "finishing them.",
            "Those tasks will never run unless something republishes them.",
            "Use acks_late=True with task_reject_on_worker_lost=True for tasks that must not be lost, and find "
            "why the worker died (unclean shutdown finding).",
            "celery_task_lost_total", key=f"{name}:{queue}"))
    out += _unrecoverable(state)
    unpicklable_over = _rule("unpicklable_exception")["count"]
    for (name, exception), count in state.unpicklable.items():
        if count <= unpicklable_over:
            continue
        out.append(_paging(
            "unpicklable_exception", name,
            f"{name} raised {exception} {count} time(s), an exception that cannot be pickled.",
            "Before Celery 5.3 (and with Reject(exc) still) it kills the worker main process; the retry that "
            "was already published makes it a crash loop.",
            f"Make {exception} picklable: pass every __init__ argument to super().__init__(...) (or define "
            "__reduce__).",
            "celery_task_unpicklable_exceptions_total", ident=f"unpicklable:{name}:{exception}"))
    out += _expired(state)
    out += _fail_rates(state)
    return out


def _expired(state) -> list[Finding]:
    """Per queue: above the alert's count a warning; fewer expired tasks are only said (info)."""
    by_queue: dict[str, int] = {}
    for (_name, queue), count in state.expired.items():
        by_queue[queue] = by_queue.get(queue, 0) + count
    over = _rule("tasks_expired")["expired"]
    why = "Every expired task is added to every worker's revoked set, which mingle copies at each worker start."
    fix = "Run enough workers for the queue, or give the tasks a longer expires."
    out = []
    for queue, expired in sorted(by_queue.items()):
        summary = f"{expired} task(s) of queue {queue} expired before a worker could run them."
        if expired > over:
            out.append(_paging("tasks_expired", queue, summary, why, fix, "celery_task_expired_total"))
        elif expired:
            out.append(Finding(f"tasks_expired:{queue}", "tasks_expired", "info", queue, summary, why, fix,
                               "celery_task_expired_total", ""))
    return out


def _fail_rates(state) -> list[Finding]:
    """failed / (failed + succeeded) of each task name and queue, over every worker, since the
    exporter started."""
    runs: dict[tuple[str, str], list[int]] = {}
    for flow in state.all_flows():
        name, _hostname, queue = flow.labels
        counts = runs.setdefault((name, queue), [0, 0])
        counts[0] += sum(flow.failed.values())
        counts[1] += flow.succeeded
    percent_over = _rule("task_high_fail_rate")["percent"]
    out = []
    for (name, queue), (failed, succeeded) in sorted(runs.items()):
        if not failed:
            continue
        percent = 100 * failed / (failed + succeeded)
        if percent > percent_over:
            out.append(_paging(
                "task_high_fail_rate", name,
                f"{failed} of {failed + succeeded} runs of {name} on queue {queue} failed ({percent:.0f}%).",
                "Failing tasks are work that does not happen; retries of them load the workers.",
                "Read the exceptions (celery_task_failed_total by exception) and the worker log; fix the task "
                "or what it calls.",
                "celery_task_failed_total", key=f"{name}:{queue}"))
    return out


# ----------------------------------------------------------- children, revoked

def _children(state) -> list[Finding]:
    out = []
    rule = _rule("recycle_storm")
    for hostname, worker in state.workers.items():
        replaced = sum(worker.child_replacements.values())
        if replaced < rule["replacements"]:
            continue
        hist = worker.child_tasks
        per_child = hist.sum / hist.count if hist is not None and hist.count else None
        processed = worker.processed or 0
        tasks_per_replacement = per_child if per_child is not None else processed / replaced
        if not tasks_per_replacement < rule["tasks_per_child"]:
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
        out.append(_paging(
            "recycle_storm", hostname,
            f"{hostname} replaces a pool child {rate} ({replaced} replacements): {cause}.",
            "Each new child re-imports the app and warms up: CPU burns and throughput can drop more than "
            "tenfold.",
            fix, "celery_worker_child_replacements_total"))
    out += _child_memory(state)
    return out


def _child_memory(state) -> list[Finding]:
    """The host agent's smallest pool child of a node, against that worker's max_memory_per_child."""
    hosts = getattr(state, "hosts", None)
    if hosts is None or not hosts.scans:
        return []
    ratio = _rule("child_memory_near_limit")["ratio"]
    out = []
    for node, rss_min in sorted(hosts.last.child_rss_min.items()):
        worker = state.workers.get(node)
        limit = worker.max_memory_per_child if worker is not None else None
        if not limit or rss_min / limit <= ratio:
            continue
        out.append(_paging(
            "child_memory_near_limit", node,
            f"The smallest pool child of {node} uses {_mb(rss_min)}, {rss_min / limit:.0%} of "
            f"max_memory_per_child ({_mb(limit)}).",
            "A child is replaced after the task that takes it past the limit: when even a fresh child is that "
            "large, every child is recycled after a few tasks.",
            "Raise --max-memory-per-child well above a fresh child's RSS (or remove it); find what makes the "
            "app that large at import.",
            "celery_host_child_rss_min_bytes"))
    return out


def _revoked(state) -> list[Finding]:
    out = []
    total_ids = 0
    rule = _rule("revoked_near_limit")
    sized = [w for w in state.workers.values() if w.up and w.revoked is not None]
    for worker in sized:
        total_ids += worker.revoked
        # unknown (no hook): Celery's default; 0: unlimited, never near it
        limit = rule["default_limit"] if worker.revoked_limit is None else worker.revoked_limit
        if limit and worker.revoked / limit > rule["ratio"]:
            out.append(_paging(
                "revoked_near_limit", worker.hostname,
                f"{worker.hostname}'s revoked set holds {worker.revoked} ids of at most {limit}"
                f"{'' if worker.revoked_limit is not None else ' (Celery default assumed)'}.",
                "When full, the oldest revoked id is forgotten silently: a revoked task can then run.",
                "Find why so many tasks are revoked or expire; raise CELERY_WORKER_REVOKES_MAX only with "
                "--without-mingle.",
                "celery_worker_revoked_tasks"))
    copied = len(sized) * total_ids * thresholds.FINDINGS_ONLY["mingle_bytes_per_id"]
    if copied > thresholds.FINDINGS_ONLY["mingle_copy_bytes"]:
        out.append(Finding(
            "mingle_revoked", "mingle_revoked", "warning", "cluster",
            f"{len(sized)} workers hold {total_ids} revoked ids: with mingle on, every worker start copies about "
            f"{_mb(copied)}.",
            "Mingle makes each starting worker exchange revoked sets with all others: slow starts and broker "
            "load that grow with every worker.",
            "Start workers with --without-mingle, and stop the flood of expired or revoked tasks.",
            "celery_worker_revoked_tasks", ""))
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
            "celery_queue_length", "")]
    snapshot = broker.snapshot
    if not broker.up or snapshot is None:
        return [_paging(
            "queue_source_down", "broker",
            f"The broker poller is down: {broker.reason}.",
            "Queue lengths and consumers are unknown while it is down.",
            "Check the broker / management API address and credentials in the exporter's log.",
            "celery_exporter_source_up", ident="queue_source_down")]
    out = []
    consumers_from_workers = broker.consumers_from_workers(state, now) if snapshot.consumers_from_workers else None
    unknown_for = _rule("queue_consumers_unknown").seconds("window")
    waiting = broker.oldest_unstarted(state, now)
    unacked_ratio = _rule("unacked_near_visibility")["ratio"]
    redeliveries = thresholds.FINDINGS_ONLY["redeliveries"]
    redelivered_fraction = thresholds.FINDINGS_ONLY["redelivered_fraction"]
    for name, queue in snapshot.queues.items():
        consumers = queue.consumers
        if consumers is None and consumers_from_workers is not None:
            consumers = consumers_from_workers.get(name, 0)
        if queue.ready > 0 and consumers is None and waiting.get(name, 0) >= unknown_for:
            # The rule wants messages for its whole window; the state keeps no queue history, but a
            # task waiting that long (from its task-sent or receipt) says the queue never emptied.
            out.append(_paging(
                "queue_consumers_unknown", name,
                f"Queue {name} holds {queue.ready} ready message(s), one of them waiting for "
                f"{waiting[name]:.0f}s, and its consumers are unknown.",
                "On Redis without a working remote-control poll nobody can tell a black hole from a busy "
                "queue.",
                "Run the exporter with --inspect-interval above 0 and check that the poll works (its source "
                "on the status page); then a queue without consumers is found.",
                "celery_broker_consumers_known"))
        if queue.ready > 0 and consumers == 0:
            out.append(_paging(
                "queue_without_consumer", name,
                f"Queue {name} holds {queue.ready} ready message(s) and no worker consumes it.",
                "Tasks routed there never run: a black hole (a typo in task_routes, or a worker started "
                "without -Q for it).",
                f"Start a worker with -Q {name}, or fix the route that sends tasks there.",
                "celery_active_consumer_count"))
        if queue.oldest_unacked_at is not None and snapshot.visibility_timeout:
            age = now - queue.oldest_unacked_at
            if age / snapshot.visibility_timeout > unacked_ratio:
                out.append(_paging(
                    "unacked_near_visibility", name,
                    f"A message of {name} has been unacknowledged for {age:.0f}s; the visibility timeout is "
                    f"{snapshot.visibility_timeout:.0f}s.",
                    "Past the visibility timeout kombu delivers it again: the task runs twice (the classic "
                    "'ETA tasks run twice').",
                    "Raise broker_transport_options visibility_timeout above your longest ETA/countdown and "
                    "runtime.",
                    "celery_queue_oldest_unacked_age_seconds"))
        if queue.redelivered and queue.delivered and queue.redelivered >= redeliveries and \
                queue.redelivered > redelivered_fraction * queue.delivered:
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
    exceeded_over = _rule("publish_policy_exceeded")["count"]
    retries_over = _rule("publish_retries")["retries"]
    for name, aggregate in publishers.publishers.items():
        totals = aggregate.total()
        if totals.exceeded > exceeded_over:
            out.append(_paging(
                "publish_policy_exceeded", name,
                f"{name} retried {totals.exceeded} publish(es) beyond task_publish_retry_policy's max_retries.",
                "The process blocks in publish far longer than configured (a kombu bug once made it retry "
                "forever).",
                "Upgrade kombu, and check that task_publish_retry_policy reaches apply_async.",
                "celery_publish_retry_policy_exceeded_total"))
        if totals.retries > retries_over:
            failures = sum(totals.failures.values())
            out.append(_paging(
                "publish_retries", name,
                f"{name} retried publishing {totals.retries} time(s) for {totals.publishes} publish(es); "
                f"{failures} failed for good.",
                "Publishes that retry block web requests; failed ones are tasks that never exist.",
                "Check the broker connection from the publishers (network, broker memory/disk alarms).",
                "celery_publish_retries_total"))
    return out


def _beat(state, now: float) -> list[Finding]:
    """Periodic tasks, from the beat hook (docs/beat.md): nothing without it."""
    beat = getattr(state, "beat", None)
    if beat is None or not beat.seen:
        return []
    out = []
    for instance in beat.instances.values():
        if not instance.up and any(i.up for i in beat.instances.values() if i.beat == instance.beat):
            continue  # the same label is up again (a restart)
        if not instance.up:
            since = f" for {now - instance.down_since:.0f} s" if instance.down_since is not None else ""
            out.append(_paging(
                "beat_down", instance.beat,
                f"Beat {instance.beat} is down{since}: none of the {len(instance.entries)} entries of its "
                f"schedule is sent.",
                "Periodic tasks stop without an error anywhere: reports, cleanups and syncs silently do not run.",
                "Start beat again (exactly one), with a restart policy; read its log for why it stopped.",
                "celery_beat_up"))
    up = beat.instances_up()
    duplicates = {key: e.duplicates for key, e in beat.entries.items()
                  if e.duplicates > _rule("duplicate_schedulers")["duplicates"]}
    if up > _rule("duplicate_schedulers")["instances"] or duplicates:
        labels = sorted({i.beat for i in beat.instances.values() if i.up})
        runs = sum(duplicates.values())
        out.append(_paging(
            "duplicate_schedulers", "beat",
            f"{up} beat process(es) up ({', '.join(labels) or 'none'}); {runs} due time(s) sent twice.",
            "Every periodic task runs once per beat process: double e-mails, double charges.",
            "Run exactly one beat: one replica with a Recreate strategy, no `worker -B` on several workers.",
            "celery_beat_instances", ident="duplicate_schedulers"))
    missed_over = _rule("periodic_task_missed")["missed"]
    failing = _rule("periodic_task_failing")["failures"]
    for (entry, name), e in sorted(beat.entries.items()):
        if e.missed > missed_over:
            out.append(_paging(
                "periodic_task_missed", entry,
                f"Entry {entry} ({name}) missed {e.missed} due time(s) since the exporter started"
                + (f"; next due {now - e.awaited:.0f} s ago" if e.awaited is not None and e.awaited < now
                   else "") + ".",
                "A due time passed with no beat sending it: the job did not run (Celery does not catch up "
                "missed runs).",
                "Check that beat runs and is not stuck (celery_beat_up, its log); run the task by hand if the "
                "run must not be skipped.",
                "celery_beat_entry_missed_runs_total", key=f"{entry}:{name}"))
        if e.failures >= failing and e.outcome == "failed":
            out.append(_paging(
                "periodic_task_failing", entry,
                f"Entry {entry} ({name}) failed {e.failures} time(s) since the exporter started, its last run too.",
                "A periodic task that fails every run is a job not done since it started failing.",
                "Read the task's traceback in the worker log (celery_task_failed_total has the exception class) "
                "and fix the task.",
                "celery_beat_entry_failures_total", key=f"{entry}:{name}"))
    return out


def _hosts(state) -> list[Finding]:
    hosts = getattr(state, "hosts", None)
    if hosts is None or not hosts.scans:
        return []
    out = []
    scan = hosts.last
    if scan.orphans > _rule("orphaned_processes")["processes"]:
        out.append(_paging(
            "orphaned_processes", "host",
            f"{scan.orphans} Celery worker process(es) have lost their main process and use "
            f"{_mb(scan.orphan_rss)} of RAM.",
            "Old workers left behind by restarts keep memory (and sometimes consume tasks) until the host "
            "runs out.",
            "Kill them (pids: " + ", ".join(str(p) for p in scan.orphan_pids[:10]) + "); in supervisor set "
            "stopasgroup=true and killasgroup=true.",
            "celery_host_orphaned_processes", ident="orphaned_processes"))
    return out


def histogram_quantile(q: float, cumulative: list[tuple[str, int]]) -> float | None:
    """Prometheus' histogram_quantile over (le, cumulative count) pairs ending with +Inf: linear
    interpolation inside the bucket that holds the quantile (the lowest bucket starts at 0; in the
    +Inf bucket, the highest finite bound)."""
    if not cumulative or cumulative[-1][1] == 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0
    for le, count in cumulative:
        if count >= rank:
            if le == "+Inf":
                return lower
            upper = float(le)
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = float(le), count
    return lower


def _exporter(state) -> list[Finding]:
    out = []
    lag = state.event_lag
    rule = _rule("event_lag")
    if lag.count >= thresholds.FINDINGS_ONLY["event_lag_min_events"]:
        value = histogram_quantile(rule["quantile"], lag.cumulative())
        if value is not None and value > rule["lag"]:
            percent = f"{rule['quantile'] * 100:g}"
            out.append(_paging(
                "event_lag", "exporter",
                f"{percent}% of events are processed within {value:.1f}s of being sent, above {rule['lag']}s.",
                "Counts and ages lag behind; on RabbitMQ events older than the event queue's TTL are "
                "dropped.",
                "Check the exporter's CPU (celery_exporter_* metrics) and the broker's load; see "
                "docs/scaling.md.",
                "celery_exporter_event_lag_seconds", ident="event_lag"))
    return out


# What one contained bug skipped, per source of celery_exporter_internal_errors_total (docs/runbooks.md,
# CeleryExporterInternalErrors, says the same).
SKIPPED = {
    "events": "a Celery event (the task and worker counts, states and ages it would have changed) or a periodic "
              "step of the events source",
    "inspect": "a remote-control poll (active, prefetched and reserved tasks, pool and queue settings, the worker "
               "hook's figures; on Redis the consumer counts)",
    "rabbitmq": "a poll of the broker's queues (lengths, consumers, message rates: dropped until the next poll)",
    "redis": "a poll of the broker's queues (lengths, unacked messages: dropped until the next poll)",
    "host": "a scan of the host's processes (worker processes, their memory, orphans)",
    "scrape": "a metrics area of a scrape (celery_exporter_scrape_collector_success{collector=...} is 0 for it)",
    "tick": "the rest of a once-a-second tick of the model (workers timing out, tasks declared lost, purges: "
            "retried at the next tick)",
}


def _internal_errors(counts: dict[str, int]) -> list[Finding]:
    over = _rule("internal_errors")["errors"]
    out = []
    for source, count in sorted(counts.items()):
        if count <= over:
            continue
        out.append(_paging(
            "internal_errors", source,
            f"The exporter contained {count} bug(s) in its {source} source since it started.",
            f"Each one skipped {SKIPPED.get(source, 'a read of this source')}: that data is missing, the rest "
            "goes on. A bug of the exporter, not a failure of the broker.",
            "Find the traceback in the exporter's log ('internal error while ...' or 'metrics area ... failed', "
            "once per place) and report it with the exporter's version.",
            "celery_exporter_internal_errors_total"))
    return out
