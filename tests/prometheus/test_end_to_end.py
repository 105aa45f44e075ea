"""End to end: the shipped alerts and dashboards in a real Prometheus that scrapes a real exporter
while real prefork workers on the real Redis broker fail the way the post-mortems describe.

One scenario per module (about 90 s), shared by the tests below:

1. Setup. A Redis database of our own; the exporter under test ("main": events, remote-control
   poller, Redis poller, host agent limited to this run's workers); a second exporter ("aux")
   that reaches Redis through a TCP proxy the test can cut; five workers; a publishing app with
   the publisher hook, also behind a proxy; a Prometheus (Debian's) that scrapes both exporters
   every second with the labels celery-mixin users have (cluster, namespace, job) and evaluates
   deploy/prometheus/alerts.yaml every second, every `for:` shortened to FOR (override_rules).
   The only expression overrides are in EXPR_EDITS (a 1 h threshold, a 5 min window); the main
   exporter is told visibility_timeout=20 (the workers keep kombu's 3600) for the unacked alert.
2. Healthy run: HEALTHY_SECONDS of successful tasks on every worker and successful publishes.
   No alert may fire, nor even be pending.
3. Failures, all at once (scenario threads): a hung task, a worker SIGKILLed while running a task
   whose pool children outlive it, a restart loop, a recycle storm below max_memory_per_child,
   a queue fed with no consumer, failing tasks, an unpicklable exception, expired tasks filling
   a small revoked set, publishes retried against a cut broker link (and a kombu that ignores the
   retry policy), an exporter that contains a bug of its own (the aux exporter is the real daemon
   with one injected bug, tests/apps/buggy_exporter.py: a task-succeeded of a task whose id starts
   with boom- raises), loses its broker link for a moment, is frozen for ten seconds and then cut
   from the broker. The scenario ends when every alert of Scenario.expected (all 30) has fired with the labels of the worker,
   queue, task or publisher concerned, as /api/v1/alerts reports it (a monitor thread
   polls it twice a second), or after INDUCE_TIMEOUT.

The tests then check the alerts, and run every query of every dashboard and of celery-mixin
against that Prometheus over the whole scenario.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from celery import Celery
from kombu.connection import Connection

from tests.apps.testapp import client
from tests.harness import HOST, REDIS_HOST, REDIS_PORT, ExporterProcess, TcpProxy, WorkerProcess, make_redis_broker

from .conftest import ALERTS_FILE, PrometheusConfig, PrometheusError, PrometheusServer, override_rules
from .test_dashboards import DASHBOARDS, QUERIES, variable_selectors
from tests.integration.test_beat import BeatProcess

from .test_rules import ALERT_IDS, metric_names

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
MARK = f"e2e{RUN}"  # in every worker's node name: the host agent only looks at this run's workers
FOR = "2s"
HEALTHY_SECONDS = 30
INDUCE_TIMEOUT = 120
CLUSTER, NAMESPACE, JOB = "e2e", "celery", "celery-exporter"
VISIBILITY_TIMEOUT = 20  # told to the main exporter: the alert fires at 80 %, after 16 s unacked
REVOKES_MAX = 100  # CELERY_WORKER_REVOKES_MAX of the worker that receives the expired tasks
PUBLISHER = f"{MARK}-web"
FAST = ("--inspect-interval", "1", "--worker-timeout", "3", "--stall-after", "4", "--lost-task-grace", "2",
        "--broker-poll-interval", "1", "--beat-timeout", "3", "--beat-missed-grace", "1")
BEAT_HEALTHY_ENTRIES = "every-second,every-minute"  # tests/apps/beatapp.py; the second beat adds always-fails
MIXIN_FILE = Path(os.environ.get("CELERY_MIXIN_QUERIES", "/work/shared/compat/celery-mixin-queries.json"))

# Expression overrides, on top of FOR: only where the shipped rule waits for wall-clock time that
# a test cannot spend. Each is derived from the shipped expression, so the rest of it is tested.
EXPR_EDITS = {
    "CeleryTaskRunningTooLong": ("> 3600", "> 5"),  # a task running for over 5 s instead of 1 h
    "CeleryExporterNoEvents": ("[5m]", "[20s]"),  # no event for 20 s instead of 5 min
    "CeleryQueueConsumersUnknown": ("15m", "20s"),  # unknown for 20 s: a busy healthy queue empties within it
}

# Series that the scenario cannot produce: RabbitMQ-only broker statistics (the broker is Redis).
NOT_PRODUCED = {
    "celery_queue_consumer_utilisation",
    "celery_queue_messages_published_total",
    "celery_queue_messages_delivered_total",
    "celery_queue_messages_redelivered_total",
    "celery_queue_messages_acked_total",
    "celery_broker_connections",
}

# Queues of the scenario
# The aux exporter: the real daemon with one bug injected, which only a task id starting with boom- triggers.
BUGGY_EXPORTER = (sys.executable, "tests/apps/buggy_exporter.py")

Q_OK, Q_HUNG, Q_FAIL, Q_EXP, Q_ORPH, Q_MEM, Q_LOOP, Q_NOBODY, Q_CRASH = (
    "ok", "hung", "failq", "expq", "orphq", "memq", "loopq", "nobody", "crashq")


def shipped_alerts() -> dict[str, dict]:
    doc = yaml.safe_load(ALERTS_FILE.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def expr_overrides() -> dict[str, str]:
    alerts = shipped_alerts()
    out = {}
    for name, (old, new) in EXPR_EDITS.items():
        expr = alerts[name]["expr"]
        assert old in expr, f"{name}: the shipped expression no longer contains {old!r}; update EXPR_EDITS"
        out[name] = expr.replace(old, new)
    return out


# ------------------------------------------------------------------------------------------------
class AlertMonitor(threading.Thread):
    """Polls /api/v1/alerts twice a second and keeps, per (state, alert labels), the intervals
    during which Prometheus reported it."""

    def __init__(self, prom: PrometheusServer, interval: float = 0.5):
        super().__init__(daemon=True)
        self.prom = prom
        self.interval = interval
        self.lock = threading.Lock()
        self.seen: dict[tuple, list[list]] = {}  # (state, frozenset(labels)) -> [[first, last, value]]
        self.errors = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            try:
                alerts = self.prom.alerts()
            except Exception:  # Prometheus busy: try again
                self.errors += 1
            else:
                now = time.time()
                with self.lock:
                    for alert in alerts:
                        spans = self.seen.setdefault((alert["state"], frozenset(alert["labels"].items())), [])
                        if spans and now - spans[-1][1] < 3 * self.interval + 1:
                            spans[-1][1:] = [now, alert.get("value")]
                        else:
                            spans.append([now, now, alert.get("value")])
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join(5)

    def _spans(self, since: float, until: float) -> list[tuple[str, dict, float, float, Any]]:
        with self.lock:
            items = [(key, list(spans)) for key, spans in self.seen.items()]
        return [(state, dict(frozen), first, last, value)
                for (state, frozen), spans in items for first, last, value in spans
                if last >= since and first <= until]

    def matching(self, name: str, /, state: str = "firing", since: float = 0.0, until: float = float("inf"),
                 **labels: str) -> list[dict]:
        return [dict(lab, _first=first, _value=value)
                for st, lab, first, _last, value in self._spans(since, until)
                if st == state and lab.get("alertname") == name and all(lab.get(k) == v for k, v in labels.items())]

    def active_between(self, since: float, until: float) -> list[tuple[str, dict, float, float]]:
        """(state, labels, first, last seen, relative to `since`) of every alert reported in between."""
        return [(st, lab, round(first - since, 1), round(last - since, 1))
                for st, lab, first, last, _ in self._spans(since, until)]


@dataclass
class Scenario:
    broker: Any
    prom: PrometheusServer
    main: ExporterProcess
    aux: ExporterProcess
    monitor: AlertMonitor
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    extra_workers: list[WorkerProcess] = field(default_factory=list)  # restart-loop incarnations
    beats: list[BeatProcess] = field(default_factory=list)  # celery beat processes with the beat hook
    proxies: list[TcpProxy] = field(default_factory=list)
    expected: dict[str, dict] = field(default_factory=dict)  # alert -> labels it must carry
    errors: list[str] = field(default_factory=list)  # failures of the scenario threads
    started: float = 0.0
    healthy: tuple[float, float] = (0.0, 0.0)
    induced: float = 0.0
    finished: float = 0.0
    log: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)  # the failure steps
    publisher_proxy: TcpProxy | None = None  # the publishing app's link to the broker
    publisher_app: Celery | None = None
    publisher_hook: Any = None
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def main_instance(self) -> str:
        return f"127.0.0.1:{self.main.port}"

    @property
    def aux_instance(self) -> str:
        return f"127.0.0.1:{self.aux.port}"

    def note(self, message: str) -> None:
        self.log.append(f"{time.time() - self.started:6.1f}s {message}")

    def missing(self) -> dict[str, dict]:
        return {name: labels for name, labels in self.expected.items()
                if not self.monitor.matching(name, since=self.induced, **labels)}

    def diagnostics(self) -> str:
        firing = sorted({(d["alertname"], d.get("hostname") or d.get("queue_name") or d.get("instance", ""))
                         for st, d, *_ in self.monitor.active_between(self.induced, time.time()) if st == "firing"})
        return ("scenario log:\n  " + "\n  ".join(self.log)
                + "\nscenario errors:\n  " + "\n  ".join(self.errors or ["none"])
                + f"\nfiring since the failures: {firing}")


def _through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))


def _poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.3, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # an exporter restarting, a scrape refused: poll again
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def _metric(exporter: ExporterProcess, name: str, /, **labels) -> float | None:
    return exporter.scrape().value(name, **labels)


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenario(tmp_path_factory, prometheus_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    broker = make_redis_broker()  # a database leased from the harness: events are per database too
    cleanup: list[Callable[[], None]] = []  # run in reverse order, whatever happened
    try:
        s = _setup(workdir, broker, prometheus_factory, cleanup)
        _healthy_run(s, cleanup)
        _induce_failures(s, cleanup)
        yield s
    finally:
        for step in reversed(cleanup):
            try:
                step()
            except Exception:
                traceback.print_exc()
        broker.close()


def _stop_exporter(exporter: ExporterProcess) -> None:
    try:
        os.kill(exporter.proc.pid, signal.SIGCONT)  # in case it is the frozen one
    except ProcessLookupError:
        pass
    try:
        exporter.stop()
    except AssertionError:  # did not stop within 5 s: killed; not what this module tests
        pass


def _setup(workdir: Path, broker, prometheus_factory, cleanup: list) -> Scenario:
    aux_proxy = TcpProxy(REDIS_HOST, REDIS_PORT)
    cleanup.append(aux_proxy.close)
    main = ExporterProcess(
        broker.url, *FAST, "--host-metrics", "--host-scan-interval", "1", "--host-worker-pattern", rf"-n {MARK}-",
        "--broker-transport-option", f"visibility_timeout={VISIBILITY_TIMEOUT}",
        log_path=workdir / "exporter-main.log")
    cleanup.append(lambda: _stop_exporter(main))
    aux = ExporterProcess(_through(aux_proxy, broker.url), "--inspect-interval", "0", "--queues", Q_NOBODY,
                          "--worker-timeout", "3", log_path=workdir / "exporter-aux.log", command=BUGGY_EXPORTER,
                          env={"BUGGY_EXPORTER_BUGS": "events"})
    cleanup.append(lambda: _stop_exporter(aux))
    rules = override_rules(ALERTS_FILE, workdir, for_duration=FOR, exprs=expr_overrides())
    prom = prometheus_factory(PrometheusConfig(
        rule_files=[rules], scrape_targets=[f"127.0.0.1:{main.port}", f"127.0.0.1:{aux.port}"],
        scrape_interval="1s", evaluation_interval="1s", job=JOB,
        target_labels={"cluster": CLUSTER, "namespace": NAMESPACE}))
    cleanup.append(prom.stop)
    monitor = AlertMonitor(prom)
    s = Scenario(broker=broker, prom=prom, main=main, aux=aux, monitor=monitor, proxies=[aux_proxy],
                 started=time.time())

    def stop_workers():
        for worker in [*s.workers.values(), *s.extra_workers, *s.beats]:
            worker.close()  # SIGKILLs the process group: orphaned pool children too

    def stop_threads():  # before stop_workers: no step may start a worker after it
        s.stopping.set()
        for thread in s.threads:
            thread.join(60)
        monitor.stop()

    cleanup += [stop_workers, stop_threads]
    monitor.start()

    def worker(key, name, **kwargs):
        kwargs.setdefault("log_path", workdir / f"worker-{name}.log")
        s.workers[key] = WorkerProcess(broker.url, f"{MARK}-{name}", **kwargs)
        return s.workers[key]

    hook_env = {"TEST_WORKER_HOOK": "1"}
    worker("ok", "ok", queues=Q_OK, concurrency=2)
    worker("hung", "hung", queues=Q_HUNG, concurrency=1)
    worker("fail", "fail", queues=Q_FAIL, concurrency=2)
    worker("exp", "exp", queues=Q_EXP, concurrency=1, env={**hook_env, "CELERY_WORKER_REVOKES_MAX": str(REVOKES_MAX)})
    worker("orph", "orph", queues=Q_ORPH, concurrency=2, app="tests.apps.hostapp",
           env={"HOSTAPP_KEEP_CHILDREN": "1", "TEST_DEFAULT_QUEUE": Q_ORPH})
    worker("beat", "beat", concurrency=1, app="tests.apps.beatapp")  # runs the periodic tasks (queue celery)
    s.beats.append(BeatProcess(broker.url, f"{MARK}-beat-1", workdir, env={"TEST_BEAT_ENTRIES": BEAT_HEALTHY_ENTRIES}))
    main.wait_ready(30)
    aux.wait_ready(30)
    s.note("exporters ready")
    hosts = {w.hostname for w in s.workers.values()}

    def all_up(instance):
        up = {r["metric"]["hostname"] for r in prom.query(f'celery_worker_up{{instance="{instance}"}} == 1')}
        return hosts <= up

    _poll(lambda: all_up(s.main_instance) and all_up(s.aux_instance), 90, 0.5, "every worker up in Prometheus")
    _poll(lambda: all(w.hostname in {r["metric"]["hostname"] for r in prom.query(
        f'celery_host_worker_processes{{role="child", instance="{s.main_instance}"}}')} for w in s.workers.values()),
        30, 0.5, "the host agent sees every worker's children")
    # the remote-control source reports up only after its first full poll (five broadcasts of
    # --inspect-timeout each): before that, source_up{source="inspect"} is 0
    _poll(lambda: len(prom.query("celery_exporter_source_up == 1")) >= 4
          and not prom.query("celery_exporter_source_up == 0"), 30, 0.5, "every exporter source up")
    _poll(lambda: prom.query(f'celery_beat_up{{beat="{MARK}-beat-1", instance="{s.main_instance}"}} == 1'), 30, 0.5,
          "beat up in Prometheus")
    s.note("workers, beat and sources up")
    return s


def _healthy_run(s: Scenario, cleanup: list) -> None:
    """Only successful tasks and publishes; then HEALTHY_SECONDS under watch."""
    app = client(s.broker.url)
    hostapp = Celery("e2e-hostapp-client", broker=s.broker.url, set_as_current=False)
    stop = threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            app.send_task("tests.add", (i, 1), queue=Q_OK)
            app.send_task("tests.sleep", (0.2,), queue=Q_OK)
            for queue in (Q_HUNG, Q_FAIL, Q_EXP):
                app.send_task("tests.add", (i, 2), queue=queue)
            hostapp.send_task("hostapp.sleep", (0.05,), queue=Q_ORPH)
            i += 1
            stop.wait(0.25)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        _start_publisher(s, cleanup)
        time.sleep(3)  # a few scrapes and evaluations with tasks flowing before the watch starts
        start = time.time()
        s.note("healthy run starts")
        while time.time() - start < HEALTHY_SECONDS:
            s.publisher_app.send_task("tests.add", (1, 1), queue=Q_OK)
            time.sleep(1)
    finally:
        stop.set()
        thread.join(5)
    s.healthy = (start, time.time())
    s.note("healthy run ends")


def _start_publisher(s: Scenario, cleanup: list) -> None:
    """A publishing app (the publisher hook) whose broker link goes through a proxy."""
    from celery_health_exporter.hooks.publisher import instrument
    from tests.apps.publisherapp import make_app

    proxy = TcpProxy(REDIS_HOST, REDIS_PORT)
    cleanup.append(proxy.close)
    s.proxies.append(proxy)
    s.publisher_proxy = proxy
    s.publisher_app = make_app(_through(proxy, s.broker.url))
    s.publisher_hook = instrument(s.publisher_app, interval=0.3, publisher=PUBLISHER)
    cleanup.append(lambda: s.publisher_hook.stop(flush=False))


# ------------------------------------------------------------------------------------------------
def _induce_failures(s: Scenario, cleanup: list) -> None:
    s.induced = time.time()
    s.note("failures start")
    w = s.workers
    main_i, aux_i = s.main_instance, s.aux_instance
    s.expected = {
        "CeleryWorkerStalled": {"hostname": w["hung"].hostname, "instance": main_i},
        "CeleryTaskRunningTooLong": {"hostname": w["hung"].hostname, "instance": main_i},
        "CeleryQueueUnackedNearVisibilityTimeout": {"queue_name": Q_HUNG, "instance": main_i},
        "CeleryWorkerDown": {"hostname": w["orph"].hostname, "instance": main_i},
        "CeleryWorkerUncleanShutdown": {"hostname": w["orph"].hostname, "instance": main_i},
        "CeleryWorkerUnrecoverableError": {"hostname": f"{MARK}-crash@{HOST}", "exception": "TypeError"},
        "CeleryTasksLost": {"name": "hostapp.allocate", "queue_name": Q_ORPH, "reason": "worker_lost"},
        "CeleryOrphanedWorkerProcesses": {"instance": main_i},
        "CeleryWorkerRestartLoop": {"hostname": f"{MARK}-loop@{HOST}", "instance": main_i},
        "CeleryWorkerChildRecycleStorm": {"hostname": f"{MARK}-mem@{HOST}"},
        "CeleryWorkerChildMemoryNearLimit": {"hostname": f"{MARK}-mem@{HOST}"},
        "CeleryQueueWithoutConsumers": {"queue_name": Q_NOBODY, "instance": main_i},
        "CeleryQueueBacklogGrowing": {"queue_name": Q_NOBODY, "instance": main_i},
        "CeleryTaskHighFailRate": {"name": "tests.fail", "queue_name": Q_FAIL},
        "CeleryTaskUnpicklableException": {"name": "tests.retry_unpicklable", "exception": "UnpicklableError"},
        "CeleryTasksExpiring": {"queue_name": Q_EXP},
        "CeleryWorkerRevokedSetNearLimit": {"hostname": w["exp"].hostname, "instance": main_i},
        "CeleryPublishRetries": {"publisher": PUBLISHER},
        "CeleryPublishRetryPolicyExceeded": {"publisher": PUBLISHER},
        "CeleryExporterEventLagHigh": {"instance": aux_i},
        "CeleryExporterSourceDown": {"instance": aux_i, "source": "events"},
        "CeleryExporterSourceFlapping": {"instance": aux_i, "source": "events"},
        "CeleryExporterInternalErrors": {"instance": aux_i, "source": "events"},
        "CeleryExporterNoEvents": {"instance": aux_i},
        "CeleryExporterDown": {"instance": aux_i},
        "CeleryQueueConsumersUnknown": {"queue_name": Q_NOBODY, "instance": aux_i},
        "CeleryBeatDuplicateSchedulers": {"entry": "every-second", "name": "tests.beat.tick"},
        "CeleryPeriodicTaskFailing": {"entry": "always-fails", "name": "tests.beat.fail"},
        "CeleryBeatDown": {"beat": f"{MARK}-beat-2", "instance": main_i},
        "CeleryPeriodicTaskMissed": {"entry": "always-fails", "name": "tests.beat.fail"},
    }
    app = client(s.broker.url)
    hostapp = Celery("e2e-hostapp-client", broker=s.broker.url, set_as_current=False)

    def hung_task():
        app.send_task("tests.block", queue=Q_HUNG)
        for _ in range(2):  # behind it: one prefetched (unacked in Redis), one ready
            app.send_task("tests.add", (1, 1), queue=Q_HUNG)

    def sigkill_while_running():
        worker = w["orph"]
        hostapp.send_task("hostapp.allocate", (1, 600), queue=Q_ORPH)
        _poll(lambda: _metric(s.main, "celery_task_started_total", name="hostapp.allocate",
                              hostname=worker.hostname, queue_name=Q_ORPH) == 1, 20, what="task started")
        os.kill(worker.proc.pid, signal.SIGKILL)  # the main process only: its children become orphans
        s.note("orph main SIGKILLed")

    def queue_without_consumer():
        for _ in range(16):
            for i in range(10):
                app.send_task("tests.add", (i, i), queue=Q_NOBODY)
            time.sleep(0.5)

    def failing_tasks():
        app.send_task("tests.retry_unpicklable", queue=Q_FAIL)
        for _ in range(30):
            app.send_task("tests.fail", ("e2e",), queue=Q_FAIL)
            app.send_task("tests.add", (1, 1), queue=Q_FAIL)
            time.sleep(0.3)

    def unrecoverable_error():
        """A task whose outcome the main process cannot unpickle: it stops on an unrecoverable error."""
        worker = WorkerProcess(s.broker.url, f"{MARK}-crash", queues=Q_CRASH, concurrency=1,
                               app="tests.apps.crashapp", env={"TEST_INSTALL_HOOK": "1"},
                               log_path=s.main.log_path.parent / "worker-crash.log")
        s.extra_workers.append(worker)
        _poll(lambda: _metric(s.main, "celery_worker_up", hostname=worker.hostname) == 1, 60,
              what="crash worker up")
        app.send_task("tests.reject_unpicklable", queue=Q_CRASH)
        s.note("unpicklable rejection sent")

    def expired_tasks():
        logging.getLogger("celery.app.base").setLevel(logging.ERROR)  # "expiration date in the past"
        past = datetime.now(timezone.utc) - timedelta(minutes=5)
        for i in range(REVOKES_MAX + 50):
            app.send_task("tests.add", (i, 0), queue=Q_EXP, expires=past)

    def recycle_storm():
        worker = WorkerProcess(s.broker.url, f"{MARK}-mem", queues=Q_MEM, concurrency=2,
                               extra=("--max-memory-per-child", "1000"),  # 1 MB: below any child's baseline
                               env={"TEST_WORKER_HOOK": "1"}, log_path=s.main.log_path.parent / "worker-mem.log")
        s.workers["mem"] = worker
        _poll(lambda: _metric(s.main, "celery_worker_up", hostname=worker.hostname) == 1, 60, what="mem worker up")
        # The processed count (first heartbeat) and the replacement counters (first hook
        # reply) must exist before the storm, or Prometheus first sees them already raised
        # and increase() over them, which the recycle panels divide, has nothing to show.
        _poll(lambda: _metric(s.main, "celery_worker_tasks_processed_total", hostname=worker.hostname) == 0
              and _metric(s.main, "celery_worker_child_replacements_total", hostname=worker.hostname,
                          reason="memory") == 0, 60, what="mem worker counters at 0")
        time.sleep(2.5)  # scraped at 0 by Prometheus (it scrapes every second here)
        for i in range(30):
            app.send_task("tests.add", (i, 1), queue=Q_MEM)
            time.sleep(0.2)

    def restart_loop():
        hostname = f"{MARK}-loop@{HOST}"
        for round_, stop in enumerate(("term", "kill", "term", None)):
            if s.stopping.is_set():
                return
            worker = WorkerProcess(s.broker.url, f"{MARK}-loop", queues=Q_LOOP, concurrency=1,
                                   log_path=s.main.log_path.parent / "worker-loop.log")
            s.extra_workers.append(worker)
            _poll(lambda: _metric(s.main, "celery_worker_up", hostname=hostname) == 1
                  and _metric(s.main, "celery_worker_restarts_total", hostname=hostname) == round_,
                  60, what=f"loop worker up, round {round_}")
            if stop is None:
                break
            if stop == "term":
                worker.terminate()
            else:
                worker.kill()
            _poll(lambda: _metric(s.main, "celery_worker_up", hostname=hostname) == 0, 30,
                  what=f"loop worker down, round {round_}")
        s.note("restart loop done")

    def publish_against_a_cut_link():
        proxy, papp, hook = s.publisher_proxy, s.publisher_app, s.publisher_hook
        proxy.cut()
        for _ in range(4):  # 4 + 3 + 3 + 3 errback calls with max_retries=3
            try:
                papp.send_task("tests.add", (1, 2), queue=Q_OK)
            except Exception:
                pass
            else:
                raise AssertionError("a publish through the cut link succeeded")
        # kombu ignoring max_retries (the bug the issue recalls), for this link only: on Redis the
        # publish retries in _ensure_connection (default_channel), on RabbitMQ in ensure
        originals = {name: getattr(Connection, name) for name in ("ensure", "_ensure_connection")}

        def unbounded(original):
            def method(self, *args, **kwargs):
                if self.port == proxy.port:
                    kwargs["max_retries"] = None
                return original(self, *args, **kwargs)
            return method

        def undo():
            for name, original in originals.items():
                setattr(Connection, name, original)

        cleanup.append(undo)
        for name, original in originals.items():
            setattr(Connection, name, unbounded(original))
        done = threading.Event()

        def publish():
            try:
                papp.send_task("tests.add", (1, 2), queue=Q_OK)
            except Exception as exc:  # reported by the assertion below
                s.note(f"the retrying publish raised {exc!r}")
            else:
                done.set()

        threading.Thread(target=publish, daemon=True).start()
        _poll(lambda: hook.snapshot()["retry_policy_exceeded"] >= 1, 20, what="retry policy exceeded in the hook")
        proxy.restore()
        assert done.wait(20), "the publish did not complete after the link came back"
        undo()
        s.note(f"publisher totals {hook.snapshot()}")

    def periodic_tasks():
        """A second beat with the whole schedule: two schedulers (every-second sent twice) and an entry
        whose task always fails; once both alerts fired it is SIGKILLed: beat down, and the failing
        entry, which only it scheduled, misses its due times."""
        beat = BeatProcess(s.broker.url, f"{MARK}-beat-2", s.main.log_path.parent)
        s.beats.append(beat)
        _poll(lambda: s.monitor.matching("CeleryBeatDuplicateSchedulers", since=s.induced,
                                         **s.expected["CeleryBeatDuplicateSchedulers"])
              and s.monitor.matching("CeleryPeriodicTaskFailing", since=s.induced,
                                     **s.expected["CeleryPeriodicTaskFailing"]), 60, 0.5,
              what="duplicate schedulers and failing periodic task alerts")
        beat.kill()
        s.note("beat-2 SIGKILLed")

    def exporter_frozen_then_cut():
        app.send_task("tests.add", (1, 1), queue=Q_OK, task_id=f"boom-{uuid.uuid4()}")  # aux: a bug, contained
        _poll(lambda: _metric(s.aux, "celery_exporter_internal_errors_total", source="events") == 1, 20,
              what="the aux exporter's bug counted")
        # a flap: the link drops and comes back (with every for: at FOR, any failure of a source that
        # was up in the window fires CeleryExporterSourceFlapping; the promtool cases tell a flap from
        # an outage)
        s.proxies[0].cut()
        _poll(lambda: _metric(s.aux, "celery_exporter_source_failures_total", source="events") >= 1, 20,
              what="the aux exporter's events source failed")
        s.proxies[0].restore()
        _poll(lambda: _metric(s.aux, "celery_exporter_source_up", source="events") == 1, 30,
              what="the aux exporter's events source back")
        s.note("aux flapped")
        os.kill(s.aux.proc.pid, signal.SIGSTOP)  # a frozen exporter (CPU throttled, swapped out...)
        time.sleep(10)
        os.kill(s.aux.proc.pid, signal.SIGCONT)
        s.note("aux resumed")
        time.sleep(4)  # it works through the backlog of 10 s old events
        s.proxies[0].cut()  # then loses the broker for good
        s.note("aux cut from the broker")

    steps = [hung_task, sigkill_while_running, queue_without_consumer, failing_tasks, unrecoverable_error,
             expired_tasks,
             recycle_storm, restart_loop, publish_against_a_cut_link, periodic_tasks, exporter_frozen_then_cut]
    threads = s.threads
    for step in steps:
        def run(step=step):
            try:
                step()
            except BaseException:
                s.errors.append(f"{step.__name__}: {traceback.format_exc()}")
        thread = threading.Thread(target=run, name=step.__name__, daemon=True)
        thread.start()
        threads.append(thread)

    deadline = time.monotonic() + INDUCE_TIMEOUT
    while time.monotonic() < deadline:
        if not s.missing() and not any(t.is_alive() for t in threads):
            break
        if s.errors and not any(t.is_alive() for t in threads):
            break
        time.sleep(0.5)
    for thread in threads:
        thread.join(1)
    s.finished = time.time()
    s.note(f"failures done; not fired: {sorted(s.missing())}")


# ------------------------------------------------------------------------------------------------
def test_every_shipped_alert_is_induced(scenario):
    """The scenario induces the failure of every alert of deploy/prometheus/alerts.yaml."""
    assert set(scenario.expected) == set(ALERT_IDS)


def test_prometheus_loaded_the_overridden_rules(scenario):
    rules = [r for g in scenario.prom.rules() for r in g["rules"] if r["type"] == "alerting"]
    assert {r["name"] for r in rules} == set(ALERT_IDS)
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert {r["duration"] for r in rules} == {2}
    targets = scenario.prom.targets()
    assert {t["labels"]["instance"] for t in targets} == {scenario.main_instance, scenario.aux_instance}
    assert all(t["labels"]["cluster"] == CLUSTER and t["labels"]["namespace"] == NAMESPACE for t in targets)


def test_the_scenario_ran_without_errors(scenario):
    assert scenario.errors == [], scenario.diagnostics()


def test_a_healthy_run_fires_no_alert(scenario):
    start, end = scenario.healthy
    assert end - start >= HEALTHY_SECONDS
    active = scenario.monitor.active_between(start, end)
    assert active == [], f"alerts during the healthy run: {active}"
    # the same from the ALERTS series Prometheus wrote at every evaluation
    window = int(end - start)
    written = scenario.prom.query(f"ALERTS[{window}s]", time=end)
    assert written == [], [r["metric"] for r in written]
    assert scenario.monitor.errors < 10


@pytest.mark.parametrize("alert", sorted(ALERT_IDS))
def test_induced_failure_fires_its_alert(scenario, alert):
    labels = scenario.expected[alert]
    found = scenario.monitor.matching(alert, since=scenario.induced, **labels)
    assert found, f"{alert}{labels} never fired\n{scenario.diagnostics()}"
    fired = found[0]
    assert fired["severity"] in {"critical", "warning", "info"}
    assert fired["job"] == JOB


@pytest.mark.parametrize("alert", sorted(ALERT_IDS))
def test_fired_alerts_keep_the_cluster_and_namespace(scenario, alert):
    """Alerts are routed by cluster / namespace (celery-mixin keeps `namespace` in its by clauses)."""
    found = scenario.monitor.matching(alert, since=scenario.induced, **scenario.expected[alert])
    if not found:
        pytest.skip("did not fire (see test_induced_failure_fires_its_alert)")
    assert found[0].get("namespace") == NAMESPACE and found[0].get("cluster") == CLUSTER, found[0]


def test_firing_alerts_have_rendered_annotations(scenario):
    rendered = [a for a in scenario.prom.alerts() if a["state"] == "firing"]
    assert rendered
    for alert in rendered:
        ann = alert["annotations"]
        assert "{{" not in ann["summary"] + ann["description"], ann
        assert "<no value>" not in ann["summary"] + ann["description"], (alert["labels"]["alertname"], ann)


# ------------------------------------------------------------------------------------------------
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "5s", "__range": "1h", "__range_s": "3600",
                    "__interval_ms": "5000"}


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return GRAFANA_BUILTINS.get(name) or values.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def _range(s: Scenario, expr: str) -> list[dict]:
    return s.prom.query_range(expr, start=s.started, end=time.time(), step=2)


def _existing(s: Scenario, names: set[str]) -> set[str]:
    return {n for n in names if s.prom.query(f'count({{__name__="{n}"}})') or _range(s, f'count({{__name__="{n}"}})')}


def test_every_dashboard_query_parses_and_returns_data(scenario):
    """All variables at "All" (Grafana's allValue .*), over the whole scenario."""
    errors, empty = {}, {}
    checked = 0
    for dash, title, expr in QUERIES:
        query = substitute(expr, {})
        try:
            result = _range(scenario, query)
        except PrometheusError as exc:
            errors[f"{dash} / {title}: {query}"] = str(exc)
            continue
        checked += 1
        names = metric_names(query) - {"ALERTS"}
        if result or names & NOT_PRODUCED:
            continue
        empty[f"{dash} / {title}: {query}"] = sorted(names - _existing(scenario, names))
    assert errors == {}
    assert empty == {}, "queries without data (metrics the scenario did not produce):\n" + json.dumps(empty, indent=1)
    assert checked == len(QUERIES) >= 100


def test_every_dashboard_variable_lists_values(scenario):
    checked = 0
    for dash, content in DASHBOARDS.items():
        for var in content["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
            values = scenario.prom.label_values(m.group(2), substitute(m.group(1), {}))
            assert values, f"{dash} ${var['name']}: {query} lists nothing"
            checked += 1
    assert checked == len(variable_selectors())


# ------------------------------------------------------------------------------------------------
def _mixin() -> dict:
    if not MIXIN_FILE.exists():
        pytest.skip(f"{MIXIN_FILE} not found (set CELERY_MIXIN_QUERIES)")
    return json.loads(MIXIN_FILE.read_text())


MIXIN_VALUES = {"cluster": CLUSTER, "namespace": NAMESPACE, "job": JOB, "queue_name": ".*", "task": ".*"}


def test_every_celery_mixin_dashboard_query_returns_data(scenario):
    mixin = _mixin()
    errors, empty = {}, []
    count = 0
    for dash, content in mixin["dashboards"].items():
        for expr in content["panel_queries"]:
            query = substitute(expr, MIXIN_VALUES)
            count += 1
            try:
                result = _range(scenario, query)
            except PrometheusError as exc:
                errors[f"{dash}: {query}"] = str(exc)
                continue
            if not result:
                empty.append(f"{dash}: {' '.join(query.split())}")
    assert errors == {}
    assert empty == [], "\n".join(empty)
    assert count >= 60


def test_every_celery_mixin_variable_lists_values(scenario):
    mixin = _mixin()
    for dash, content in mixin["dashboards"].items():
        for query in content["variable_queries"]:
            if query == "prometheus":  # the datasource variable
                continue
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert m, query
            values = scenario.prom.label_values(m.group(2), substitute(m.group(1), MIXIN_VALUES))
            assert values, f"{dash}: {query} lists nothing"


def test_every_celery_mixin_alert_expression_returns_data(scenario):
    mixin = _mixin()
    for name, expr in mixin["alerts"].items():
        assert _range(scenario, expr), f"celery-mixin alert {name}: no data over the scenario"
