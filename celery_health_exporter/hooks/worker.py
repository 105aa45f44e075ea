"""Worker-side hook: what only the worker itself can know about its pool children.

Usage, in the module that defines your Celery app (the one ``celery -A`` imports)::

    from celery_health_exporter.hooks.worker import install
    install(app)  # celery-health-exporter worker hook

(Importing the module alone turns it on too, a convenience kept for existing setups.)

It records, in the worker main process, every pool child that exits with its
reason (``memory``/``tasks`` recycling, ``error`` exit code, killed by a
``signal``), how many tasks it ran and its peak RSS, the child limits in
effect (including ones given on the command line, which ``inspect conf``
never shows), and the size of the revoked set. The exporter reads it with one
cheap custom inspect command, ``celery_health``, instead of ``inspect revoked``
(which ships the whole revoked list).

When the main process stops on an unrecoverable error (Celery logs "Unrecoverable
error: ..." and exits, with code 0 on Celery <= 5.2), the hook sends one
``exporter-worker-unrecoverable`` event first: the exception class, the class that
could not be unpickled when that was the cause, and the exit code to expect.

Guarantees: the task hot path gets one integer increment in the child; every
failure inside the hook is swallowed and counted (``hook_errors``); it works
with or without the exporter running, and does nothing in non-prefork pools
beyond answering the command. It imports nothing but Celery and the standard
library (pool children are found in /proc, Linux only).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque

from .protocol import WORKER_HOOK_COMMAND as HOOK_COMMAND
from .protocol import WORKER_HOOK_CONF_KEY as HOOK_CONF_KEY
from .protocol import WORKER_UNRECOVERABLE_EVENT

CHILD_TASK_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 500, 1000)
EX_RECYCLE = 155  # billiard: a child that reached max_tasks_per_child or max_memory_per_child
REPORT_WAIT = 2.0  # seconds to wait for a vanished child's own report before blaming a signal
WATCH_INTERVAL = 0.5
# Celery's WorkController.start logs this at CRITICAL, with the exception, then stops the worker.
UNRECOVERABLE_LOGGER = "celery.worker"  # celery.utils.log.worker_logger
UNRECOVERABLE_MESSAGE = "Unrecoverable error"
REPORT_CONNECT_TIMEOUT = 3.0
# "UnpicklableError.__init__() missing 1 required positional argument": unpickling an exception
# whose __init__ does not take its args back (the classic unrecoverable error).
_UNPICKLE_FAILURE = re.compile(r"^(\w+)\.__init__\(\) (?:missing|takes|got)")


class _Hook:
    def __init__(self):
        self.errors = 0
        self.lock = threading.Lock()
        self.main_pid: int | None = None
        self.worker = None  # the WorkController, in the main process
        self.max_tasks_per_child = 0
        self.max_memory_per_child_kib = 0
        self.replacements = {"memory": 0, "tasks": 0, "signal": 0, "error": 0}
        self.child_task_counts = [0] * (len(CHILD_TASK_BUCKETS) + 1)
        self.child_task_sum = 0
        self.recent_peak_rss = deque(maxlen=5)
        self.reports: dict[int, dict] = {}
        self.read_fd: int | None = None
        self.write_fd: int | None = None
        self.children: set[int] = set()
        self.vanished: dict[int, float] = {}
        # in a pool child
        self.tasks_run = 0

    # ---------------------------------------------------------- main process
    def on_worker_init(self, worker) -> None:
        self.main_pid = os.getpid()
        self.worker = worker
        logging.getLogger(UNRECOVERABLE_LOGGER).addHandler(_UnrecoverableErrorReporter())
        self.max_tasks_per_child = int(getattr(worker, "max_tasks_per_child", 0) or 0)
        self.max_memory_per_child_kib = int(getattr(worker, "max_memory_per_child", 0) or 0)
        # Tell the exporter (through `inspect conf`) that this worker answers HOOK_COMMAND.
        worker.app.conf[HOOK_CONF_KEY] = 1
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # a child must never block on a full pipe
        threading.Thread(target=self._guard(self._read_reports), name="celery-health-reports", daemon=True).start()
        threading.Thread(target=self._guard(self._watch_children), name="celery-health-children",
                         daemon=True).start()

    def _guard(self, loop):
        def run():
            while True:
                try:
                    loop()
                    return
                except Exception:
                    self.errors += 1
                    time.sleep(1)
        return run

    def _read_reports(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    report = json.loads(line)
                    with self.lock:
                        self.reports[int(report["pid"])] = report
                except (ValueError, KeyError, TypeError):
                    self.errors += 1

    def _watch_children(self) -> None:
        me = os.getpid()
        while True:
            try:
                current = child_pids(me)
            except OSError:
                current = self.children
            now = time.monotonic()
            with self.lock:
                for pid in self.children - current:
                    self.vanished.setdefault(pid, now)
                self.children = current
                for pid, since in list(self.vanished.items()):
                    report = self.reports.pop(pid, None)
                    if report is not None:
                        self._account(report)
                        del self.vanished[pid]
                    elif now - since > REPORT_WAIT:
                        self.replacements["signal"] += 1  # SIGKILL, OOM killer, segfault: no report
                        del self.vanished[pid]
                # reports of children we never saw as children (very short-lived ones)
                for pid in [p for p in self.reports if p not in current and p not in self.vanished]:
                    self._account(self.reports.pop(pid))
            time.sleep(WATCH_INTERVAL)

    def _account(self, report: dict) -> None:
        reason = report.get("reason")
        if reason not in self.replacements:
            return  # a normal exit at shutdown is not a replacement
        self.replacements[reason] += 1
        tasks = int(report.get("tasks", 0))
        index = next((i for i, bound in enumerate(CHILD_TASK_BUCKETS) if tasks <= bound), len(CHILD_TASK_BUCKETS))
        self.child_task_counts[index] += 1
        self.child_task_sum += tasks
        if report.get("peak_rss_kib"):
            self.recent_peak_rss.append(int(report["peak_rss_kib"]) * 1024)

    def report_unrecoverable(self, exc: BaseException) -> None:
        """Tell the exporter, over the event exchange, that this worker is about to stop
        on ``exc``: after it, the worker can answer nothing. Celery <= 5.2 then exits 0."""
        import celery

        worker = self.worker
        app = worker.app
        match = _UNPICKLE_FAILURE.match(str(exc)) if isinstance(exc, TypeError) else None
        fields = {"exception": type(exc).__name__, "unpicklable": match.group(1) if match else None,
                  "exit_code": 0 if celery.VERSION < (5, 3) else 1, "hook_errors": self.errors}
        with app.connection_for_write(connect_timeout=REPORT_CONNECT_TIMEOUT) as connection:
            dispatcher = app.events.Dispatcher(connection, hostname=worker.hostname, enabled=True)
            dispatcher.send(WORKER_UNRECOVERABLE_EVENT, **fields)

    def snapshot(self) -> dict:
        from celery.worker import state as worker_state

        with self.lock:
            reply = {
                "version": 1,
                "pid": os.getpid(),
                "replacements": dict(self.replacements),
                "child_tasks": {"buckets": list(CHILD_TASK_BUCKETS), "counts": list(self.child_task_counts),
                                "sum": self.child_task_sum},
                "child_peak_rss_bytes": max(self.recent_peak_rss) if self.recent_peak_rss else None,
                "max_tasks_per_child": self.max_tasks_per_child,
                "max_memory_per_child_bytes": self.max_memory_per_child_kib * 1024,
                "hook_errors": self.errors,
            }
        revoked = worker_state.revoked
        reply["revoked"] = len(revoked)
        reply["revoked_limit"] = getattr(revoked, "maxlen", None)
        return reply

    # ------------------------------------------------------------ pool child
    def on_child_init(self) -> None:
        self.tasks_run = 0
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    def on_child_exit(self, pid: int, exitcode) -> None:
        import resource

        if self.write_fd is None:
            return
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if exitcode == EX_RECYCLE:
            over_memory = self.max_memory_per_child_kib and peak_kib > self.max_memory_per_child_kib
            reached_tasks = self.max_tasks_per_child and self.tasks_run >= self.max_tasks_per_child
            reason = "memory" if over_memory and not reached_tasks else "tasks"
        elif exitcode in (0, None):
            reason = "exit"
        else:
            reason = "error"
        line = json.dumps({"pid": pid or os.getpid(), "reason": reason, "exitcode": exitcode,
                           "tasks": self.tasks_run, "peak_rss_kib": peak_kib}).encode() + b"\n"
        os.write(self.write_fd, line)  # < PIPE_BUF: atomic, never interleaved


def child_pids(parent: int) -> set[int]:
    """The direct children of ``parent``, from /proc. Each thread has its own
    ``children`` file (billiard forks replacements from a pool thread); kernels
    built without CONFIG_PROC_CHILDREN have none, and then every process's stat
    is read for its parent pid."""
    tasks = f"/proc/{parent}/task"
    children: set[int] = set()
    try:
        for tid in os.listdir(tasks):
            with open(f"{tasks}/{tid}/children") as fh:
                children.update(int(pid) for pid in fh.read().split())
        return children
    except FileNotFoundError:
        pass
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # exited meanwhile
            continue
        # the command name may hold spaces and parentheses: the fields follow the last ')'
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == parent:
            children.add(int(entry.name))
    return children


class _UnrecoverableErrorReporter(logging.Handler):
    def __init__(self):
        super().__init__(logging.CRITICAL)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.exc_info and str(record.msg).startswith(UNRECOVERABLE_MESSAGE):
                _hook.report_unrecoverable(record.exc_info[1])
        except Exception:  # the worker is stopping anyway: never in its way
            _hook.errors += 1


_hook = _Hook()


def _swallowing(function):
    """A signal handler or command that can never raise into Celery."""
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception:
            _hook.errors += 1
            return None
    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    return wrapper


def _count_task(**_kwargs):
    _hook.tasks_run += 1


def _register() -> None:
    from celery import signals
    from celery.worker.control import inspect_command

    @inspect_command(name=HOOK_COMMAND)
    def celery_health(state, **kwargs):
        """Child recycling, limits and revoked-set size for celery-health-exporter (cheap)."""
        try:
            return _hook.snapshot()
        except Exception as exc:
            _hook.errors += 1
            return {"error": type(exc).__name__}

    signals.worker_init.connect(_swallowing(lambda sender=None, **kw: _hook.on_worker_init(sender)), weak=False)
    signals.worker_process_init.connect(_swallowing(lambda **kw: _hook.on_child_init()), weak=False)
    signals.worker_process_shutdown.connect(
        _swallowing(lambda pid=None, exitcode=None, **kw: _hook.on_child_exit(pid, exitcode)), weak=False)
    signals.task_postrun.connect(_count_task, weak=False)


_registered = False


def install(app=None) -> None:
    """Turn the worker hook on in the worker that runs ``app``: call it in the module
    ``celery -A`` imports. Idempotent; never raises (an incompatible Celery must
    not stop the user's app from importing: the failure is counted instead)."""
    global _registered
    try:
        if not _registered:
            _register()
            _registered = True
        if app is not None:
            app.conf[HOOK_CONF_KEY] = 1
    except Exception:
        _hook.errors += 1


install()
