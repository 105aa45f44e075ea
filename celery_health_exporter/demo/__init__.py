"""`celery-health-exporter demo`: a local broker, two prefork workers, traffic with
failures and retries, and the exporter on :9808, all stopped by Ctrl-C."""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
               "--appendonly", "no"]


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=2):
            return True
    except OSError:
        return False


def ensure_broker(url: str) -> None:
    """Start a local Redis when the demo's broker is the local Redis and nothing listens."""
    if _reachable(url):
        return
    parts = urlsplit(url)
    if parts.scheme == "redis" and parts.hostname in ("127.0.0.1", "localhost") and shutil.which("redis-server"):
        print("demo: starting a local redis-server", flush=True)
        subprocess.run(REDIS_START, check=False, stdout=subprocess.DEVNULL)
        for _ in range(50):
            if _reachable(url):
                return
            time.sleep(0.1)
    raise SystemExit(f"demo: error: broker {url} is not reachable (start Redis or pass --broker-url)")


def traffic(broker_url: str, rate: float = 5.0, stop_after: float | None = None) -> None:
    """Publish a steady mix of tasks until interrupted."""
    os.environ["CELERY_BROKER_URL"] = broker_url
    from .app import app

    kinds = [("demo.send_email", lambda: (f"user{random.randint(1, 999)}@example.com",), 5),
             ("demo.charge_card", lambda: (random.randint(5, 500),), 3),
             ("demo.fetch_feed", lambda: (f"https://feeds.example.com/{random.randint(1, 50)}",), 2),
             ("demo.render_report", lambda: (random.randint(1, 20),), 1),
             ("demo.legacy_sync", lambda: (), 1)]
    names = [k for k in kinds for _ in range(k[2])]
    deadline = None if stop_after is None else time.monotonic() + stop_after
    with app.connection_for_write() as conn:
        while deadline is None or time.monotonic() < deadline:
            name, args, _ = random.choice(names)
            app.send_task(name, args(), connection=conn)
            time.sleep(1.0 / rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celery-health-exporter demo", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=["all", "traffic"], default="all",
                        help="all (default): broker, workers, traffic and exporter; traffic: only the generator")
    parser.add_argument("--broker-url", default=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--listen-address", default="0.0.0.0:9808")
    parser.add_argument("--rate", type=float, default=5.0, help="tasks published per second")
    args = parser.parse_args(argv)

    ensure_broker(args.broker_url)
    if args.mode == "traffic":
        try:
            traffic(args.broker_url, args.rate)
        except KeyboardInterrupt:
            pass
        return 0

    env = {**os.environ, "CELERY_BROKER_URL": args.broker_url}
    worker = [sys.executable, "-m", "celery", "-A", "celery_health_exporter.demo.app", "worker", "-P", "prefork", "-c", "2",
              "-E", "--without-mingle", "-l", "warning"]
    children = [
        subprocess.Popen(worker + ["-n", "demo1@%h", "-Q", "celery"], env=env, start_new_session=True),
        subprocess.Popen(worker + ["-n", "demo2@%h", "-Q", "celery,reports", "--max-tasks-per-child", "3"],
                         env=env, start_new_session=True),
        subprocess.Popen([sys.executable, "-m", "celery_health_exporter", "--broker-url", args.broker_url,
                          "--listen-address", args.listen_address], env=env),
        subprocess.Popen([sys.executable, "-m", "celery_health_exporter.demo", "traffic", "--broker-url", args.broker_url,
                          "--rate", str(args.rate)], env=env, start_new_session=True),
    ]
    port = args.listen_address.rpartition(":")[2]
    print(f"demo: workers demo1 and demo2, traffic at {args.rate:g} tasks/s; metrics on "
          f"http://localhost:{port}/metrics, status on http://localhost:{port}/ (Ctrl-C stops everything)",
          flush=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    print(f"demo: {' '.join(child.args[:6])} exited with {child.returncode}; stopping",
                          file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
    return 0
