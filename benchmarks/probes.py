"""Probes, scrapes and event intake together at 500 workers x 50 task names, DEFAULT flags.

    python -m benchmarks.probes                     # both brokers
    python -m benchmarks.probes --brokers redis --populate-tasks 60000

Per broker (an isolated RabbitMQ vhost / Redis db 15), the real daemon with its
default flags (only --listen-address and --log-level WARNING given):

1. populate: a ``benchmarks.storm`` of ``--populate-tasks`` over 500 workers and 50
   names, so that about 25,000 (worker, name) task flows exist; wait until idle;
2. scrapes: two scrapers pull /metrics back to back (gzip, as Prometheus asks) for
   ``--seconds`` while a prober (a process of its own) GETs /healthz and /readyz every
   20 ms, each on a new connection as kubelet does: probe p50/p99/max, scrape time and bytes;
3. intake: a storm over the same workers and names keeps the exporter behind (RabbitMQ
   buffers it; on Redis it is paced at ``--redis-rate``); events/s = events applied within a
   ``--window`` (counted by renders of its own, in another format than the scrapers'), alone,
   while two scrapers pull back to back (a flood: the exporter reuses a body for a second),
   and while they scrape once a second each (15 times Prometheus' default rate) with no
   prober; probe latencies under the storm and the back-to-back scrapers. The exporter's
   CPU in each window (a share of a core) and per event say where the time went.

Targets (issue 15): probe p99 <= 50 ms and max <= 250 ms while two scrapers pull;
intake while scraped >= 90 % of intake alone. ``--compare`` also runs the same daemon with
the interpreter's own GC thresholds and GIL switch interval (app.GC_THRESHOLDS and
app.GIL_SWITCH_INTERVAL undone), to show what those two settings buy. Prints a table,
writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import multiprocessing
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

from benchmarks.run import IDLE_AFTER, AmqpBroker, CpuWatch, RedisBroker, proc_cpu  # noqa: E402
from tests.harness import free_port  # noqa: E402

BROKERS = {"amqp": AmqpBroker, "redis": RedisBroker}
WORKERS, NAMES = 500, 50
PROBE_EVERY = 0.02
READ_EVERY = 5.0  # seconds between two reads of a body's size and events count by a scraper
EVENTS_LINE = re.compile(rb"^celery_exporter_events_total\{[^}]*\} (\S+)$", re.M)
FLOW_LINE = re.compile(rb"^celery_task_received_total\{", re.M)
RENDER_LINE = re.compile(rb"^celery_exporter_scrape_duration_seconds (\S+)$", re.M)


def get(url: str, gzipped: bool = False, timeout: float = 30.0, accept: str | None = None) -> tuple[float, bytes, int]:
    """(seconds, body as served, status)."""
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    if accept:
        headers["Accept"] = accept
    request = urllib.request.Request(url, headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, status = response.read(), response.status
    except urllib.error.HTTPError as exc:  # /readyz says 503 while a source is down: still an answer
        body, status = exc.read(), exc.code
    return time.perf_counter() - started, body, status


def _probe_loop(base: str, halt, results) -> None:
    """The prober, in a process of its own: the scrapers' parsing of 20 MB bodies holds this
    process's GIL for tens of milliseconds, which would be counted as the exporter's."""
    paths = ("/healthz", "/readyz")
    latencies, i = [], 0
    while not halt.is_set():
        started = time.perf_counter()
        seconds, _, _ = get(base + paths[i % 2], timeout=10)
        latencies.append(seconds)
        i += 1
        halt.wait(max(0.0, PROBE_EVERY - (time.perf_counter() - started)))
    results.put(latencies)


class Load:
    """Two back-to-back scrapers (threads) and a prober (a process), until stopped."""

    def __init__(self, base: str, every: float = 0.0, probe: bool = True):
        self.base = base
        self.every = every  # seconds between a scraper's scrapes (0: back to back)
        self.probe = probe
        self.halt = threading.Event()
        self.scrapes: list[tuple[float, float, int, int, float]] = []  # (end time, s, gz bytes, bytes, events)
        self.probes: list[float] = []
        self.threads = [threading.Thread(target=self._scrape, daemon=True) for _ in range(2)]
        self._probe_halt = multiprocessing.Event()
        self._probe_results = multiprocessing.Queue()
        self._prober = multiprocessing.Process(target=_probe_loop, daemon=True,
                                               args=(base, self._probe_halt, self._probe_results))

    def __enter__(self):
        if self.probe:
            self._prober.start()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self._probe_halt.set()
        if self.probe:
            self.probes = self._probe_results.get(timeout=60)
            self._prober.join(10)
        for thread in self.threads:
            thread.join(60)

    def _scrape(self):
        # Reading the events count means decompressing 20 MB: done at most every READ_EVERY
        # seconds, so that the benchmark's own CPU does not take the cores from the exporter
        # (two back-to-back scrapers of a body the exporter reuses would otherwise burn one).
        last_read, size, events = 0.0, 0, None
        while not self.halt.is_set():
            started = time.monotonic()
            seconds, body, _ = get(self.base + "/metrics", gzipped=True)
            if time.monotonic() - last_read > READ_EVERY:
                last_read = time.monotonic()
                text = gzip.decompress(body)
                size, events = len(text), events_in(text)
            self.scrapes.append((time.time(), seconds, len(body), size, events))
            self.halt.wait(max(0.0, self.every - (time.monotonic() - started)))


def events_in(text: bytes) -> float:
    """celery_exporter_events_total summed, found without parsing the whole exposition
    (a family's lines are contiguous)."""
    start = text.find(b"\ncelery_exporter_events_total{")
    if start < 0:
        return 0.0
    end = text.find(b"\n# ", start)
    return sum(float(v) for v in EVENTS_LINE.findall(text[start:end if end > 0 else len(text)]))


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
        _, body, _ = get(base + "/metrics")
        found = RENDER_LINE.search(body)  # the exporter's own time for its last render (copy + text)
        result["scraped"]["render_ms"] = round(float(found.group(1)) * 1000, 1) if found else None

        # Intake: events applied per second within a window while a storm keeps the exporter
        # behind (a backlog in RabbitMQ, or Redis paced), alone and under two kinds of scraping.
        tasks = args.amqp_tasks if kind == "amqp" else args.redis_tasks
        for seed, (phase, every, probe) in enumerate((("alone", None, False), ("while_scraped_every_1s", 1.0, False),
                                                       ("while_scraped", 0.0, True)), start=2):
            result[phase] = intake(base, broker, args, tasks, seed, every, probe, exporter.pid)
            wait_idle(watch, time.time(), args.max_wait)  # the backlog drained before the next phase
        for phase in ("while_scraped", "while_scraped_every_1s"):
            result[phase]["ratio"] = round(result[phase]["events_per_s"] / result["alone"]["events_per_s"], 3)
        watch.stop()
    finally:
        exporter.terminate()
        exporter.wait(15)
        log.close()
        broker.close()
    return result


def exact_events(base: str) -> tuple[float, float]:
    """(time, events applied) from a render of its own: OpenMetrics is another format than the
    scrapers' gzipped text, so the exporter renders anew instead of reusing their body."""
    _, body, _ = get(base + "/metrics", timeout=60, accept="application/openmetrics-text; version=1.0.0")
    return time.time(), events_in(body)


def intake(base: str, broker, args, tasks: int, seed: int, every: float | None, probe: bool, pid: int) -> dict:
    """Events/s applied within ``args.window`` seconds of a storm, ``every`` None: no scrapers;
    0: two back to back; N: two, each every N seconds. ``behind`` says the exporter still had
    a backlog at the window's end (else the rate is the storm's, not the exporter's)."""
    _, before = exact_events(base)
    proc, _ = storm(broker, args, tasks, seed)
    load = Load(base, every, probe) if every is not None else contextlib.nullcontext()
    with load:
        time.sleep(args.fill)
        t0, c0 = exact_events(base)
        cpu0 = proc_cpu(pid)
        time.sleep(args.window)
        t1, c1 = exact_events(base)
        cpu1 = proc_cpu(pid)
    sent = finish(proc)
    # The exporter's CPU in the window: a share of a core far below 1 while behind means the
    # machine's cores were taken (broker, storm, scrapers), not that the exporter spent more per event.
    figures = {"events_per_s": round((c1 - c0) / (t1 - t0)), "window_s": round(t1 - t0, 2),
               "exporter_cores": round((cpu1 - cpu0) / (t1 - t0), 2),
               "cpu_us_per_event": round((cpu1 - cpu0) / max(1.0, c1 - c0) * 1e6, 1),
               "storm_events": sent["events"], "behind": c1 - before < sent["events"]}
    if probe:
        figures.update(probe_figures(load))
    return figures


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
    p.add_argument("--amqp-tasks", type=int, default=200_000,
                   help="tasks of each intake storm on RabbitMQ: enough to keep the exporter behind for the window")
    p.add_argument("--redis-tasks", type=int, default=30_000, help="tasks of each intake storm on Redis (paced)")
    p.add_argument("--fill", type=float, default=3.0, help="seconds of storm before the intake window")
    p.add_argument("--window", type=float, default=10.0, help="seconds of the intake window")
    p.add_argument("--seconds", type=float, default=20.0, help="scrape-only window")
    p.add_argument("--redis-rate", type=float, default=10_000, help="events/s on Redis (pub/sub drops a slow reader)")
    p.add_argument("--max-wait", type=float, default=300.0)
    p.add_argument("--compare", action="store_true", help="also run the daemon with the interpreter's defaults")
    args = p.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="che-probes-"))
    variants = list(VARIANTS) if args.compare else ["shipped"]
    results = [run_broker(kind, variant, args, log_dir) for kind in args.brokers.split(",") for variant in variants]
    print("| broker | daemon | flows | series | render ms | scrape ms (median/max) | gzip KB / KB | probes p50/p99/max ms, "
          "scraped | same, scraped + storm | intake alone ev/s | scraped back to back | scraped every 1 s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, w, p = r["scraped"], r["while_scraped"], r["while_scraped_every_1s"]
        print(f"| {r['broker']} | {r['variant']} | {r['flows']} | {r['series']} | {s['render_ms']} | "
              f"{s['scrape_median_ms']}/{s['scrape_max_ms']} | {s['scrape_gzip_kb']}/{s['scrape_kb']} | "
              f"{s['probe_p50_ms']}/{s['probe_p99_ms']}/{s['probe_max_ms']} | "
              f"{w['probe_p50_ms']}/{w['probe_p99_ms']}/{w['probe_max_ms']} | {r['alone']['events_per_s']} | "
              f"{w['events_per_s']} ({w['ratio']:.0%}) | {p['events_per_s']} ({p['ratio']:.0%}) |"
              + ("" if all(r[k]["behind"] for k in ("alone", "while_scraped", "while_scraped_every_1s"))
                 else " (a storm was applied before its window ended: a storm's rate, not the exporter's)"))
    out = ROOT / "benchmarks" / "results" / f"probes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": platform.platform(), "args": vars(args), "results": results}, indent=1))
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
