"""Host agent: Celery worker processes on this host, from the process table (psutil).

Runs where the workers run (same host, or a sidecar sharing the pod's process
namespace). Every ``--host-scan-interval`` seconds it walks the process table,
reads only the command line of each process, and for the few that are Celery
workers their parent, process group, create time, RSS and CPU time. Processes
that vanish mid-scan, zombies and processes it may not read are skipped; the
scan never fails because of one process. What the processes are (main, pool
child, orphan) is decided by the pure model in ``celery_health_exporter/state/hosts.py``.

Essential (``/readyz`` depends on it) only in host-only mode (``--no-events``).
"""
from __future__ import annotations

import os
import re
import socket
import time

import psutil

from ..logs import describe_error
from ..state.hosts import ProcessSample, parse_worker_command
from .base import Source

_EXPORTER_FLAG = "--host-worker-pattern"


class _LiveLeaders:
    """``pid in leaders``: the pid exists and is not a zombie. A zombie main
    (killed, not yet reaped by its parent) leads no living worker."""

    def __init__(self, pids: set):
        self.pids = pids
        self._checked: dict[int, bool] = {}

    def __contains__(self, pid) -> bool:
        if pid not in self.pids:
            return False
        alive = self._checked.get(pid)
        if alive is None:
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            self._checked[pid] = alive
        return alive


class HostSource(Source):
    name = "host"

    def __init__(self, config, state, celery_app=None):  # reads no broker
        super().__init__()
        self.config = config
        self.state = state
        self.essential = not config.events  # host-only mode: ready when the scan works
        self.interval = config.host_scan_interval
        self.pattern = re.compile(config.host_worker_pattern) if config.host_worker_pattern else None
        self.host = socket.gethostname()

    def describe(self) -> str:
        what = f"pattern {self.pattern.pattern!r}" if self.pattern else "celery ... worker"
        return f"process scan every {self.interval:g}s ({what})"

    def run(self) -> None:
        while not self.stopping:
            started = time.monotonic()
            try:
                with self.bugs_contained("scanning the process table"):
                    self.scan_once()
            except Exception as exc:  # psutil itself failing (e.g. /proc not mounted) is an outage
                self.mark_down(describe_error(exc))
            self.health.last_poll_seconds = time.monotonic() - started
            self.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    def scan_once(self):
        started = time.perf_counter()
        samples, pids = self.scan()
        duration = time.perf_counter() - started
        now = time.time()
        with self.state.lock:
            scan = self.state.hosts.apply_scan(samples, _LiveLeaders(pids), now, duration=duration,
                                               scanned=len(pids))
        self.mark_up(now)
        return scan

    def scan(self) -> tuple[list[ProcessSample], set]:
        """One pass over the process table: (worker process samples, every pid seen)."""
        samples: list[ProcessSample] = []
        pids: set[int] = set()
        pattern, host, own_pid = self.pattern, self.host, os.getpid()
        for proc in psutil.process_iter():
            pid = proc.pid
            pids.add(pid)
            try:
                argv = proc.cmdline()
            except psutil.Error:  # AccessDenied, NoSuchProcess, ZombieProcess: not ours to read, or gone
                continue
            if not argv or pid == own_pid:
                continue  # kernel threads, zombies, ourselves
            if pattern is not None and any(token.startswith(_EXPORTER_FLAG) for token in argv):
                continue  # an exporter: its own --host-worker-pattern matches its command line
            command = parse_worker_command(argv, pattern=pattern, host=host)
            if command is None:
                continue
            try:
                with proc.oneshot():
                    ppid = proc.ppid()
                    create_time = proc.create_time()
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                pgid = os.getpgid(pid)
            except (psutil.Error, ProcessLookupError):
                continue
            samples.append(ProcessSample(pid, ppid, pgid, create_time, command, rss, cpu.user + cpu.system))
        return samples, pids
