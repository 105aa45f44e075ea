"""What --flower-metrics costs in series, under real workers: N workers x M task names.

    python -m benchmarks.flower_series                      # 3 workers x 4 names
    python -m benchmarks.flower_series --workers 4 --names 3

On a Redis database of its own (tests.harness), the real daemon with --flower-metrics
(remote-control poller and broker poller off, so only event-driven series count), N real
prefork workers consuming one queue, and one publisher sending ``--per-name`` tasks of each of
M task names (tests.apps.testapp: add, sleep, fail, retry_once: the last two fail and retry).
Once every worker has run every name and the counts settle, one scrape: series per family
group, flower_* against the exporter's own celery_task_* and celery_worker_* families.
Prints a table; docs/dashboards-and-alerts.md (Migrating from Flower) quotes it.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.apps.testapp import client  # noqa: E402
from tests.harness import ExporterProcess, WorkerProcess, make_redis_broker, wait_for  # noqa: E402

TASKS = (("tests.add", (1, 2)), ("tests.sleep", (0.01,)), ("tests.fail", ()), ("tests.retry_once", ()))


def series_by_family(text: str) -> collections.Counter:
    counts = collections.Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            for suffix in ("_bucket", "_count", "_sum"):
                if name.endswith(suffix) and not name.endswith("_total"):
                    name = name[: -len(suffix)]
            counts[name] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--names", type=int, default=4, choices=range(1, len(TASKS) + 1))
    parser.add_argument("--per-name", type=int, default=60)
    args = parser.parse_args()

    broker = make_redis_broker()
    logs = Path(tempfile.mkdtemp(prefix="flower-series-"))
    exporter = ExporterProcess(broker.url, "--flower-metrics", "--inspect-interval", "0", "--no-broker-poll",
                               log_path=logs / "exporter.log")
    workers = []
    try:
        exporter.wait_ready()
        workers = [WorkerProcess(broker.url, f"series{n}", queues="series", concurrency=2,
                                 log_path=logs / f"worker{n}.log") for n in range(args.workers)]
        hostnames = {w.hostname for w in workers}
        wait_for(lambda: {labels["worker"] for labels, value in exporter.scrape().find("flower_worker_online")
                          if value == 1} >= hostnames, 60, 0.5, "workers online")
        publisher = client(broker.url)
        names = TASKS[: args.names]
        for _ in range(args.per_name):
            for name, task_args in names:
                publisher.send_task(name, task_args, queue="series")
        expected = {(w, name) for w in hostnames for name, _ in names}

        def settled():
            metrics = exporter.scrape()
            seen = {(labels["worker"], labels["task"]) for labels, _ in metrics.find("flower_events_total",
                                                                                     type="task-started")}
            finished = metrics.sum("flower_events_total", type="task-succeeded") + metrics.sum(
                "flower_events_total", type="task-failed")
            return seen >= expected and finished == args.per_name * len(names)

        wait_for(settled, 120, 1.0, "every worker ran every name, all tasks finished")
        time.sleep(3)  # a heartbeat more: executing counts back at 0 (measurement only, not a test)
        counts = series_by_family(exporter.scrape().text)
    finally:
        for worker in workers:
            worker.close()
        exporter.stop()
        broker.close()

    flower = {k: v for k, v in counts.items() if k.startswith("flower_")}
    groups = {
        "flower_* (all)": sum(flower.values()),
        "celery_task_* (ours)": sum(v for k, v in counts.items() if k.startswith("celery_task_")),
        "celery_worker_* (ours)": sum(v for k, v in counts.items() if k.startswith("celery_worker_")),
        "everything served": sum(counts.values()),
    }
    n, m = args.workers, args.names
    print(f"{n} workers x {m} task names, {args.per_name} tasks per name, one publisher process")
    print(f"{'family':<58} {'series':>7}")
    for name, value in sorted(flower.items()):
        print(f"{name:<58} {value:>7}")
    for name, value in groups.items():
        print(f"{name:<58} {value:>7}")
    print(f"flower_* per (worker, task name): {groups['flower_* (all)'] / (n * m):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
