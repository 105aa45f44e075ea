"""One command: the same event storm, per broker, into the plain drain, this exporter and the peer.

    python -m benchmarks.run                      # both brokers, 50,000 tasks, task.multi and single
    python -m benchmarks.run --brokers redis --tasks 20000 --modes multi

For each broker and storm shape it starts one consumer at a time on an
isolated broker (a fresh RabbitMQ vhost / Redis db 15), waits until it is
subscribed, runs ``benchmarks.storm`` at full speed and waits until the
consumer's CPU goes idle. Measured per consumer:

- events/s end to end: storm events / (consumer idle again - storm start);
- CPU µs per event: the consumer's CPU time over the events it counted;
- tasks counted vs sent: terminal outcomes (task-succeeded + task-failed) the
  consumer counted (its ``celery_task_succeeded_total`` +
  ``celery_task_failed_total``; the drain counts them in the bodies);
- peak RSS (VmHWM), /metrics render time (median of 5) and size.

The peer is ``prometheus-exporter-celery`` from PyPI, installed into its own
virtualenv (its pins clash with ours) under ``~/.cache/che-bench``.
``ours-resp-reference`` (Redis only) is this exporter with the hand-written RESP
parser it had before hiredis (``benchmarks/resp_reference.py``).

On Redis, the same run also records the bytes Redis writes to a subscriber of
the event exchange during a storm and feeds them, in the slices the events
thread takes, through each parser and the events source into the state model
(bytes -> parsed -> applied), in process, alternating the parsers
(``--parser-rounds``): events per CPU second of the whole Redis pipeline per parser.
Prints one table with ratios to the drain and writes JSON to ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import Metrics, free_port, make_amqp_broker, rabbitmq_api  # noqa: E402

# Its pins (redis<6) clash with kombu 5.6+, which refuses redis-py < 6.1 on Redis
# (VersionMismatch): the newest Celery that works with it is 5.5.
PEER_PACKAGES = ("prometheus-exporter-celery==0.11.2", "celery>=5.5.2,<5.6", "kombu<5.6", "packaging")
PEER_VENV = Path(os.environ.get("BENCH_PEER_VENV", Path.home() / ".cache" / "che-bench" / "peer-venv"))
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "15"))
IDLE_AFTER = 2.0  # seconds without CPU use that mean "caught up"
BUSY_WINDOW = 5  # samples of 0.1 s
BUSY_CPU = 0.1  # CPU seconds within BUSY_WINDOW that count as busy (20 % of a core)
TERMINAL = ("celery_task_succeeded_total", "celery_task_failed_total")


# ------------------------------------------------------------------ helpers

def ensure_peer() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing {PEER_PACKAGES[0]} into {PEER_VENV} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class CpuWatch(threading.Thread):
    """Samples a process's CPU time every 0.1 s; remembers the last busy moment."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.last_busy = time.time()
        self.cpu = 0.0
        self.peak_rss = 0.0
        self.alive = True
        self._halt = threading.Event()

    def run(self):
        samples = collections.deque([(time.time(), proc_cpu(self.pid))], maxlen=BUSY_WINDOW)
        while not self._halt.wait(0.1):
            try:
                now_cpu = proc_cpu(self.pid)
            except OSError:
                self.alive = False
                return
            now = time.time()
            # /proc counts CPU in 10 ms ticks: judge a window, not one sample
            if now_cpu - samples[0][1] >= BUSY_CPU and now_cpu > samples[-1][1]:
                self.last_busy = now
            samples.append((now, now_cpu))
            self.cpu = now_cpu
            self.peak_rss = max(self.peak_rss, proc_hwm_mb(self.pid) or 0.0)

    def stop(self):
        self._halt.set()
        self.join()


def http_get(url: str, timeout: float = 30.0) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    return time.perf_counter() - started, body


def wait_until(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ brokers

class AmqpBroker:
    kind = "amqp"

    def __init__(self):
        self._broker = make_amqp_broker()
        self.url = self._broker.url
        self.vhost = self._broker.vhost

    def subscribers(self) -> int:
        queues = rabbitmq_api("GET", f"/api/queues/{self.vhost}?columns=name,consumers")
        return sum(q.get("consumers", 0) for q in queues if q["name"].startswith("celeryev"))

    def close(self):
        self._broker.close()


class RedisBroker:
    kind = "redis"

    def __init__(self):
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        self.client.flushdb()
        self.url = f"redis://127.0.0.1:6379/{REDIS_DB}"

    def subscribers(self) -> int:
        return sum(1 for c in self.client.client_list()
                   if int(c.get("psub", 0)) > 0 and int(c.get("db", -1)) == REDIS_DB)

    def close(self):
        self.client.flushdb()
        self.client.close()


# ---------------------------------------------------------------- consumers

class Consumer:
    name = "?"

    def __init__(self, broker, log_dir: Path):
        self.broker = broker
        self.log_path = log_dir / f"{self.name}-{broker.kind}.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE if self.name == "drain" else self.log,
                                     stderr=self.log, cwd=ROOT, text=True)

    def wait_ready(self, before: int):
        wait_until(lambda: self.proc.poll() is None and self.broker.subscribers() > before, 30,
                   f"{self.name} subscribed")
        time.sleep(0.5)

    def counts(self) -> dict:
        status = {}
        timings, body = [], b""
        for _ in range(5):
            seconds, body = http_get(f"http://127.0.0.1:{self.port}/metrics")
            timings.append(seconds)
        metrics = Metrics(body.decode())
        status["terminal"] = int(sum(metrics.sum(name) for name in TERMINAL))
        status["metrics_ms"] = round(statistics.median(timings) * 1000, 1)
        status["metrics_bytes"] = len(body)
        status["metrics"] = metrics
        return status

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return {}


class Drain(Consumer):
    name = "drain"

    def command(self):
        # kombu's ack on Redis is a round trip to its unacked index, for a pub/sub
        # message that is already gone from Redis: the ceiling does not pay it.
        no_ack = ["--no-ack"] if self.broker.kind == "redis" else []
        return [sys.executable, "-m", "benchmarks.drain", "--broker-url", self.broker.url, *no_ack]

    def wait_ready(self, before: int):
        assert self.proc.stdout.readline().strip() == "ready"
        super().wait_ready(before)

    def counts(self) -> dict:
        return {}

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=15)
        self.log.close()
        return json.loads(out.strip().splitlines()[-1])


class Ours(Consumer):
    name = "ours"
    extra_flags: list[str] = []  # --exporter-flag

    def command(self):
        return [sys.executable, "-m", "celery_health_exporter", "--broker-url", self.broker.url,
                "--listen-address", f"127.0.0.1:{self.port}", "--log-level", "WARNING", *self.extra_flags]

    def counts(self) -> dict:
        status = super().counts()
        m = status.pop("metrics")
        status["events_counted"] = int(m.sum("celery_exporter_events_total"))
        status["lost_messages_metric"] = int(m.sum("celery_exporter_events_lost_messages_total"))
        status["subscription_drops_metric"] = int(m.sum("celery_exporter_events_subscription_drops_total"))
        return status


class Peer(Consumer):
    name = "peer"

    def command(self):
        return [str(ensure_peer()), "-c", "from src.cli import cli; cli()", "--broker-url", self.broker.url,
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING"]

    def counts(self) -> dict:
        status = super().counts()
        status.pop("metrics")
        return status


class OursRespReference(Ours):
    """This exporter with the RESP parser it had before hiredis."""
    name = "ours-resp-reference"
    brokers = ("redis",)

    def command(self):
        return [sys.executable, "-m", "benchmarks.resp_reference", *super().command()[3:]]


CONSUMERS = {"drain": Drain, "ours": Ours, "ours-resp-reference": OursRespReference, "peer": Peer}


# ---------------------------------------------------------------------- run

def run_one(consumer_cls, broker_cls, args, log_dir: Path) -> dict:
    broker = broker_cls()
    consumer = consumer_cls(broker, log_dir)
    result = {"consumer": consumer.name, "broker": broker.kind}
    try:
        before = broker.subscribers()
        started_at = time.time()
        consumer.start()
        consumer.wait_ready(before)
        result["startup_s"] = round(time.time() - started_at, 2)
        watch = CpuWatch(consumer.proc.pid)
        watch.start()
        storm = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.storm", "--broker-url", broker.url, "--tasks", str(args.tasks),
             "--workers", str(args.workers), "--names", str(args.names), "--mode", args.mode,
             "--rate", str(args.redis_rate if broker.kind == "redis" else args.amqp_rate)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        start = json.loads(storm.stdout.readline())["start"]
        cpu_at_start = watch.cpu
        sent = json.loads(storm.stdout.readline())
        storm.wait()
        storm_end = time.time()
        deadline = storm_end + args.max_wait
        while time.time() < deadline and watch.alive and time.time() - watch.last_busy < IDLE_AFTER:
            time.sleep(0.1)
        watch.stop()
        done = max(watch.last_busy, storm_end)
        result.update(storm=sent, storm_rate=args.redis_rate if broker.kind == "redis" else args.amqp_rate,
                      seconds=round(done - start, 3), publish_seconds=sent["publish_seconds"],
                      exited=consumer.proc.poll() is not None, exit_code=consumer.proc.poll())
        cpu = watch.cpu - cpu_at_start
        result["peak_rss_mb"] = round(proc_hwm_mb(consumer.proc.pid) or watch.peak_rss, 1)
        if not result["exited"]:
            result.update(consumer.counts())
        result.update(consumer.stop())
        terminal = result.get("terminal", 0)
        result["tasks_sent"] = sent["terminal"]
        result["tasks_counted"] = terminal
        result["lost_pct"] = round(100 * (1 - terminal / sent["terminal"]), 2) if sent["terminal"] else None
        processed = sent["events"] * (terminal / sent["terminal"]) if sent["terminal"] else 0
        result["events_per_s"] = round(processed / (done - start), 1)
        result["cpu_s"] = round(cpu, 2)
        result["cpu_us_per_event"] = round(cpu / processed * 1e6, 1) if processed else None
    finally:
        if consumer.proc is not None and consumer.proc.poll() is None:
            consumer.proc.kill()
        broker.close()
    return result


# ------------------------------------------------- the Redis parsers, in process

def record_redis_stream(args) -> bytes:
    """The bytes Redis writes to a pattern subscriber of the event exchange (db REDIS_DB)
    while a storm runs: exactly what the events source reads from its socket."""
    import socket

    broker = RedisBroker()
    sock = socket.create_connection(("127.0.0.1", 6379))
    sock.sendall(b"*2\r\n$6\r\nSELECT\r\n$%d\r\n%d\r\n" % (len(str(REDIS_DB)), REDIS_DB))  # found by subscribers()
    assert sock.recv(16) == b"+OK\r\n"
    pattern = f"/{REDIS_DB}.celeryev/*".encode()
    sock.sendall(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(pattern), pattern))
    chunks, last = [], [time.time()]

    def read():
        while data := sock.recv(1 << 20):
            chunks.append(data)
            last[0] = time.time()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: broker.subscribers() > 0, 10, "the recording subscriber")
        subprocess.run([sys.executable, "-m", "benchmarks.storm", "--broker-url", broker.url,
                        "--tasks", str(args.parser_tasks), "--workers", str(args.workers), "--names",
                        str(args.names), "--mode", args.parser_mode, "--rate", str(args.redis_rate)],
                       stdout=subprocess.DEVNULL, check=True, cwd=ROOT)
        wait_until(lambda: time.time() - last[0] > 1.0, 60, "the recorded stream to end")
    finally:
        sock.close()
        broker.close()
    return b"".join(chunks)


def parser_pipeline(stream: bytes, parser_cls) -> dict:
    """One pass of ``stream`` through ``parser_cls`` and the events source into a fresh
    state model, in the slices the events thread takes (redis_wire.TAKE_LIMIT)."""
    from celery_health_exporter.app import build_state, make_app
    from celery_health_exporter.cli import config_from_args
    from celery_health_exporter.sources.events import EventsSource
    from celery_health_exporter.sources.redis_wire import TAKE_LIMIT

    config = config_from_args(["--broker-url", f"redis://127.0.0.1:6379/{REDIS_DB}",
                               "--listen-address", "127.0.0.1:9"], env={})
    source = EventsSource(config, build_state(config), make_app(config))
    slices = [stream[i:i + TAKE_LIMIT] for i in range(0, len(stream), TAKE_LIMIT)]
    # CPU time of this process (single-threaded here): on a machine shared with other
    # work, wall time measures the neighbours as much as the parser
    parser = parser_cls()
    started = time.process_time()
    messages = sum(len(parser.feed(data)) for data in slices)
    parse_seconds = time.process_time() - started
    parser = parser_cls()
    apply = source._apply_redis_payload
    started = time.process_time()
    for data in slices:
        for payload in parser.feed(data):
            apply(payload)
    seconds = time.process_time() - started
    return {"messages": messages, "applied_messages": source.ingest.messages,
            "events": sum(source.state.events_by_type.values()),
            "parse_seconds": parse_seconds, "pipeline_seconds": seconds}


def compare_parsers(args) -> dict:
    from benchmarks.resp_reference import PubSubParser as Reference
    from celery_health_exporter.sources.redis_wire import PubSubParser as Hiredis

    stream = record_redis_stream(args)
    parsers = {"hiredis": Hiredis, "resp-reference": Reference}
    runs: dict[str, list[dict]] = {name: [] for name in parsers}
    for _ in range(args.parser_rounds):  # alternated: a noisy neighbour hits both alike
        for name, cls in parsers.items():
            runs[name].append(parser_pipeline(stream, cls))
    counts = {(r["messages"], r["applied_messages"], r["events"]) for rs in runs.values() for r in rs}
    assert len(counts) == 1, f"the parsers disagree on what the stream holds: {counts}"
    messages, _, events = counts.pop()
    out = {"stream_bytes": len(stream), "messages": messages, "events": events, "tasks": args.parser_tasks,
           "mode": args.parser_mode, "rounds": args.parser_rounds, "parsers": {}}
    for name, rs in runs.items():
        pipeline = statistics.median(r["pipeline_seconds"] for r in rs)
        parse = statistics.median(r["parse_seconds"] for r in rs)
        out["parsers"][name] = {
            "pipeline_events_per_s": round(events / pipeline),
            "pipeline_us_per_event": round(pipeline / events * 1e6, 2),
            "parse_messages_per_s": round(messages / parse), "parse_mb_per_s": round(len(stream) / parse / 1e6, 1),
            "pipeline_seconds": [round(r["pipeline_seconds"], 3) for r in rs],
            "parse_seconds": [round(r["parse_seconds"], 4) for r in rs]}
    return out


def parser_table(comparison: dict) -> str:
    rows = [("parser", "pipeline events/CPU s", "CPU µs/event", "parse-only messages/CPU s", "parse-only MB/CPU s")]
    for name, r in comparison["parsers"].items():
        rows.append((name, f"{r['pipeline_events_per_s']:,}", f"{r['pipeline_us_per_event']:.2f}",
                     f"{r['parse_messages_per_s']:,}", f"{r['parse_mb_per_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return (f"Redis pipeline, in process: {comparison['events']:,} events in {comparison['messages']:,} messages, "
            f"{comparison['stream_bytes'] / 1e6:.1f} MB recorded, median of {comparison['rounds']} rounds\n"
            + "\n".join(lines))


def table(results: list[dict]) -> str:
    head = ("broker", "mode", "consumer", "events/s", "vs drain", "CPU µs/ev", "tasks counted/sent", "lost",
            "peak RSS MB", "/metrics ms", "/metrics KB")
    rows = [head]
    for r in results:
        drain = next((d for d in results if d["consumer"] == "drain" and d["broker"] == r["broker"]
                      and d["mode"] == r["mode"]), None)
        ratio = f"{100 * r['events_per_s'] / drain['events_per_s']:.0f} %" if drain and drain["events_per_s"] else "-"
        counted = f"{r['tasks_counted']}/{r['tasks_sent']}" + (" (exited)" if r.get("exited") else "") + (
            " (dropped by broker)" if r.get("dropped_by_broker") else "")
        rows.append((r["broker"], r["mode"], r["consumer"], f"{r['events_per_s']:.0f}", ratio,
                     f"{r['cpu_us_per_event']:.0f}" if r.get("cpu_us_per_event") else "-", counted,
                     f"{r['lost_pct']:.1f} %" if r["lost_pct"] is not None else "-", f"{r['peak_rss_mb']:.0f}",
                     f"{r['metrics_ms']:.0f}" if "metrics_ms" in r else "-",
                     f"{r['metrics_bytes'] / 1024:.0f}" if "metrics_bytes" in r else "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_report(path: Path, args, results: list, loadavg, parsers: dict | None = None) -> None:
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_at_start": loadavg},
        "args": {k: v for k, v in vars(args).items() if k != "mode"}, "results": results,
        "table": table(results),
    }
    if parsers:
        report["redis_parsers"] = parsers
        report["redis_parsers_table"] = parser_table(parsers)
    path.write_text(json.dumps(report, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brokers", default="amqp,redis")
    p.add_argument("--modes", default="multi,single", help="storm shapes: multi (task.multi batches), single")
    p.add_argument("--consumers", default="drain,ours,ours-resp-reference,peer")
    p.add_argument("--tasks", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=20)
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--amqp-rate", type=float, default=0.0,
                   help="storm events/s on RabbitMQ; 0 = as fast as the broker takes them (it buffers for us)")
    p.add_argument("--redis-rate", type=float, default=10000.0,
                   help="storm events/s on Redis; 0 = full speed (~100k/s: Redis then drops kombu consumers, "
                        "the drain included)")
    p.add_argument("--exporter-flag", action="append", default=[],
                   help="extra flag for this exporter, e.g. --exporter-flag=--event-backlog-max-mb=64")
    p.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for a consumer to catch up")
    p.add_argument("--parser-tasks", type=int, default=20_000,
                   help="tasks of the storm recorded for the in-process Redis parser comparison; 0 = none")
    p.add_argument("--parser-mode", default="multi", choices=("multi", "single"))
    p.add_argument("--parser-rounds", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    Ours.extra_flags = [part for flag in args.exporter_flag for part in flag.split("=", 1)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = out / f"logs-{stamp}.tmp"
    log_dir.mkdir(exist_ok=True)
    brokers = {"amqp": AmqpBroker, "redis": RedisBroker}
    results = []
    path = out / f"run-{stamp}.json"
    loadavg = os.getloadavg()
    for kind in args.brokers.split(","):
        for mode in args.modes.split(","):
            args.mode = mode
            for name in args.consumers.split(","):
                if kind not in getattr(CONSUMERS[name], "brokers", (kind,)):
                    continue
                print(f"[{kind} {mode}] {name} ...", file=sys.stderr, flush=True)
                r = run_one(CONSUMERS[name], brokers[kind], args, log_dir)
                r["mode"] = mode
                results.append(r)
                write_report(path, args, results, loadavg)  # kept even if a later step fails
                print(f"[{kind} {mode}] {name}: {r['events_per_s']:.0f} events/s, "
                      f"{r['tasks_counted']}/{r['tasks_sent']} tasks, {r['peak_rss_mb']} MB", file=sys.stderr,
                      flush=True)
    parsers = None
    if "redis" in args.brokers.split(",") and args.parser_tasks > 0:
        print(f"[redis] parsers in process ({args.parser_tasks} tasks, {args.parser_mode}) ...", file=sys.stderr,
              flush=True)
        parsers = compare_parsers(args)
    write_report(path, args, results, loadavg, parsers)
    print(table(results))
    if parsers:
        print("\n" + parser_table(parsers))
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
