"""Every alert's threshold, window, `for:` and severity, defined once.

Pure data. Two things are made from it and must never be edited by hand:

- the alert rules: ``python -m celery_health_exporter.rules --write`` renders
  ``celery_health_exporter/rules.py``'s expression and annotation templates with these
  values into ``deploy/prometheus/alerts.yaml``, its Helm chart copy and the
  "Thresholds" table of ``docs/runbooks.md`` (``--check`` says whether they are current;
  tests/unit/test_thresholds.py fails while they are not);
- the findings (``celery_health_exporter/findings.py``: the status page, ``/api/findings``
  and ``doctor``), which read the same numbers and severities here.

The findings work on the exporter's in-memory state, which keeps lifetime counters and
current values, not PromQL windows. Where a finding cannot evaluate a rule's window it
uses the same numbers over what the state can compute; ``finding`` says which, for each
alert. A rule's ``for:`` only delays the page: a finding shows the condition as soon as it
holds.

To change a threshold: edit its value below, run ``python -m celery_health_exporter.rules
--write``, and adjust the promtool cases in ``deploy/prometheus/tests/`` that sit on either
side of it. To add an alert: add an ``Alert`` here, its ``Rule`` (expression and
annotations) in ``rules.py``, a section in ``docs/runbooks.md`` (its anchor is the
lower-cased name), a firing and a quiet case in ``deploy/prometheus/tests/``, then
``--write``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Union

Value = Union[int, float, str]  # numbers, or Prometheus durations such as "15m"

SEVERITIES = ("critical", "warning", "info")


@dataclass(frozen=True)
class Alert:
    name: str
    group: str
    severity: str
    for_: str  # the rule's `for:`
    values: Mapping[str, Value] = field(default_factory=dict)  # named in rules.py as ${name}
    finding: str = ""  # how the findings evaluate it; "" when no finding does

    def __post_init__(self):
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    def __getitem__(self, key: str) -> Value:
        return self.values[key]

    def seconds(self, key: str) -> float:
        """A duration value (or a number of seconds) in seconds."""
        return seconds(self.values[key])


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def seconds(value: Value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a Prometheus duration: {value!r}")
    return float(sum(int(n) * _UNITS[u] for n, u in parts))


ALERTS: tuple[Alert, ...] = (
    # ------------------------------------------------------------------ workers
    Alert("CeleryWorkerDown", "celery-workers", "critical", "3m",
          {"lookback": "1h"},
          finding="none: the status page lists the workers that are down"),
    Alert("CeleryWorkerRestartLoop", "celery-workers", "critical", "1m",
          {"restarts": 3, "window": "15m"},
          finding="restart_loop: `restarts` restarts since the exporter first saw the node name (the state "
                  "counts restarts, it does not keep their times: the same as `window` for a doctor run or a "
                  "daemon younger than it, and more than `window` after that)"),
    Alert("CeleryWorkerUncleanShutdown", "celery-workers", "warning", "1m",
          {"shutdowns": 0, "window": "30m"},
          finding="unclean_shutdown: more than `shutdowns` since the exporter first saw the node name"),
    Alert("CeleryWorkerUnrecoverableError", "celery-workers", "critical", "1m",
          {"count": 0, "window": "30m"},
          finding="unrecoverable_error: more than `count` since the exporter first saw the node name"),
    Alert("CeleryWorkerStalled", "celery-workers", "critical", "2m",
          finding="worker_stalled: the same test as celery_worker_stalled (--stall-after)"),
    Alert("CeleryTaskRunningTooLong", "celery-workers", "warning", "5m",
          {"age": 3600},
          finding="task_running_long: a task (per name) running for more than `age` seconds now"),
    # ---------------------------------------------------------- worker children
    Alert("CeleryWorkerChildRecycleStorm", "celery-worker-children", "critical", "5m",
          {"tasks_per_child": 5, "replacements": 10, "window": "15m"},
          finding="recycle_storm: fewer than `tasks_per_child` tasks per replacement (the hook's mean per "
                  "exited child, else tasks processed / replacements) with at least `replacements` "
                  "replacements, since the exporter first saw the worker instead of `window`"),
    Alert("CeleryWorkerChildMemoryNearLimit", "celery-worker-children", "warning", "10m",
          {"ratio": 0.9},
          finding="child_memory_near_limit: the host agent's smallest child RSS above `ratio` x "
                  "max_memory_per_child at the last scan"),
    # ------------------------------------------------------------- revoked set
    Alert("CeleryWorkerRevokedSetNearLimit", "celery-revoked-set", "warning", "15m",
          {"ratio": 0.8, "default_limit": 50000},
          finding="revoked_near_limit: the same ratio of the known limit, or of `default_limit` (Celery's "
                  "REVOKES_MAX) while the limit is unknown; a limit of 0 is unlimited"),
    Alert("CeleryTasksExpiring", "celery-revoked-set", "warning", "5m",
          {"expired": 100, "window": "15m"},
          finding="tasks_expired: more than `expired` per queue since the exporter started (fewer: info, "
                  "no alert)"),
    # ------------------------------------------------------------------ queues
    Alert("CeleryQueueWithoutConsumers", "celery-queues", "critical", "5m",
          finding="queue_without_consumer: ready messages and 0 consumers at the last poll"),
    Alert("CeleryQueueConsumersUnknown", "celery-queues", "warning", "5m",
          {"window": "15m"},
          finding="queue_consumers_unknown: ready messages at the last poll while the consumer count is "
                  "unknown (the state keeps no queue history: no `window`)"),
    Alert("CeleryQueueBacklogGrowing", "celery-queues", "warning", "15m",
          {"length": 100, "window": "15m"},
          finding="none: the state keeps no queue history"),
    Alert("CeleryQueueUnackedNearVisibilityTimeout", "celery-queues", "warning", "2m",
          {"ratio": 0.8},
          finding="unacked_near_visibility: the same ratio at the last poll"),
    # ------------------------------------------------------------------- tasks
    Alert("CeleryTasksLost", "celery-tasks", "warning", "1m",
          {"lost": 0, "window": "30m"},
          finding="tasks_lost: more than `lost` since the exporter started"),
    Alert("CeleryTaskHighFailRate", "celery-tasks", "warning", "5m",
          {"percent": 5, "window": "10m"},
          finding="task_high_fail_rate: more than `percent` % of the runs of a task name and queue failed "
                  "since the exporter started"),
    Alert("CeleryTaskUnpicklableException", "celery-tasks", "warning", "1m",
          {"count": 0, "window": "30m"},
          finding="unpicklable_exception: more than `count` since the exporter started"),
    # -------------------------------------------------------------- publishers
    Alert("CeleryPublishRetries", "celery-publishers", "warning", "5m",
          {"retries": 10, "window": "10m"},
          finding="publish_retries: more than `retries` in the publisher's totals (since its processes "
                  "started)"),
    Alert("CeleryPublishRetryPolicyExceeded", "celery-publishers", "critical", "1m",
          {"count": 0, "window": "15m"},
          finding="publish_policy_exceeded: more than `count` in the publisher's totals"),
    # -------------------------------------------------------------------- beat
    Alert("CeleryBeatDown", "celery-beat", "critical", "2m",
          {"lookback": "1h"},
          finding="beat_down: a beat whose celery_beat_up is 0 now (the state keeps it until "
                  "--purge-offline-after)"),
    Alert("CeleryPeriodicTaskMissed", "celery-beat", "critical", "1m",
          {"missed": 0, "window": "1h"},
          finding="periodic_task_missed: more than `missed` missed runs of an entry since the exporter started"),
    Alert("CeleryBeatDuplicateSchedulers", "celery-beat", "critical", "2m",
          {"instances": 1, "duplicates": 0, "window": "15m"},
          finding="duplicate_schedulers: more than `instances` beat processes up now, or more than `duplicates` "
                  "duplicate runs of an entry since the exporter started"),
    Alert("CeleryPeriodicTaskFailing", "celery-beat", "warning", "1m",
          {"failures": 3, "window": "6h"},
          finding="periodic_task_failing: at least `failures` failures of an entry since the exporter started, "
                  "its last run failed"),
    # ------------------------------------------------------------------- hosts
    Alert("CeleryOrphanedWorkerProcesses", "celery-hosts", "warning", "10m",
          {"processes": 0},
          finding="orphaned_processes: more than `processes` at the host agent's last scan"),
    # ---------------------------------------------------------------- exporter
    Alert("CeleryExporterDown", "celery-exporter", "critical", "5m",
          {"lookback": "1d", "vanished_lookback": "1h"},
          finding="none: a finding needs a running exporter"),
    Alert("CeleryExporterNoEvents", "celery-exporter", "critical", "5m",
          {"window": "5m", "workers_seen": "1h"},
          finding="none: no_task_events is a different condition (heartbeats without task events)"),
    Alert("CeleryExporterSourceDown", "celery-exporter", "warning", "5m",
          finding="queue_source_down: the broker poller's source down now (other sources: none)"),
    Alert("CeleryExporterEventLagHigh", "celery-exporter", "warning", "10m",
          {"quantile": 0.99, "lag": 5, "window": "5m"},
          finding="event_lag: the same quantile above `lag` seconds over the exporter's lifetime (its "
                  "histogram is cumulative), from at least 20 events"),
    Alert("CeleryExporterSourceFlapping", "celery-exporter", "warning", "30m",
          {"failures": 0, "window": "10m"},
          finding="none: the sources keep a lifetime count of failures, no history: one outage long ago "
                  "and a poller failing every few minutes look the same"),
    Alert("CeleryExporterInternalErrors", "celery-exporter", "warning", "1m",
          {"errors": 0, "window": "30m"},
          finding="internal_errors: more than `errors` per source since the exporter started (doctor: its "
                  "own run)"),
)

BY_NAME: Mapping[str, Alert] = MappingProxyType({a.name: a for a in ALERTS})


def alert(name: str) -> Alert:
    return BY_NAME[name]


# Thresholds of findings that no alert pages on (status page, /api/findings, doctor only).
FINDINGS_ONLY = MappingProxyType({
    "prefetch_hoarding_tasks": 4,  # unstarted tasks held by one worker while another is idle
    "mingle_copy_bytes": 10 * 1024 * 1024,  # revoked ids mingle copies at each worker start
    "mingle_bytes_per_id": 40,
    "redeliveries": 10,  # RabbitMQ redeliveries of a queue, and
    "redelivered_fraction": 0.05,  # their share of its deliveries
    "event_lag_min_events": 20,  # events before the lag quantile means anything
})
