"""Memory of the exporter's state under long runs, many open tasks and a cardinality attack.

    python -m benchmarks.memory                 # all three scenarios, each in a fresh process
    python -m benchmarks.memory --only flat --tasks 2000000

Each scenario builds the exporter as the daemon does (``Exporter(config)``)
and feeds real-format event bodies through the events source's own
``apply_body`` (JSON decode, ``task.multi`` lists of 24, state update), without
a broker so that only the exporter's memory is measured:

- flat: ``--tasks`` (2M) tasks over 200 names and 50 workers, each
  received/started/succeeded (5 % failed); RSS sampled every 10 % - it must
  stop growing once every label set exists;
- in_flight: 100,000 tasks received and started, none finished: RSS with the
  in-flight table full (the issue's bound: 120 MB);
- cardinality: 10,000 distinct worker names and 10,000 distinct task names:
  RSS, how many series remain and what was folded (the caps of --max-workers /
  --max-task-names).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def build():
    from celery_health_exporter.app import Exporter
    from celery_health_exporter.cli import config_from_args
    from celery_health_exporter.sources.events import EventsSource

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = config_from_args(["--broker-url", "amqp://guest:guest@127.0.0.1:5672//",
                               "--listen-address", "127.0.0.1:9"], env={})
    exporter = Exporter(config, sock)
    source = next(s for s in exporter.sources if isinstance(s, EventsSource))
    return exporter, source


def events_for(i: int, name: str, host: str, finish: bool, fail: bool) -> list[dict]:
    now = time.time()
    task_id = str(uuid.UUID(int=i + (1 << 100)))
    base = {"hostname": host, "utcoffset": 0, "pid": 4242, "clock": i, "timestamp": now, "uuid": task_id}
    out = [{**base, "type": "task-received", "name": name, "args": "(1, 2)", "kwargs": "{}", "retries": 0,
            "root_id": task_id, "parent_id": None, "eta": None, "expires": None},
           {**base, "type": "task-started"}]
    if finish:
        if fail:
            out.append({**base, "type": "task-failed", "exception": "ValueError('boom')",
                        "traceback": "Traceback (most recent call last):\n  ...\nValueError: boom\n"})
        else:
            out.append({**base, "type": "task-succeeded", "result": "'ok'", "runtime": 0.1})
    return out


def feed(source, tasks: int, names: int, workers: int, finish=True, offset=0, samples=10, heartbeat_every=5000):
    batch, points = [], []
    step = max(1, tasks // samples)
    for i in range(tasks):
        j = i + offset
        host = f"worker{j % workers}@bench"
        batch.extend(events_for(j, f"app.tasks.job{j % names}", host, finish, fail=j % 20 == 0))
        if len(batch) >= 24:
            source.apply_body(json.dumps(batch).encode(), "application/json")
            batch = []
        if i % heartbeat_every == 0:
            for w in range(min(workers, 1000)):
                source.apply_body(json.dumps({"type": "worker-heartbeat", "hostname": f"worker{w}@bench",
                                              "utcoffset": 0, "pid": 1, "timestamp": time.time(), "freq": 2.0,
                                              "active": 1, "processed": i}).encode(), "application/json")
        if (i + 1) % step == 0:
            points.append((i + 1, round(rss_mb(), 1)))
    if batch:
        source.apply_body(json.dumps(batch).encode(), "application/json")
    return points


def scrape_text(exporter) -> str:
    """What /metrics serves: the state's families (written directly) and process_*."""
    from prometheus_client.exposition import generate_latest

    return exporter.collector.render() + generate_latest(exporter.registry).decode()


def scenario_flat(args) -> dict:
    exporter, source = build()
    start = rss_mb()
    started = time.perf_counter()
    points = feed(source, args.tasks, 200, 50)
    seconds = time.perf_counter() - started
    half = points[len(points) // 2 - 1][1]
    return {"scenario": "flat", "tasks": args.tasks, "rss_start_mb": round(start, 1), "rss_points_mb": points,
            "rss_growth_second_half_mb": round(points[-1][1] - half, 1), "rss_end_mb": points[-1][1],
            "tracked_tasks": exporter.state.tracked_tasks, "events_per_s": round(args.tasks * 3 / seconds),
            "metrics_bytes": len(scrape_text(exporter))}


def scenario_in_flight(args) -> dict:
    exporter, source = build()
    start = rss_mb()
    feed(source, 100_000, 200, 50, finish=False)
    return {"scenario": "in_flight", "open_tasks": 100_000, "rss_start_mb": round(start, 1),
            "rss_end_mb": round(rss_mb(), 1), "tracked_tasks": exporter.state.tracked_tasks,
            "evicted": exporter.state.tracked_evicted}


def scenario_cardinality(args) -> dict:
    exporter, source = build()
    start = rss_mb()
    # 10,000 worker names, each with a heartbeat and a task of one of 10,000 names
    for w in range(10_000):
        host = f"attacker{w}@bench"
        source.apply_body(json.dumps({"type": "worker-heartbeat", "hostname": host, "utcoffset": 0, "pid": 1,
                                      "timestamp": time.time(), "freq": 2.0, "active": 0,
                                      "processed": 0}).encode(), "application/json")
        source.apply_body(json.dumps(events_for(w, f"attack.task{w}", host, True, False)).encode(),
                          "application/json")
    state = exporter.state
    flows = sum(len(worker.flows) for worker in state.workers.values())
    from prometheus_client.parser import text_string_to_metric_families

    text = scrape_text(exporter)
    folded = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("label_values_folded_total"):
                folded[json.dumps(sample.labels, sort_keys=True)] = sample.value
    return {"scenario": "cardinality", "distinct_workers_sent": 10_000, "distinct_names_sent": 10_000,
            "workers_tracked": len(state.workers), "flows": flows, "rss_start_mb": round(start, 1),
            "rss_end_mb": round(rss_mb(), 1), "metrics_bytes": len(text), "folded": folded}


SCENARIOS = {"flat": scenario_flat, "in_flight": scenario_in_flight, "cardinality": scenario_cardinality}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(SCENARIOS))
    p.add_argument("--tasks", type=int, default=2_000_000, help="tasks of the flat scenario")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only and args.in_process:
        print(json.dumps(SCENARIOS[args.only](args)), flush=True)
        return 0
    results = []
    for name in ([args.only] if args.only else SCENARIOS):
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--only", name, "--in-process",
                              "--tasks", str(args.tasks)], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": "0"})
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
