"""Soak: the exporter against real workers under steady load for a long time, with a
fault injected every few minutes; reports RSS over time, events lost and recovery times.

    python -m benchmarks.soak                                  # RabbitMQ, 30 minutes, a fault every 3 minutes
    python -m benchmarks.soak --broker redis --minutes 5 --fault-every 60

Set-up (the test harness's, on this machine's brokers): a fresh vhost or Redis db; the
exporter as a subprocess that reaches the broker through a TCP proxy the soak controls;
two prefork workers (``tests.apps.testapp``) on queue ``soak``; a publisher sending
``--rate`` tasks/s (10 % fail); and an independent ground-truth consumer of the
``celeryev`` exchange (plain kombu, direct to the broker) that counts every terminal
task event of the soak workers by uuid.

Faults, in turn: the broker cut for ``--outage`` seconds (proxy), the exporter's broker
connection killed by the broker (Redis ``CLIENT KILL`` of its subscription / RabbitMQ
management-API ``DELETE /api/connections``), a worker SIGKILLed and restarted under the
same name, and a flood of ``--flood`` distinct worker names (one heartbeat each).

Reported: RSS every ``--sample-every`` seconds (and per minute), for each fault the
seconds until /readyz is 200 again and until the exporter's counts catch up with the
ground truth, the RSS and scrape time before/after the flood, counters that went
backwards (should be none), and events lost = terminal events the ground truth saw
minus those the exporter counted, after the load stops and both settle. On Redis, events
published while the exporter is cut off are lost by design (pub/sub keeps nothing for an
absent subscriber); on RabbitMQ its queue keeps them (``--event-queue-expires``).
Tasks Celery itself lost (SIGKILLed worker) are reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from celery import Celery  # noqa: E402
from celery.events.event import get_exchange  # noqa: E402
from kombu import Connection, Consumer, Queue  # noqa: E402

from tests.apps.testapp import client  # noqa: E402
from tests.harness import (REDIS_HOST, REDIS_PORT, ExporterProcess, Metrics, TcpProxy,  # noqa: E402
                           WorkerProcess, make_broker, rabbitmq_api)

TERMINAL = ("task-succeeded", "task-failed")
QUEUE = "soak"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", choices=("amqp", "redis"), default="amqp")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--fault-every", type=float, default=180.0, help="seconds between faults")
    p.add_argument("--outage", type=float, default=15.0, help="seconds the broker stays cut")
    p.add_argument("--rate", type=float, default=20.0, help="tasks published per second")
    p.add_argument("--flood", type=int, default=10_000, help="distinct worker names in the flood fault")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--workdir", default="", help="logs go here (default: a temporary directory)")
    p.add_argument("--out", default="", help="write the JSON report here too")
    p.add_argument("exporter_args", nargs="*", help="extra exporter flags, after --")
    return p.parse_args(argv)


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f"{parts.hostname}:{parts.port}",
                                                                 f"127.0.0.1:{proxy.port}")))


class GroundTruth(threading.Thread):
    """Counts terminal task events of the given workers by uuid, straight from the broker."""

    def __init__(self, broker_url: str, kind: str, hostnames: set[str]):
        super().__init__(daemon=True, name="ground-truth")
        self.url, self.kind, self.hostnames = broker_url, kind, hostnames
        self.seen: dict[str, set] = {t: set() for t in TERMINAL}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.stopping = threading.Event()

    def count(self) -> int:
        with self.lock:
            return sum(len(s) for s in self.seen.values())

    def on_body(self, body, message):
        events = body if isinstance(body, list) else [body]
        with self.lock:
            for event in events:
                if isinstance(event, dict) and event.get("type") in TERMINAL \
                        and event.get("hostname") in self.hostnames:
                    self.seen[event["type"]].add(event.get("uuid"))

    def run(self):
        app = Celery("soak-truth", broker=self.url, set_as_current=False)
        name = f"celeryev.soak-truth.{uuid.uuid4().hex[:8]}"  # one queue for the whole soak: a reconnect loses nothing
        while not self.stopping.is_set():
            try:
                with Connection(self.url, heartbeat=0) as conn:
                    exchange = get_exchange(conn, name=app.conf.event_exchange)
                    if self.kind == "amqp":
                        queue = Queue(name, exchange=exchange, routing_key="#", durable=False, auto_delete=False,
                                      message_ttl=3600, expires=600)
                    else:
                        queue = Queue(name, exchange=exchange, routing_key="#", durable=False, auto_delete=True)
                    with Consumer(conn, queues=[queue], callbacks=[self.on_body], no_ack=True, accept=["json"]):
                        self.ready.set()
                        while not self.stopping.is_set():
                            try:
                                conn.drain_events(timeout=0.5)
                            except socket.timeout:
                                pass
            except Exception as exc:  # the ground truth must outlive broker hiccups too
                print(f"ground truth: {type(exc).__name__}: {exc}", file=sys.stderr)
                time.sleep(1)


class Load(threading.Thread):
    def __init__(self, broker_url: str, rate: float):
        super().__init__(daemon=True, name="load")
        self.publisher = client(broker_url)
        self.rate = rate
        self.published = 0
        self.stopping = threading.Event()

    def run(self):
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self.stopping.is_set():
            try:
                if self.published % 10 == 9:
                    self.publisher.send_task("tests.fail", ("soak",), queue=QUEUE)
                else:
                    self.publisher.send_task("tests.add", (1, 2), queue=QUEUE)
                self.published += 1
            except Exception as exc:  # the broker is not what we cut; say so if it fails
                print(f"publisher: {type(exc).__name__}: {exc}", file=sys.stderr)
            next_at += interval
            self.stopping.wait(max(0.0, next_at - time.monotonic()))


class Soak:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir or f"/tmp/soak-{int(time.time())}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = make_broker(args.broker)
        parts = urlsplit(self.broker.url)
        self.proxy = TcpProxy(parts.hostname, parts.port)
        self.exporter = ExporterProcess(through(self.proxy, self.broker.url), *args.exporter_args,
                                        log_path=self.workdir / "exporter.log")
        self.workers = {name: self._worker(name) for name in ("soak1", "soak2")}
        self.truth = GroundTruth(self.broker.url, args.broker, {w.hostname for w in self.workers.values()})
        self.load = Load(self.broker.url, args.rate)
        self.samples: list[dict] = []
        self.faults: list[dict] = []
        self.backwards: list[str] = []
        self._last_counters: dict = {}
        self.started = time.monotonic()

    def _worker(self, name: str) -> WorkerProcess:
        return WorkerProcess(self.broker.url, name, queues=QUEUE, concurrency=2,
                             log_path=self.workdir / f"worker-{name}.log")

    # ------------------------------------------------------------------ measuring
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rss_mb(self) -> float:
        return psutil.Process(self.exporter.proc.pid).memory_info().rss / 2 ** 20

    def ready(self) -> tuple[int, str]:
        try:
            return self.exporter.get("/readyz", timeout=5)
        except Exception as exc:
            return 0, repr(exc)

    def timed_scrape(self) -> tuple[float, Metrics]:
        """Milliseconds of the HTTP GET of /metrics alone (parsing it here is not the exporter's time)."""
        started = time.perf_counter()
        status, body = self.exporter.get("/metrics", timeout=30)
        took = (time.perf_counter() - started) * 1000
        assert status == 200, body[:500]
        return round(took, 1), Metrics(body)

    def counted(self, metrics=None) -> int:
        metrics = metrics or self.exporter.scrape()
        hostnames = {w.hostname for w in self.workers.values()}
        return int(sum(v for name in ("celery_task_succeeded_total", "celery_task_failed_total")
                       for labels, v in metrics.find(name) if labels.get("hostname") in hostnames))

    def sample(self) -> dict:
        scrape_ms, metrics = self.timed_scrape()
        counters = {(n, tuple(sorted(l.items()))): v for n, l, v in metrics.samples
                    if n.startswith("celery_task_") and n.endswith(("_total", "_count"))}
        for key, value in self._last_counters.items():
            if key in counters and counters[key] < value:
                self.backwards.append(f"{key}: {value} -> {counters[key]} at {self.elapsed():.0f}s")
        self._last_counters = counters
        entry = {"t": round(self.elapsed(), 1), "rss_mb": round(self.rss_mb(), 1), "ready": self.ready()[0],
                 "scrape_ms": round(scrape_ms, 1), "counted": self.counted(metrics), "truth": self.truth.count(),
                 "published": self.load.published,
                 "worker_series": len(metrics.find("celery_worker_up")),
                 # in-flight records: those of tasks whose terminal event an outage ate must go
                 "tracked": metrics.value("celery_exporter_tracked_tasks"),
                 "vanished": metrics.value("celery_exporter_tracked_tasks_vanished_total")}
        self.samples.append(entry)
        return entry

    def wait(self, predicate, timeout: float) -> float | None:
        """Seconds until predicate() holds (sampling on the way), None on timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if predicate():
                    return round(time.monotonic() - started, 2)
            except Exception:  # the exporter may be slow to answer mid-fault
                pass
            time.sleep(0.1)
        return None

    def caught_up(self, target: int) -> bool:
        return self.counted() >= target

    def catch_up_target(self) -> int:
        """RabbitMQ keeps our queue through an outage: catching up = counting everything the
        ground truth saw until now. Redis pub/sub keeps nothing: counting again = one new event."""
        return self.truth.count() if self.args.broker == "amqp" else self.counted() + 1

    # ------------------------------------------------------------------ faults
    def fault_broker_cut(self) -> dict:
        self.proxy.cut()
        went_down = self.wait(lambda: self.ready()[0] == 503, 30)
        reason = self.ready()[1].strip()
        time.sleep(max(0.0, self.args.outage - (went_down or 0)))
        self.proxy.restore()
        target = self.catch_up_target()
        return {"fault": "broker cut", "outage_s": self.args.outage, "detected_after_s": went_down,
                "readyz_reason": reason, "ready_after_s": self.wait(lambda: self.ready()[0] == 200, 120),
                "caught_up_after_s": self.wait(lambda: self.caught_up(target), 120)}

    def upstream_ports(self) -> set[int]:
        """Local ports of the proxy's sockets towards the broker: how the broker sees the
        exporter's connections (only the exporter goes through the proxy)."""
        ports = set()
        with self.proxy._lock:
            for sock in self.proxy._conns[1::2]:  # appended as (client, upstream) pairs
                try:
                    ports.add(sock.getsockname()[1])
                except OSError:
                    pass
        return ports

    def fault_connection_killed(self) -> dict:
        ports = self.upstream_ports()
        killed = 0
        if self.args.broker == "redis":
            import redis

            r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
            for entry in r.client_list(_type="pubsub"):
                if int(entry["addr"].rsplit(":", 1)[1]) in ports:
                    killed += r.execute_command("CLIENT", "KILL", "ID", entry["id"])
            fault = "Redis CLIENT KILL of the exporter's subscription"
        else:
            vhost = quote(self.broker.vhost, safe="")
            for conn in rabbitmq_api("GET", f"/api/vhosts/{vhost}/connections"):
                if conn.get("peer_port") in ports:
                    rabbitmq_api("DELETE", f"/api/connections/{quote(conn['name'], safe='')}")
                    killed += 1
            fault = "RabbitMQ: the exporter's connections force-closed (management API)"
        went_down = self.wait(lambda: self.ready()[0] == 503, 5)
        target = self.catch_up_target()
        return {"fault": fault, "connections_killed": killed, "readyz_503_seen_after_s": went_down,
                "ready_after_s": self.wait(lambda: self.ready()[0] == 200, 120),
                "caught_up_after_s": self.wait(lambda: self.caught_up(target), 120)}

    def fault_worker_kill(self) -> dict:
        name = sorted(self.workers)[(len(self.faults) // 4) % 2]
        old = self.workers[name]

        def restarts() -> float:
            return self.exporter.scrape().value("celery_worker_restarts_total", hostname=old.hostname) or 0

        def counted_for_worker() -> int:
            return int(sum(v for n in ("celery_task_succeeded_total", "celery_task_failed_total")
                           for _, v in self.exporter.scrape().find(n, hostname=old.hostname)))

        before = restarts()
        old.kill()
        old.log_file.close()
        started = time.monotonic()
        self.workers[name] = self._worker(name)
        detected = self.wait(lambda: restarts() > before, 120)
        counted = counted_for_worker()
        tasks_again = self.wait(lambda: counted_for_worker() > counted, 60)
        return {"fault": f"worker {old.hostname} SIGKILLed and restarted under the same name",
                "restart_counted_after_s": round(time.monotonic() - started - (tasks_again or 0), 2)
                if detected is not None else None,
                "its_tasks_counted_again_after_s": round(time.monotonic() - started, 2)
                if tasks_again is not None else None,
                "ready_after_s": self.wait(lambda: self.ready()[0] == 200, 60)}

    def fault_worker_flood(self) -> dict:
        before_rss, before = self.rss_mb(), self.sample()
        app = Celery("soak-flood", broker=self.broker.url, set_as_current=False)
        started = time.monotonic()
        with app.connection_for_write() as conn:
            dispatcher = app.events.Dispatcher(conn, hostname="flood@soak", enabled=True)
            for i in range(self.args.flood):
                dispatcher.hostname = f"flood-{i}@soak-{uuid.uuid4().hex[:6]}"
                dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=0)
            dispatcher.close()
        sent_s = time.monotonic() - started
        self.wait(lambda: len(self.exporter.scrape().find("celery_worker_up")) >= min(self.args.flood, 1000), 60)
        time.sleep(5)
        after = self.sample()
        scrape = [self.timed_scrape()[0] for _ in range(3)]
        after_text = self.exporter.get("/metrics", timeout=30)[1]
        return {"fault": f"flood of {self.args.flood} worker names", "sent_in_s": round(sent_s, 1),
                "rss_before_mb": round(before_rss, 1), "rss_after_mb": after["rss_mb"],
                "worker_series_before": before["worker_series"], "worker_series_after": after["worker_series"],
                "scrape_ms_after": statistics.median(scrape), "scrape_bytes_after": len(after_text),
                "folded_total": self.exporter.scrape().sum("celery_exporter_label_values_folded_total",
                                                           label="hostname"),
                "ready_after_s": self.wait(lambda: self.ready()[0] == 200, 60)}

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        args = self.args
        self.truth.start()
        self.truth.ready.wait(30)
        self.exporter.wait_ready(60)
        for worker in self.workers.values():
            self.wait(lambda w=worker: self.exporter.scrape().value("celery_worker_up", hostname=w.hostname) == 1, 60)
        self.load.start()
        faults = [self.fault_broker_cut, self.fault_connection_killed, self.fault_worker_kill,
                  self.fault_worker_flood]
        end = args.minutes * 60
        next_fault = min(args.fault_every, end / 2)
        next_sample = 0.0
        while self.elapsed() < end:
            if self.exporter.proc.poll() is not None:
                raise SystemExit(f"the exporter exited with {self.exporter.proc.returncode}")
            if self.elapsed() >= next_sample:
                entry = self.sample()
                next_sample = self.elapsed() + args.sample_every
                print(json.dumps(entry), flush=True)
            if self.elapsed() >= next_fault and self.elapsed() < end - 30:
                fault = faults[len(self.faults) % len(faults)]
                at = round(self.elapsed(), 1)
                result = {"at_s": at, **fault()}
                self.faults.append(result)
                print(json.dumps(result), flush=True)
                next_fault = at + args.fault_every
            time.sleep(0.2)
        self.load.stopping.set()
        self.load.join(10)
        # settle: until the exporter has counted all the ground truth saw, or both stayed still for 20 s
        settle_started = stable_since = time.monotonic()
        last = None
        while time.monotonic() - settle_started < 180 and time.monotonic() - stable_since < 20:
            now = (self.truth.count(), self.counted())
            if now[1] >= now[0] and now == last:
                break
            if now != last:
                stable_since, last = time.monotonic(), now
            time.sleep(1.0)
        final = self.sample()
        return self.report(final)

    def report(self, final: dict) -> dict:
        rss = [s["rss_mb"] for s in self.samples]
        per_minute = {}
        for s in self.samples:
            per_minute[int(s["t"] // 60)] = s["rss_mb"]
        return {
            "broker": self.args.broker, "minutes": self.args.minutes, "rate_per_s": self.args.rate,
            "published": self.load.published, "terminal_events_seen_by_ground_truth": final["truth"],
            "terminal_events_counted_by_exporter": final["counted"],
            "events_lost": final["truth"] - final["counted"],
            "tasks_celery_lost": self.load.published - final["truth"],
            "rss_mb": {"start": rss[0], "max": max(rss), "end": rss[-1], "per_minute": per_minute},
            "scrape_ms_median": statistics.median(s["scrape_ms"] for s in self.samples),
            "tracked_tasks": {"max": max(s["tracked"] or 0 for s in self.samples), "end": final["tracked"]},
            "tracked_tasks_vanished": final["vanished"],
            "counters_backwards": self.backwards,
            "faults": self.faults,
            "exporter_alive": self.exporter.proc.poll() is None,
            "exporter_log": str(self.exporter.log_path),
        }

    def close(self):
        self.load.stopping.set()
        self.truth.stopping.set()
        try:
            code, seconds = self.exporter.stop(10)
            print(f"exporter stopped with {code} in {seconds:.1f}s", file=sys.stderr)
        except Exception as exc:
            print(f"exporter stop: {exc}", file=sys.stderr)
        for worker in self.workers.values():
            worker.close()
        self.proxy.close()
        self.broker.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    soak = Soak(args)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        report = soak.run()
    finally:
        soak.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["exporter_alive"] and not report["counters_backwards"] else 1


if __name__ == "__main__":
    sys.exit(main())
