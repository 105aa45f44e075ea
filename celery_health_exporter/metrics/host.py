"""Celery worker processes on the exporter's host, from the host agent (--host-metrics, psutil)."""
from __future__ import annotations

from .definitions import counter, gauge

ROLE_LABELS = ("hostname", "role")

PROCESSES = gauge("host_worker_processes", "Worker processes of the node on this host: role=main (the worker "
                  "itself) or child (its pool processes). Orphans are not included.", *ROLE_LABELS)
RSS = gauge("host_worker_rss_bytes", "Resident memory of the node's processes, summed per role.", *ROLE_LABELS)
CPU = counter("host_worker_cpu_seconds", "CPU time (user + system) of the node's processes per role, including "
              "pool children that have exited since the agent saw them.", *ROLE_LABELS)
CHILD_RSS_MIN = gauge("host_child_rss_min_bytes", "RSS of the node's smallest pool child: near "
                      "max_memory_per_child, every child is recycled after a few tasks.", "hostname")
CHILD_RSS_MAX = gauge("host_child_rss_max_bytes", "RSS of the node's largest pool child.", "hostname")
CHILD_SPAWNS = counter("host_child_spawns", "Pool children seen for the first time (by pid and create time), "
                       "including those running at the agent's first scan: its rate shows a recycle storm.",
                       "hostname")
ORPHANS = gauge("host_orphaned_processes", "Celery worker processes whose worker main process is gone "
                "(re-parented to init or a subreaper) or that belong to no live worker.")
ORPHAN_RSS = gauge("host_orphaned_rss_bytes", "Resident memory held by the orphaned worker processes.")
SCAN_DURATION = gauge("host_scan_duration_seconds", "Wall time of the host agent's last process-table scan.")
SCANNED = gauge("host_scanned_processes", "Processes in the host's process table at the last scan.")

DEFINITIONS = (PROCESSES, RSS, CPU, CHILD_RSS_MIN, CHILD_RSS_MAX, CHILD_SPAWNS, ORPHANS, ORPHAN_RSS,
               SCAN_DURATION, SCANNED)


def collect(ctx):
    hosts = getattr(ctx.state, "hosts", None)
    if hosts is None or not hosts.scans:
        return  # no host agent: no host series at all
    last = hosts.last
    for (node, role), count in last.processes.items():
        yield PROCESSES, (node, role), count
        yield RSS, (node, role), last.rss.get((node, role), 0)
    for (node, role), seconds in hosts.cpu_seconds.items():
        yield CPU, (node, role), seconds
    for node, rss in last.child_rss_min.items():
        yield CHILD_RSS_MIN, (node,), rss
    for node, rss in last.child_rss_max.items():
        yield CHILD_RSS_MAX, (node,), rss
    for node, count in hosts.child_spawns.items():
        yield CHILD_SPAWNS, (node,), count
    yield ORPHANS, (), last.orphans
    yield ORPHAN_RSS, (), last.orphan_rss
    yield SCAN_DURATION, (), hosts.scan_duration
    yield SCANNED, (), hosts.scanned
