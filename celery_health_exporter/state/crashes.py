"""Workers that die on an unrecoverable error: what the worker hook reports, and the
signature the events leave when no hook runs.

When the worker's main process hits an unrecoverable error (the classic: a task
retried or rejected with an exception that cannot be unpickled; the main process
fails to unpickle the child's result) it logs "Unrecoverable error: ..." and stops:
with exit code 0 on Celery <= 5.2 (so a supervisor sees a clean exit and restarts it
for ever), 1 since 5.3. The task it was running fails with
``WorkerLostError('Worker exited prematurely: exitcode 0 ...')`` and the worker goes
offline, in either order.

- With the worker hook, the main process reports the error itself (an
  ``exporter-worker-unrecoverable`` event: exception type, the class that could not
  be unpickled, the exit code it will have): counted at once, exact.
- Without it, a task lost with exit code 0 and its worker going down within
  ``WINDOW`` seconds of each other is counted with ``exception="unknown"``: a lower
  bound (a crash that took no running task with it leaves no signature).

Each crash is counted once in ``errors`` ((hostname, exception) -> count); the task
that died with it is counted in the cluster's ``unpicklable`` counter when the hook
named an unpicklable class. Pure Python, no I/O; guarded by ``ClusterState.lock``.
"""
from __future__ import annotations

import re

from ..hooks.protocol import WORKER_UNRECOVERABLE_EVENT
from .events import clean_label, text

WINDOW = 60.0  # seconds within which the pieces of one crash arrive
UNKNOWN = "unknown"
# The pool's children exit 0 when the main process stops them: the task's child did not crash.
_LOST_ON_MAIN_EXIT = re.compile(
    r"\s*(?:[\w.]+\.)?WorkerLostError(?:\(\s*['\"]|:\s*)Worker exited prematurely: exitcode 0\b")


def lost_on_main_exit(exception_repr) -> bool:
    """The task-failed exception (``WorkerLostError('Worker exited prematurely: exitcode 0
    ...')``, or ``billiard.exceptions.WorkerLostError: ...`` unwrapped from billiard's
    wrapper) of a task whose worker's main process went away."""
    return isinstance(exception_repr, str) and _LOST_ON_MAIN_EXIT.match(exception_repr) is not None


class Crash:
    """The pieces of one crash of one worker, as they arrive."""

    __slots__ = ("started", "exception", "unpicklable", "exit_code", "task", "worker_down", "counted",
                 "task_counted")

    def __init__(self, now: float):
        self.started = now
        self.exception: str | None = None  # from the hook
        self.unpicklable: str | None = None  # the class the main process could not unpickle (hook)
        self.exit_code: int | None = None  # what the hook expects the process to exit with
        self.task: str | None = None  # the task name that failed with it (events)
        self.worker_down = False
        self.counted = False
        self.task_counted = False


class CrashState:
    def __init__(self, cluster):
        self.cluster = cluster
        self.errors: dict[tuple[str, str], int] = {}
        self.last: dict[str, tuple[float, str, int | None, str | None]] = {}  # hostname -> (at, exc, exit, task)
        self._open: dict[str, Crash] = {}
        cluster.register_handler(WORKER_UNRECOVERABLE_EVENT, self.on_hook_report)

    def _crash(self, hostname: str, now: float, filled: str) -> Crash:
        """The open crash of ``hostname``, or a new one when that piece is already there
        (a second crash of a restart loop) or the window has passed."""
        crash = self._open.get(hostname)
        if crash is None or now - crash.started > WINDOW or getattr(crash, filled):
            crash = self._open[hostname] = Crash(now)
        return crash

    # ------------------------------------------------------------------ input
    def on_hook_report(self, event: dict, now: float, ts: float) -> None:
        worker = self.cluster._worker(event, now)  # raises MalformedEvent without a hostname
        crash = self._crash(worker.hostname, now, "exception")
        crash.exception = self.cluster.cardinality.exception.fold(clean_label(text(event, "exception") or UNKNOWN))
        unpicklable = text(event, "unpicklable")
        crash.unpicklable = self.cluster.cardinality.exception.fold(clean_label(unpicklable)) if unpicklable else None
        exit_code = event.get("exit_code")
        crash.exit_code = exit_code if isinstance(exit_code, int) and 0 <= exit_code <= 255 else None
        self._settle(worker.hostname, crash, now)

    def task_lost(self, hostname: str, name: str, worker_up: bool, now: float) -> None:
        """A task failed with WorkerLostError exit code 0 on ``hostname``."""
        crash = self._crash(hostname, now, "task")
        crash.task = name
        crash.worker_down = crash.worker_down or not worker_up
        self._settle(hostname, crash, now)

    def worker_down(self, hostname: str, now: float) -> None:
        crash = self._open.get(hostname)
        if crash is not None and now - crash.started <= WINDOW:
            crash.worker_down = True
            self._settle(hostname, crash, now)

    def expire(self, now: float) -> None:
        for hostname in [h for h, c in self._open.items() if now - c.started > WINDOW]:
            del self._open[hostname]

    # -------------------------------------------------------------- counting
    def _settle(self, hostname: str, crash: Crash, now: float) -> None:
        by_hook = crash.exception is not None
        if not crash.counted and (by_hook or (crash.task is not None and crash.worker_down)):
            crash.counted = True
            key = (hostname, crash.exception or UNKNOWN)
            self.errors[key] = self.errors.get(key, 0) + 1
        if crash.counted:
            self.last[hostname] = (now, crash.exception or UNKNOWN, crash.exit_code, crash.task)
        if crash.unpicklable and crash.task and not crash.task_counted:
            crash.task_counted = True
            key = (crash.task, crash.unpicklable)
            self.cluster.unpicklable[key] = self.cluster.unpicklable.get(key, 0) + 1

    def forget(self, hostname: str) -> None:
        """The worker was purged: its series go (the counter restarts if it comes back)."""
        self._open.pop(hostname, None)
        self.last.pop(hostname, None)
        for key in [k for k in self.errors if k[0] == hostname]:
            del self.errors[key]
