"""The README's first command: the demo fills /metrics with real numbers and Ctrl-C stops all of it."""
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from tests.harness import HOST, ROOT, Metrics, free_port, http_get, wait_for

pytestmark = pytest.mark.integration


def test_demo_fills_metrics_and_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    log = open(tmp_path / "demo.log", "wb")
    demo = subprocess.Popen(
        [sys.executable, "-m", "celery_health_exporter", "demo", "--broker-url", "redis://127.0.0.1:6379/15",
         "--listen-address", f"127.0.0.1:{port}", "--rate", "20"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def busy():
            status, body = http_get(f"http://127.0.0.1:{port}/metrics")
            m = Metrics(body) if status == 200 else None
            # The first failure may be fetch_feed's ConnectionError (retries exhausted), so wait for the
            # specific PaymentDeclined rather than asserting it right after any failure was seen.
            return m and (m.sum("celery_task_succeeded_total") >= 10
                          and m.sum("celery_task_failed_total", exception="PaymentDeclined") >= 1
                          and m.sum("celery_task_retried_total") >= 1
                          and m.sum("celery_task_sent_total", name="demo.legacy_sync", queue_name="legacy") >= 1
                          # a worker whose task events came before its first heartbeat is known, not up yet
                          and m.value("celery_worker_up", hostname=f"demo1@{HOST}") == 1
                          and m.value("celery_worker_up", hostname=f"demo2@{HOST}") == 1) and m
        wait_for(busy, 60, 1.0, message="demo traffic counted and both demo workers up")
        descendants = psutil.Process(demo.pid).children(recursive=True)
        assert len(descendants) >= 4
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            code = demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    assert code == 0
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in descendants), 20,
             message="every demo process gone")


def test_demo_without_broker_url_uses_the_local_redis_and_says_so(tmp_path):
    """The README command as is on a machine where Redis runs: the local Redis, database 14."""
    port = free_port()
    log_path = tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    with open(log_path, "wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "celery_health_exporter", "demo", "--listen-address", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 30, 0.5, message="exporter ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text(errors='replace')[-4000:]}") from None
        descendants = psutil.Process(demo.pid).children(recursive=True)
        programs = {}
        for p in descendants:
            try:
                programs[p.pid] = p.name()
            except psutil.Error:  # a pool process recycled meanwhile (--max-tasks-per-child)
                pass
    finally:
        demo.send_signal(signal.SIGTERM)
        try:
            code = demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    output = log_path.read_text(errors="replace")
    assert code == 0, output
    first = output.splitlines()[0]
    assert first.startswith("demo: broker: the local Redis on 127.0.0.1:6379, database 14"), output
    assert "embedded" not in output
    assert "redis-server" not in programs.values(), programs
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in descendants), 20,
             message="every demo process gone")


def test_demo_whose_port_is_taken_stops_everything_with_exit_2(tmp_path):
    """The exporter cannot listen: its one line, the demo's one line, exit 2, nothing left running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = subprocess.Popen(
            [sys.executable, "-m", "celery_health_exporter", "demo", "--broker-url", "redis://127.0.0.1:6379/15",
             "--listen-address", f"127.0.0.1:{port}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        seen: dict[int, psutil.Process] = {}

        def exited():
            try:
                seen.update((p.pid, p) for p in psutil.Process(demo.pid).children(recursive=True))
            except psutil.Error:
                pass
            return demo.poll() is not None

        try:
            wait_for(exited, 30, 0.05, message="the demo to give up")
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
        out, err = demo.communicate(10)
    assert demo.returncode == 2, (out, err)
    assert f"--listen-address: cannot listen on 127.0.0.1:{port}" in err, err
    assert "demo: the exporter exited with code 2; stopping everything" in err, err
    assert "Traceback" not in err
    assert len(seen) >= 3, seen  # the workers and the traffic generator had been started
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in seen.values()), 20,
             message="every demo process gone")
