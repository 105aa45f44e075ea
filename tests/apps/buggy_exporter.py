"""The real exporter daemon with three bugs injected, for tests/integration/test_internal_errors.py.

- the events source: applying the task-succeeded event of a task whose id starts with
  ``boom-`` raises (as a bug in the state model would);
- a metrics area: the beat area's collect raises at every scrape;
- a poller: applying the remote-control ``stats`` replies raises at every poll.
Everything else is the production code, started by its own ``main``. BUGGY_EXPORTER_BUGS
injects only some (comma-separated: events, area, stats; all by default).
"""
import os
import sys

from celery_health_exporter import cli
from celery_health_exporter.metrics import beat
from celery_health_exporter.state.model import ClusterState

_on_task_succeeded = ClusterState._on_task_succeeded


def _buggy_succeeded(self, event, now, ts):
    if str(event.get("uuid", "")).startswith("boom-"):
        raise RuntimeError("injected bug: task-succeeded")
    return _on_task_succeeded(self, event, now, ts)


def _buggy_collect(ctx):
    yield from ()
    raise RuntimeError("injected bug: beat area")


def _buggy_stats(self, hostname, stats, now):
    raise RuntimeError("injected bug: stats reply")


BUGS = os.environ.get("BUGGY_EXPORTER_BUGS", "events,area,stats").split(",")
if "events" in BUGS:
    ClusterState._on_task_succeeded = _buggy_succeeded
if "area" in BUGS:
    beat.collect = _buggy_collect
if "stats" in BUGS:
    ClusterState.apply_stats = _buggy_stats

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
