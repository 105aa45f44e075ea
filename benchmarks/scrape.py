"""/metrics render time at scale: W workers x K task names, from memory (no broker involved).

    python -m benchmarks.scrape                       # 500 workers x 50 names, every worker runs every name
    python -m benchmarks.scrape --names-per-worker 5  # a partitioned cluster: each worker runs 5 of the 50

Builds the exporter exactly as the daemon does (``Exporter(config)``: state,
sources not started, the registry /metrics renders), feeds it real-format
events (worker-online, task-received/started/succeeded/failed) until every
(worker, name) flow exists, then times what a scrape does: the collect phase
(state lock held: event intake waits meanwhile) and the full text render, as
the median of ``--repeat`` scrapes. Also times a prototype of the proposed
renderer (task-flow series written straight to text, each flow's lines
cached until the flow changes) to measure the gain of that proposal.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(workers: int, names: int, names_per_worker: int, extra_flags: list[str]):
    from exporter.app import Exporter
    from exporter.cli import config_from_args

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = config_from_args(["--broker-url", "amqp://guest:guest@127.0.0.1:5672//",
                               "--listen-address", "127.0.0.1:9", *extra_flags], env={})
    exporter = Exporter(config, sock)
    state = exporter.state
    now = time.time()
    with state.lock:
        for w in range(workers):
            host = f"worker{w}@bench-host-{w % 20}"
            state.apply({"type": "worker-online", "hostname": host, "timestamp": now, "utcoffset": 0, "pid": 100 + w,
                         "freq": 2.0, "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux"}, now)
            state.apply({"type": "worker-heartbeat", "hostname": host, "timestamp": now, "utcoffset": 0,
                         "pid": 100 + w, "freq": 2.0, "active": 1, "processed": 10}, now)
            for k in range(names_per_worker):
                name = f"app.tasks.job{(w + k) % names}"
                for outcome in ("task-succeeded", "task-failed"):
                    task_id = str(uuid.uuid4())
                    base = {"hostname": host, "timestamp": now, "utcoffset": 0, "pid": 100 + w, "uuid": task_id}
                    state.apply({**base, "type": "task-received", "name": name, "retries": 0}, now)
                    state.apply({**base, "type": "task-started"}, now)
                    if outcome == "task-succeeded":
                        state.apply({**base, "type": outcome, "runtime": 0.2}, now)
                    else:
                        state.apply({**base, "type": outcome, "exception": "ValueError('x')"}, now)
    return exporter


def time_scrapes(exporter, repeat: int) -> dict:
    """What /metrics serves: the state's families written directly (exporter.collector.render),
    and for comparison the same families through prometheus_client's objects and encoder."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    served, through_client, size = [], [], 0
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter.collector)
    for _ in range(repeat):
        started = time.perf_counter()
        body = exporter.collector.render()
        served.append(time.perf_counter() - started)
        size = len(body)
        started = time.perf_counter()
        generate_latest(registry)
        through_client.append(time.perf_counter() - started)
    return {"served_render_ms": round(statistics.median(served) * 1000, 1),
            "prometheus_client_render_ms": round(statistics.median(through_client) * 1000, 1),
            "bytes": size, "lines": body.count("\n")}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _flow_text(prefix, name, hostname, queue, flow) -> str:
    labels = f'name="{_escape(name)}",hostname="{_escape(hostname)}",queue_name="{_escape(queue)}"'
    lines = [f"{prefix}task_{kind}_total{{{labels}}} {float(getattr(flow, kind))}"
             for kind in ("received", "started", "succeeded", "retried", "revoked", "rejected")]
    for exception, count in flow.failed.items():
        lines.append(f'{prefix}task_failed_total{{{labels},exception="{_escape(exception)}"}} {float(count)}')
    for metric, histogram in (("task_runtime", flow.runtime), ("task_queue_wait_time", flow.queue_wait)):
        for le, count in histogram.cumulative():
            lines.append(f'{prefix}{metric}_bucket{{{labels},le="{le}"}} {float(count)}')
        lines.append(f"{prefix}{metric}_count{{{labels}}} {float(histogram.count)}")
        lines.append(f"{prefix}{metric}_sum{{{labels}}} {histogram.sum}")
    return "\n".join(lines)


def _flow_version(flow) -> tuple:
    return (flow.received, flow.started, flow.succeeded, flow.retried, flow.revoked, flow.rejected,
            sum(flow.failed.values()), flow.runtime.sum, flow.queue_wait.sum)


def prototype(exporter, repeat: int) -> dict:
    """Task-flow lines straight to text, cached per flow until it changes (here: a version
    tuple; in the model it would be a counter bumped by the handlers)."""
    state = exporter.state
    cache: dict = {}
    cold, warm = [], []
    for i in range(repeat):
        if i == 0:
            cache.clear()
        started = time.perf_counter()
        with state.lock:
            parts = []
            for hostname, worker in state.workers.items():
                for (name, queue), flow in worker.flows.items():
                    key = (hostname, name, queue)
                    version = _flow_version(flow)
                    hit = cache.get(key)
                    if hit is None or hit[0] != version:
                        hit = cache[key] = (version, _flow_text("celery_", name, hostname, queue, flow))
                    parts.append(hit[1])
        body = "\n".join(parts)
        (cold if i == 0 else warm).append(time.perf_counter() - started)
    return {"cold_ms": round(cold[0] * 1000, 1), "warm_ms": round(statistics.median(warm) * 1000, 1),
            "bytes": len(body)}


def tasks_area_only(exporter, repeat: int) -> float:
    """The same series through the current path (tasks area -> Metric objects -> text)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from exporter.metrics import StateCollector
    from exporter.metrics import definitions

    areas = definitions._AREA_MODULES
    definitions._AREA_MODULES = ("exporter.metrics.tasks",)
    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StateCollector(exporter.state, [], prefix="celery_"))
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            generate_latest(registry)
            times.append(time.perf_counter() - started)
    finally:
        definitions._AREA_MODULES = areas
    return round(statistics.median(times) * 1000, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=500)
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--names-per-worker", type=int, default=0, help="0 = every name on every worker")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--flag", action="append", default=[], help="extra exporter flag, e.g. --flag=--max-workers=1000")
    args = p.parse_args(argv)
    per_worker = args.names_per_worker or args.names
    flags = [f for item in args.flag for f in item.split("=", 1)]
    started = time.perf_counter()
    exporter = build(args.workers, args.names, per_worker, flags)
    built = time.perf_counter() - started
    flows = sum(len(w.flows) for w in exporter.state.workers.values())
    result = {"workers": args.workers, "names": args.names, "names_per_worker": per_worker, "flows": flows,
              "build_s": round(built, 1), "current": time_scrapes(exporter, args.repeat),
              "current_tasks_area_ms": tasks_area_only(exporter, args.repeat),
              "prototype_tasks_area": prototype(exporter, args.repeat + 1)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
