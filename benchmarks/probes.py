"""Probes, scrapes and event intake together at 500 workers x 50 task names, DEFAULT flags.

    python -m benchmarks.probes                     # both brokers
    python -m benchmarks.probes --brokers redis --populate-tasks 60000

Per broker (an isolated RabbitMQ vhost / Redis db 15), the real daemon with its
default flags (only --listen-address and --log-level WARNING given):

1. populate: a ``benchmarks.storm`` of ``--populate-tasks`` over 500 workers and 50
   names, so that about 25,000 (worker, name) task flows exist; wait until idle;
2. scrapes: two scrapers pull /metrics back to back (gzip, as Prometheus asks) for
   ``--seconds`` while a prober GETs /healthz and /readyz every 20 ms, each on a
   new connection as kubelet does: probe p50/p99/max, scrape time and bytes;
3. intake alone: a storm of ``--tasks`` on the same workers and names; events/s =
   events applied / (exporter idle again - storm start);
4. intake while scraped: the same storm with both scrapers and the prober running;
   events/s from the scrapers' own reads of ``celery_exporter_events_total`` (the
   first scrape that shows the final count); probe latencies under both loads.

Targets (issue 15): probe p99 <= 50 ms and max <= 250 ms while two scrapers pull;
intake while scraped >= 90 % of intake alone. ``--compare`` also runs the same daemon with
the interpreter's own GC thresholds and GIL switch interval (app.GC_THRESHOLDS and
app.GIL_SWITCH_INTERVAL undone), to show what those two settings buy. Prints a table,
writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import IDLE_AFTER, AmqpBroker, CpuWatch, RedisBroker  # noqa: E402
from tests.harness import free_port  # noqa: E402

BROKERS = {"amqp": AmqpBroker, "redis": RedisBroker}
WORKERS, NAMES = 500, 50
PROBE_EVERY = 0.02
EVENTS_LINE = re.compile(rb"^celery_exporter_events_total\{[^}]*\} (\S+)$", re.M)
FLOW_LINE = re.compile(rb"^celery_task_received_total\{", re.M)


def get(url: str, gzipped: bool = False, timeout: float = 30.0) -> tuple[float, bytes, int]:
    """(seconds, body as served, status)."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzipped else {})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, status = response.read(), response.status
    except urllib.error.HTTPError as exc:  # /readyz says 503 while a source is down: still an answer
        body, status = exc.read(), exc.code
    return time.perf_counter() - started, body, status


class Load:
    """Two back-to-back scrapers and a prober, until stopped."""

    def __init__(self, base: str):
        self.base = base
        self.halt = threading.Event()
        self.scrapes: list[tuple[float, float, int, int, float]] = []  # (end time, s, gz bytes, bytes, events)
        self.probes: list[float] = []
        self.threads = [threading.Thread(target=self._scrape, daemon=True) for _ in range(2)]
        self.threads.append(threading.Thread(target=self._probe, daemon=True))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        for thread in self.threads:
            thread.join(60)

    def _scrape(self):
        while not self.halt.is_set():
            seconds, body, _ = get(self.base + "/metrics", gzipped=True)
            text = gzip.decompress(body)
            events = sum(float(v) for v in EVENTS_LINE.findall(text))
            self.scrapes.append((time.time(), seconds, len(body), len(text), events))

    def _probe(self):
        paths = ("/healthz", "/readyz")
        i = 0
        while not self.halt.is_set():
            started = time.perf_counter()
            seconds, _, _ = get(self.base + paths[i % 2], timeout=10)
            self.probes.append(seconds)
            i += 1
            self.halt.wait(max(0.0, PROBE_EVERY - (time.perf_counter() - started)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def probe_figures(load: Load) -> dict:
    ms = [p * 1000 for p in load.probes]
    scrapes = [s for _, s, *_ in load.scrapes]
    last = load.scrapes[-1] if load.scrapes else (0, 0, 0, 0, 0)
    return {"probes": len(ms), "probe_p50_ms": round(percentile(ms, 0.5), 1),
            "probe_p99_ms": round(percentile(ms, 0.99), 1), "probe_max_ms": round(max(ms), 1),
            "scrapes": len(scrapes), "scrape_median_ms": round(statistics.median(scrapes) * 1000, 1),
            "scrape_max_ms": round(max(scrapes) * 1000, 1), "scrape_gzip_kb": round(last[2] / 1024, 1),
            "scrape_kb": round(last[3] / 1024, 1)}


def storm(broker, args, tasks: int, seed: int) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.storm", "--broker-url", broker.url, "--tasks", str(tasks),
         "--workers", str(WORKERS), "--names", str(NAMES), "--mode", "multi", "--seed", str(seed),
         "--rate", str(args.redis_rate if broker.kind == "redis" else 0)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    start = json.loads(proc.stdout.readline())["start"]
    return proc, start


def finish(proc: subprocess.Popen) -> dict:
    sent = json.loads(proc.stdout.readline())
    proc.wait()
    return sent


def wait_idle(watch: CpuWatch, since: float, limit: float) -> float:
    deadline = since + limit
    while time.time() < deadline and time.time() - watch.last_busy < IDLE_AFTER:
        time.sleep(0.1)
    return watch.last_busy


def events_counted(base: str) -> float:
    _, body, _ = get(base + "/metrics")
    return sum(float(v) for v in EVENTS_LINE.findall(body))


# The daemon with the interpreter's defaults instead of app.GC_THRESHOLDS / GIL_SWITCH_INTERVAL.
INTERPRETER_DEFAULTS = ("import gc, sys; from celery_health_exporter import app; "
                        "app.GC_THRESHOLDS = gc.get_threshold(); app.GIL_SWITCH_INTERVAL = sys.getswitchinterval(); "
                        "from celery_health_exporter.cli import main; sys.exit(main(sys.argv[1:]))")
VARIANTS = {"shipped": ["-m", "celery_health_exporter"], "interpreter-defaults": ["-c", INTERPRETER_DEFAULTS]}


def run_broker(kind: str, variant: str, args, log_dir: Path) -> dict:
    broker = BROKERS[kind]()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(log_dir / f"exporter-{kind}-{variant}.log", "w")
    exporter = subprocess.Popen([sys.executable, *VARIANTS[variant], "--broker-url", broker.url,
                                 "--listen-address", f"127.0.0.1:{port}", "--log-level", "WARNING"],
                                stdout=log, stderr=log, cwd=ROOT)
    result = {"broker": kind, "variant": variant}
    try:
        wait_ready(base, exporter, log.name)
        watch = CpuWatch(exporter.pid)
        watch.start()

        proc, start = storm(broker, args, args.populate_tasks, seed=1)
        finish(proc)
        wait_idle(watch, start, args.max_wait)
        _, body, _ = get(base + "/metrics")
        result["flows"] = len(FLOW_LINE.findall(body))
        result["series"] = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))

        with Load(base) as load:
            time.sleep(args.seconds)  # the measurement window itself
        result["scraped"] = probe_figures(load)

        before = events_counted(base)
        proc, start = storm(broker, args, args.tasks, seed=2)
        sent = finish(proc)
        storm_end = time.time()  # a storm too small to make the exporter busy ends when its sending does
        done = max(wait_idle(watch, start, args.max_wait), storm_end)
        applied = events_counted(base) - before
        result["alone"] = {"events": int(applied), "sent": sent["events"], "seconds": round(done - start, 2),
                           "events_per_s": round(applied / (done - start))}

        before = events_counted(base)
        with Load(base) as load:
            proc, start = storm(broker, args, args.tasks, seed=3)
            sent = finish(proc)
            stable_since, final = time.time(), None
            while time.time() - stable_since < 5 and time.time() - start < args.max_wait:
                latest = load.scrapes[-1][4] if load.scrapes else None
                if latest != final:
                    final, stable_since = latest, time.time()
                time.sleep(0.2)
        reached = next(t for t, *_, events in load.scrapes if events >= final)
        applied = final - before
        result["while_scraped"] = {"events": int(applied), "sent": sent["events"],
                                   "seconds": round(reached - start, 2),
                                   "events_per_s": round(applied / (reached - start)), **probe_figures(load)}
        result["intake_ratio"] = round(result["while_scraped"]["events_per_s"] / result["alone"]["events_per_s"], 3)
        watch.stop()
    finally:
        exporter.terminate()
        exporter.wait(15)
        log.close()
        broker.close()
    return result


def wait_ready(base: str, exporter: subprocess.Popen, log_name: str) -> None:
    deadline = time.time() + 30
    while True:
        try:
            if get(base + "/readyz", timeout=5)[2] == 200:
                return
        except OSError:  # not listening yet
            pass
        if time.time() > deadline or exporter.poll() is not None:
            raise RuntimeError(f"exporter not ready, see {log_name}")
        time.sleep(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brokers", default="amqp,redis")
    p.add_argument("--populate-tasks", type=int, default=100_000,
                   help="tasks spread over 500 x 50 (worker, name) pairs to create the flows")
    p.add_argument("--tasks", type=int, default=30_000, help="tasks of each measured storm")
    p.add_argument("--seconds", type=float, default=20.0, help="scrape-only window")
    p.add_argument("--redis-rate", type=float, default=10_000, help="events/s on Redis (pub/sub drops a slow reader)")
    p.add_argument("--max-wait", type=float, default=300.0)
    p.add_argument("--compare", action="store_true", help="also run the daemon with the interpreter's defaults")
    args = p.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="che-probes-"))
    variants = list(VARIANTS) if args.compare else ["shipped"]
    results = [run_broker(kind, variant, args, log_dir) for kind in args.brokers.split(",") for variant in variants]
    print("| broker | daemon | flows | series | scrape ms (median/max) | gzip KB / KB | probes p50/p99/max ms, scraped "
          "| same, scraped + storm | events/s alone | events/s scraped | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, w = r["scraped"], r["while_scraped"]
        print(f"| {r['broker']} | {r['variant']} | {r['flows']} | {r['series']} | {s['scrape_median_ms']}/{s['scrape_max_ms']} | "
              f"{s['scrape_gzip_kb']}/{s['scrape_kb']} | {s['probe_p50_ms']}/{s['probe_p99_ms']}/{s['probe_max_ms']} | "
              f"{w['probe_p50_ms']}/{w['probe_p99_ms']}/{w['probe_max_ms']} | {r['alone']['events_per_s']} | "
              f"{w['events_per_s']} | {r['intake_ratio']:.0%} |")
    out = ROOT / "benchmarks" / "results" / f"probes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": platform.platform(), "args": vars(args), "results": results}, indent=1))
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
