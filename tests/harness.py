"""Real processes for integration tests: brokers, the exporter, Celery workers, a TCP proxy.

Nothing here fakes a broker: every test talks to the RabbitMQ and Redis of this
machine, isolated by a vhost or a Redis database of its own.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
RABBITMQ_API = os.environ.get("TEST_RABBITMQ_API", "http://127.0.0.1:15672")
RABBITMQ_ADMIN = ("guest", "guest")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2, message: str = "condition"):
    """Poll until predicate() returns something truthy; return it, or fail with the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # the thing polled may not be up yet
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")


# ----------------------------------------------------------------- brokers

def rabbitmq_api(method: str, path: str, body=None, auth=RABBITMQ_ADMIN, timeout=10):
    request = urllib.request.Request(RABBITMQ_API + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
    request.add_header("content-type", "application/json")
    request.add_header("authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = response.read()
        return json.loads(data) if data else None


@dataclass
class Broker:
    kind: str  # amqp | redis
    url: str
    password: str | None = None
    cleanup: list = field(default_factory=list)

    def close(self):
        for step in self.cleanup:
            try:
                step()
            except Exception:
                pass


def make_amqp_broker() -> Broker:
    """A vhost and a user of its own, with a password that must never leak."""
    vhost = f"test-{uuid.uuid4().hex[:10]}"
    user, password = f"u-{vhost}", f"pw-{uuid.uuid4().hex}"
    rabbitmq_api("PUT", f"/api/vhosts/{vhost}")
    rabbitmq_api("PUT", f"/api/users/{user}", {"password": password, "tags": "monitoring"})
    rabbitmq_api("PUT", f"/api/permissions/{vhost}/{user}", {"configure": ".*", "write": ".*", "read": ".*"})
    rabbitmq_api("PUT", f"/api/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    broker = Broker("amqp", f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}", password)
    broker.vhost, broker.user = vhost, user
    broker.cleanup += [lambda: rabbitmq_api("DELETE", f"/api/vhosts/{vhost}"),
                       lambda: rabbitmq_api("DELETE", f"/api/users/{user}")]
    return broker


# Databases 1-13 rotate between the tests of a pytest process (each flushed before use);
# 14 is the demo's default and 15 the demo test's. A lease in db 0 keeps a database
# away from another pytest process on this machine (a second run, a helper's run)
# while this one may still use it; the lease outlives a crash by at most LEASE_SECONDS.
_redis_dbs = itertools.cycle(range(1, 14))
LEASE_SECONDS = 900


def _lease_key(db: int) -> str:
    return f"celery-health-exporter:test-db-lease:{db}"


def _lease_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(owner: str) -> bool:
    """A lease of a process of this host that has exited (a killed pytest run)."""
    host, _, pid = owner.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not os.path.exists(f"/proc/{pid}")


def _lease_redis_db(client) -> int:
    me = _lease_owner()
    deadline = time.monotonic() + 120
    while True:
        for _ in range(13):
            db = next(_redis_dbs)
            key = _lease_key(db)
            if client.set(key, me, nx=True, ex=LEASE_SECONDS):
                return db
            owner = (client.get(key) or b"").decode()
            if owner == me or (_dead_here(owner) and _take_over(client, key, owner, me)):
                client.expire(key, LEASE_SECONDS)
                return db
        if time.monotonic() > deadline:
            raise RuntimeError("every Redis test database (1-13) is leased by other pytest processes")
        time.sleep(1)


def _take_over(client, key: str, owner: str, me: str) -> bool:
    """Atomically: the lease becomes ours only if it still is the dead owner's."""
    script = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2]) end"
    return client.eval(script, 1, key, owner, me) is not None


def _release(client, key: str) -> None:
    me = _lease_owner()
    client.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end",
                1, key, me)


def make_redis_broker() -> Broker:
    import redis

    leases = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    db = _lease_redis_db(leases)
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()
    broker = Broker("redis", f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}")
    broker.db = db
    broker.cleanup.append(lambda: _release(leases, _lease_key(db)))
    return broker


def make_broker(kind: str) -> Broker:
    return make_amqp_broker() if kind == "amqp" else make_redis_broker()


# ----------------------------------------------------------------- metrics

class Metrics:
    """A parsed scrape: look samples up by name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.samples = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def find(self, metric: str, /, **labels) -> list[tuple[dict, float]]:
        return [(l, v) for n, l, v in self.samples
                if n == metric and all(l.get(k) == str(val) for k, val in labels.items())]

    def value(self, metric: str, /, **labels) -> float | None:
        """The value of the one sample that matches, None when there is none."""
        found = self.find(metric, **labels)
        assert len(found) <= 1, f"{metric}{labels} matches {len(found)} samples: {found}"
        return found[0][1] if found else None

    def sum(self, metric: str, /, **labels) -> float:
        return sum(v for _, v in self.find(metric, **labels))


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --------------------------------------------------------------- processes

class ExporterProcess:
    def __init__(self, broker_url: str, *extra: str, log_path: Path, env: dict | None = None,
                 command: tuple[str, ...] = (sys.executable, "-m", "celery_health_exporter"), cwd: Path = ROOT):
        """``command``/``cwd``: another installation (a fresh venv's console script, run
        outside the checkout so that the checkout cannot be imported instead)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [*command, "--broker-url", broker_url, "--listen-address", f"127.0.0.1:{self.port}", *extra],
            stdout=self.log_file, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 20.0):
        wait_for(lambda: self.alive() and self.get("/readyz")[0] == 200, timeout, message="exporter ready")
        return self

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exporter exited with {self.proc.returncode}:\n{self.log()}")
        return True

    def get(self, path: str, **kwargs) -> tuple[int, str]:
        return http_get(self.base + path, **kwargs)

    def scrape(self) -> Metrics:
        status, body = self.get("/metrics")
        assert status == 200, body
        return Metrics(body)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 5.0) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds it took)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.log_file.close()
                raise AssertionError(f"exporter did not stop within {timeout}s of SIGTERM")
        self.log_file.close()
        return self.proc.returncode, time.monotonic() - started


class WorkerProcess:
    """A real Celery worker (prefork pool) in its own process group.

    ``python`` runs it with another interpreter (a venv with another Celery, see
    tests/celery_versions.py); the default is the one running the tests. The app module
    is imported from the work tree (the worker's cwd) either way.
    """

    def __init__(self, broker_url: str, name: str, *, queues: str | None = None, concurrency: int = 2,
                 extra: tuple = (), log_path: Path, env: dict | None = None, app: str = "tests.apps.testapp",
                 task_events: bool = True, python: str | None = None):
        self.name = name
        self.hostname = f"{name}@{HOST}"
        self.python = python or sys.executable
        self.log_path = log_path
        self.log_file = open(log_path, "ab")
        args = [self.python, "-m", "celery", "-A", app, "worker", "-P", "prefork", "-c", str(concurrency),
                *(["-E"] if task_events else []), "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "-l", "info", *extra]
        if queues:
            args += ["-Q", queues]
        self.proc = subprocess.Popen(
            args, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "TEST_BROKER_URL": broker_url, "TEST_TASK_EVENTS": "1" if task_events else "0",
                 **(env or {})},
        )

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL the main process and its pool children (the whole process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.kill()
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind, if any
            except ProcessLookupError:
                pass
        self.log_file.close()


class EventRecorder:
    """Celery's own event receiver, beside the exporter: ground truth of what the workers sent.

    A thread captures every event of the broker's event exchange from ``start()`` (which
    returns once a worker heartbeat shows that it consumes) until ``stop()``.
    """

    def __init__(self, broker_url: str):
        from celery import Celery

        self.app = Celery("event-recorder", broker=broker_url, set_as_current=False)
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_event(self, event: dict) -> None:
        with self._lock:
            self.events.append(event)

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            try:
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception:  # the connection closed under a stopping receiver
                if not self._receiver.should_stop:
                    raise

    def start(self, timeout: float = 20.0) -> "EventRecorder":
        self._thread.start()
        wait_for(lambda: self.of("worker-heartbeat"), timeout, message="the event recorder receives heartbeats")
        return self

    def of(self, event_type: str, **fields) -> list[dict]:
        with self._lock:
            return [e for e in self.events
                    if e.get("type") == event_type and all(e.get(k) == v for k, v in fields.items())]

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)


class TcpProxy:
    """A TCP proxy the test can cut (every connection closed, new ones refused) and restore."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self):
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    close = cut

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
