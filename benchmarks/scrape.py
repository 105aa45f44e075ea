"""/metrics render time at scale: W workers x K task names, from memory (no broker involved).

    python -m benchmarks.scrape                  # the scenarios below, one table, JSON in benchmarks/results/
    python -m benchmarks.scrape --workers 500 --names 50 --names-per-worker 5 --flag=--hostname-in-task-histograms

Builds the exporter exactly as the daemon does (``Exporter(config)``: state,
sources not started, the collector /metrics renders), feeds it real-format
events (worker-online, task-received/started/succeeded/failed) until every
(worker, name) flow exists, then times what a scrape does, as the median of
``--repeat`` scrapes: the copy of the samples while the state lock is held
(event intake waits for this part only), the whole render (that copy, then
the text written outside the lock), and the same plus gzip (what Prometheus
asks for).
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
    from celery_health_exporter.app import Exporter
    from celery_health_exporter.cli import config_from_args

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
        # No publisher sends task-sent here: the ticker applies the held task-received events once
        # --task-sent-grace has passed (the workers' heartbeats are still fresh then).
        state.tick(now + exporter.config.task_sent_grace + 1)
    return exporter


def time_scrapes(exporter, repeat: int) -> dict:
    import gzip

    collector = exporter.collector
    copied, served, zipped = [], [], []
    for _ in range(repeat):
        started = time.perf_counter()
        collector.snapshot()  # what a scrape does while it holds the state lock
        copied.append(time.perf_counter() - started)
        started = time.perf_counter()
        body = collector.render().encode()  # the same copy, then the text written outside the lock
        served.append(time.perf_counter() - started)
        started = time.perf_counter()
        packed = gzip.compress(body, compresslevel=1, mtime=0)
        zipped.append(time.perf_counter() - started + served[-1])
    ms = lambda values: round(statistics.median(values) * 1000, 1)  # noqa: E731
    return {"locked_ms": ms(copied), "render_ms": ms(served), "render_gzip_ms": ms(zipped),
            "bytes": len(body), "gzip_bytes": len(packed), "lines": body.count(b"\n")}


SCENARIOS = (  # (label, workers, names, names per worker, extra flags)
    ("20 workers x 50 names", 20, 50, 50, []),
    ("500 workers x 5 of 50 names", 500, 50, 5, []),
    ("500 workers x 50 names", 500, 50, 50, []),
    ("500 workers x 50 names, --hostname-in-task-histograms", 500, 50, 50, ["--hostname-in-task-histograms"]),
)


def run(label, workers, names, per_worker, flags, repeat) -> dict:
    exporter = build(workers, names, per_worker, flags)
    flows = sum(len(w.flows) for w in exporter.state.workers.values())
    return {"scenario": label, "flows": flows, **time_scrapes(exporter, repeat)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, help="one scenario instead of the built-in ones")
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--names-per-worker", type=int, default=0, help="0 = every name on every worker")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--flag", action="append", default=[], help="extra exporter flag, e.g. --flag=--max-workers=1000")
    args = p.parse_args(argv)
    if args.workers:
        flags = [f for item in args.flag for f in item.split("=", 1)]
        scenarios = [(f"{args.workers} workers x {args.names_per_worker or args.names} of {args.names} names "
                      f"{' '.join(flags)}".strip(), args.workers, args.names, args.names_per_worker or args.names,
                      flags)]
    else:
        scenarios = SCENARIOS
    results = []
    print("| scenario | task flows | lines | MB | lock held ms | render ms | render + gzip ms | gzip MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for scenario in scenarios:
        r = run(*scenario, args.repeat)
        results.append(r)
        print(f"| {r['scenario']} | {r['flows']:,} | {r['lines']:,} | {r['bytes'] / 1e6:.1f} | {r['locked_ms']} | "
              f"{r['render_ms']} | {r['render_gzip_ms']} | {r['gzip_bytes'] / 1e6:.2f} |", flush=True)
    out = ROOT / "benchmarks" / "results" / time.strftime("scrape-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
