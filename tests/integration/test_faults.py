"""Faults between the exporter and its broker, injected for real: Redis kills the
exporter's subscription, RabbitMQ force-closes its connection (and refuses it for a
while), the broker's host name stops resolving. Each time the exporter keeps serving
/metrics, /readyz says why it is not ready, the source's up metric is 0, counters
never go backwards, and it recovers by itself. Then: no credential of the broker or
of the management API shows in a log line, /, /metrics or /readyz after failed
connections with password-bearing URLs."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import redis
from celery import Celery

from tests.harness import (ROOT, REDIS_HOST, REDIS_PORT, ExporterProcess, Metrics, make_amqp_broker,
                           make_redis_broker, rabbitmq_api, wait_for)

pytestmark = pytest.mark.integration
QUICK = ("--inspect-interval", "0")  # the remote-control poller is not under test and slows every stop


class Events:
    """Celery's own EventDispatcher on the real broker, as a worker would send."""

    def __init__(self, broker_url: str):
        self.app = Celery("fault-events", broker=broker_url, set_as_current=False)
        self.app.conf.broker_connection_retry_on_startup = True
        # a name of its own: Redis pub/sub channels are shared by every test process on the same db number
        self.hostname = f"fault-{uuid.uuid4().hex[:8]}@test"
        self.sent = 0

    def task(self, name="tests.add", queue="q-faults") -> None:
        with self.app.connection_for_write() as conn:
            dispatcher = self.app.events.Dispatcher(conn, hostname=self.hostname, enabled=True)
            task_id = str(uuid.uuid4())
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=self.sent)
            dispatcher.send("task-received", uuid=task_id, name=name, routing_key=queue)
            dispatcher.send("task-started", uuid=task_id)
            dispatcher.send("task-succeeded", uuid=task_id, runtime=0.01)
            dispatcher.close()
        self.sent += 1


class Watch:
    """Every scrape of the test, kept to check that no counter ever went backwards."""

    def __init__(self, exporter: ExporterProcess):
        self.exporter = exporter
        self.history: list[Metrics] = []
        self.readyz: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scraping = threading.Lock()

    def scrape(self) -> Metrics:
        # One scrape at a time: the background poller and the test both scrape, and the
        # history must be in the order the exporter rendered them to judge monotonicity.
        with self._scraping:
            metrics = self.exporter.scrape()
            self.history.append(metrics)
        return metrics

    def succeeded(self, events: "Events") -> float:
        return self.scrape().sum("celery_task_succeeded_total", hostname=events.hostname)

    def poll_fast(self):
        """Poll /readyz and /metrics every 20 ms in the background (outages may last a second)."""
        def run():
            while not self._stop.is_set():
                try:
                    self.readyz.append(self.exporter.get("/readyz", timeout=2))
                    self.scrape()
                except Exception as exc:  # a failed request is a finding too
                    self.readyz.append((0, repr(exc)))
                self._stop.wait(0.02)
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop_polling(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def not_ready_reasons(self) -> list[str]:
        return [body.strip() for status, body in self.readyz if status == 503]

    def assert_counters_monotonic(self):
        previous: dict = {}
        for metrics in self.history:
            current = {(name, tuple(sorted(labels.items()))): value for name, labels, value in metrics.samples
                       if name.endswith(("_total", "_count")) and not name.startswith("process_")
                       and name != "celery_worker_tasks_processed_total"}  # documented to reset with the worker
            for key, value in previous.items():
                assert key in current, f"{key} disappeared"
                assert current[key] >= value, f"{key} went back from {value} to {current[key]}"
            previous = current
        assert len(self.history) >= 5


def exporter_ports(exporter: ExporterProcess, remote_port: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(exporter.proc.pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == remote_port}


# ------------------------------------------------------------------ Redis: CLIENT KILL of the subscription


def test_redis_client_kill_of_the_exporters_subscription(make_exporter):
    broker = make_redis_broker()
    exporter = make_exporter(broker.url, *QUICK)
    watch, events = Watch(exporter), Events(broker.url)
    events.task()
    wait_for(lambda: watch.succeeded(events) == 1, message="first task counted")

    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    ports = exporter_ports(exporter, REDIS_PORT)
    ours = [c for c in r.client_list(_type="pubsub") if int(c["addr"].rsplit(":", 1)[1]) in ports]
    assert len(ours) == 1, ours  # the events subscription, and only the exporter's
    watch.poll_fast()
    assert r.execute_command("CLIENT", "KILL", "ID", ours[0]["id"]) == 1
    wait_for(lambda: watch.scrape().value("celery_exporter_broker_reconnects_total") == 1, 20,
             message="reconnected by itself")
    wait_for(lambda: exporter.get("/readyz")[0] == 200, 10, message="ready again")
    watch.stop_polling()

    reasons = watch.not_ready_reasons()
    assert reasons and all(r.startswith("events source not consuming: ") for r in reasons), watch.readyz[-5:]
    assert any("closed" in r.lower() for r in reasons), reasons  # the subscription's end, in some words
    assert any(m.value("celery_exporter_source_up", source="events") == 0 for m in watch.history)
    new_ports = exporter_ports(exporter, REDIS_PORT)
    assert [c for c in r.client_list(_type="pubsub") if int(c["addr"].rsplit(":", 1)[1]) in new_ports]

    events.task()
    wait_for(lambda: watch.succeeded(events) == 2, message="counting continues on the new subscription")
    watch.assert_counters_monotonic()
    assert exporter.log().count("events: down") == 1


# ------------------------------------------------------------------ RabbitMQ: connection force-closed


def test_rabbitmq_connection_force_closed_and_refused_for_a_while(make_exporter):
    broker = make_amqp_broker()
    user, password = f"exp-{broker.vhost}", f"pw-{uuid.uuid4().hex}"
    rabbitmq_api("PUT", f"/api/users/{user}", {"password": password, "tags": ""})
    broker.cleanup.append(lambda: rabbitmq_api("DELETE", f"/api/users/{user}"))
    permissions = f"/api/permissions/{broker.vhost}/{user}"
    rabbitmq_api("PUT", permissions, {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        exporter = make_exporter(f"amqp://{user}:{password}@127.0.0.1:5672/{broker.vhost}", *QUICK,
                                 "--no-broker-poll")
        watch, events = Watch(exporter), Events(broker.url)
        events.task()
        wait_for(lambda: watch.succeeded(events) == 1, message="first task counted")

        # the exporter may not come back for now; then its connection is closed by the broker
        rabbitmq_api("DELETE", permissions)
        connections = wait_for(lambda: [c for c in rabbitmq_api("GET", f"/api/vhosts/{quote(broker.vhost, '')}"
                                                                        "/connections") if c["user"] == user],
                               message="the exporter's connection listed")
        for connection in connections:
            rabbitmq_api("DELETE", f"/api/connections/{quote(connection['name'], safe='')}")
        wait_for(lambda: exporter.get("/readyz")[0] == 503, 20, message="not ready")
        wait_for(lambda: "access to vhost" in exporter.get("/readyz")[1], 20, message="readyz says why")
        status, reason = exporter.get("/readyz")
        assert reason.startswith("events source not consuming: ") and user in reason and password not in reason
        m = watch.scrape()  # still serving, source down, nothing lost or reset
        assert m.value("celery_exporter_source_up", source="events") == 0
        assert m.sum("celery_task_succeeded_total", hostname=events.hostname) == 1
        events.task()  # published while the exporter is away: its queue keeps them (--event-queue-expires)
        events.task()

        rabbitmq_api("PUT", permissions, {"configure": ".*", "write": ".*", "read": ".*"})
        wait_for(lambda: exporter.get("/readyz")[0] == 200, 30, message="recovered by itself")
        assert watch.scrape().value("celery_exporter_broker_reconnects_total") == 1
        wait_for(lambda: watch.succeeded(events) == 3, message="events of the outage delivered, none lost")
        events.task()
        wait_for(lambda: watch.succeeded(events) == 4, message="counting continues")
        watch.assert_counters_monotonic()
        log = exporter.log()
        assert log.count("events: down") == 1 and "CONNECTION_FORCED" in log and password not in log
    finally:
        broker.close()


# ------------------------------------------------------------------ DNS: the broker's host name stops resolving


class NamespacedExporter(ExporterProcess):
    """The exporter in a mount namespace of its own whose /etc/hosts the test writes:
    a DNS failure (and its repair) for this process only, nothing changed on the host."""

    def __init__(self, hosts_file: Path, broker_url: str, *extra, log_path: Path):
        import tests.harness as harness

        self.port = harness.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts_file),
             sys.executable, "-m", "celery_health_exporter", "--broker-url", broker_url, "--listen-address",
             f"127.0.0.1:{self.port}", *extra],
            stdout=self.log_file, stderr=subprocess.STDOUT, cwd=ROOT)


def test_dns_failure_of_the_broker_host(tmp_path):
    if shutil.which("unshare") is None:
        pytest.fail("unshare(1) is needed for the DNS test (util-linux)")
    hosts = tmp_path / "hosts"
    original = Path("/etc/hosts").read_text()
    hosts.write_text(original)
    name = f"broker-{uuid.uuid4().hex[:8]}.test"
    broker = make_redis_broker()
    url = broker.url.replace(REDIS_HOST, name)
    exporter = NamespacedExporter(hosts, url, *QUICK, log_path=tmp_path / "exporter.log")
    try:
        watch = Watch(exporter)
        wait_for(lambda: exporter.alive() and "events source not consuming" in exporter.get("/readyz")[1]
                 and "starting" not in exporter.get("/readyz")[1], 20, message="readyz says why")
        status, reason = exporter.get("/readyz")
        assert status == 503 and "Name or service not known" in reason and name in reason, reason
        m = watch.scrape()
        assert m.value("celery_exporter_source_up", source="events") == 0
        assert exporter.get("/healthz") == (200, "ok\n")

        with open(hosts, "w") as f:  # the same inode: the bind mount sees it
            f.write(original + f"\n127.0.0.1 {name}\n")
        wait_for(lambda: exporter.get("/readyz")[0] == 200, 30, message="recovered once the name resolves")
        events = Events(broker.url)
        for _ in range(2):
            events.task()
        wait_for(lambda: watch.succeeded(events) == 2, message="events counted after recovery")
        for _ in range(3):
            watch.scrape()
        watch.assert_counters_monotonic()
        assert exporter.log().count("events: down") == 1
    finally:
        code, _ = exporter.stop()
        assert code == 0, exporter.log()


# ------------------------------------------------------------------ no credential anywhere after failures


def test_no_credential_leaks_after_failed_connections(make_exporter):
    amqp = make_amqp_broker()
    try:
        broker_pw = amqp.password
        mgmt_pw = f"mgmt-{uuid.uuid4().hex}"
        wrong_pw = f"wrong/pw@{uuid.uuid4().hex[:8]}:%"
        redis_pw = f"redis-{uuid.uuid4().hex}"
        dns_pw = f"dns-{uuid.uuid4().hex}"
        tls_pw = f"tls/pw@{uuid.uuid4().hex[:8]}"
        closed_port = _closed_port()
        secrets = [broker_pw, mgmt_pw, wrong_pw, redis_pw, dns_pw, tls_pw]
        runs = [
            # broker unreachable, management API unreachable, its credentials in the URL; DEBUG logs
            (amqp.url.replace(":5672/", f":{closed_port}/"), "--log-level", "DEBUG",
             "--rabbitmq-management-url", f"http://monitor:{mgmt_pw}@127.0.0.1:{_closed_port()}"),
            # wrong broker password; the real management API refuses the same wrong credentials; JSON logs
            (f"amqp://{amqp.user}:{quote(wrong_pw, safe='')}@127.0.0.1:5672/{amqp.vhost}", "--log-format",
             "json", "--rabbitmq-management-url", "http://127.0.0.1:15672"),
            # a Redis ACL user that does not exist
            (f"redis://nosuchuser:{redis_pw}@{REDIS_HOST}:{REDIS_PORT}/{make_redis_broker().db}",),
            # a broker host that does not resolve
            (f"amqp://{amqp.user}:{dns_pw}@no-such-broker.invalid:5672/{amqp.vhost}",
             "--rabbitmq-management-url", f"http://monitor:{mgmt_pw}@no-such-broker.invalid:15672"),
            # amqps:// and https:// with credentials to listeners that speak neither TLS (handshakes fail)
            (f"amqps://{amqp.user}:{quote(tls_pw, safe='')}@127.0.0.1:5672/{amqp.vhost}", "--log-level", "DEBUG",
             "--broker-ssl-option", "cert_reqs=CERT_REQUIRED",
             "--rabbitmq-management-url", f"https://monitor:{quote(mgmt_pw, safe='')}@127.0.0.1:15672"),
        ]
        exporters = [make_exporter(url, *extra, wait=False) for url, *extra in runs]

        def failed(exporter) -> bool:
            status, reason = exporter.get("/readyz")
            m = exporter.scrape()
            pollers_down = all(v == 0 for labels, v in m.find("celery_exporter_source_up")
                               if labels["source"] in ("rabbitmq", "redis"))
            return exporter.alive() and status == 503 and "starting" not in reason and pollers_down

        for exporter in exporters:
            wait_for(lambda: failed(exporter), 30, message="the failures happened")
        time.sleep(2.5)  # a few retries more, each a chance to echo a URL
        for exporter in exporters:
            pages = {path: exporter.get(path)[1] for path in ("/", "/metrics", "/readyz", "/healthz")}
            pages["log"] = exporter.log()
            assert "events: down: " in pages["log"]  # the failure was logged: the grep below reads real errors
            for where, text in pages.items():
                for secret in secrets:
                    for form in {secret, quote(secret, safe=""), quote(secret)}:
                        assert form not in text, f"{form!r} leaked into {where} of {exporter.proc.args[4]}"
            assert "***" in pages["/"] or "@" not in exporter.proc.args[4]  # the page shows the URL masked
        # the failures were real, with reasons that say what happened
        reasons = [exporter.get("/readyz")[1] for exporter in exporters]
        assert "Connection refused" in reasons[0] or "ECONNREFUSED" in reasons[0], reasons[0]
        assert "ACCESS_REFUSED" in reasons[1] or "Login was refused" in reasons[1], reasons[1]
        assert "WRONGPASS" in reasons[2] or "invalid username-password" in reasons[2], reasons[2]
        assert "Name or service not known" in reasons[3] or "resolution" in reasons[3], reasons[3]
        assert "SSL" in reasons[4] or "EOF" in reasons[4], reasons[4]
        index = exporters[1].get("/")[1]
        if "rabbitmq" in index:  # the management-API source runs: its failure is on the page, reasons clean
            assert "401" in index or "login failed" in index, index
    finally:
        threads = [threading.Thread(target=e.stop) for e in locals().get("exporters", [])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        amqp.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
