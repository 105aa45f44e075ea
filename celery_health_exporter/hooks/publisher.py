"""Publisher hook: count task publishes, their retries and failures in the
process that sends tasks, and ship the totals to the exporter as a Celery event.

One line in the application that publishes (web app, API, beat, a worker)::

    from celery_health_exporter.hooks.publisher import install; install(app)

What it counts, per process (see ``docs/hooks.md``):

- every call of ``app.amqp.send_task_message`` (``apply_async``, ``send_task``,
  ``retry``, canvas), its duration, and the exception class of those that raised;
- retries: kombu calls the retry policy's ``errback(exc, interval)`` on each
  retry (``Connection.ensure``) and on each failed reconnect
  (``Connection._ensure_connection``); the hook puts its own errback in the
  policy, which chains the one the user set (per call or in
  ``task_publish_retry_policy``), so the user's errback still runs;
- publishes that went past their policy: with ``max_retries = N`` a correct
  kombu calls the errback at most N + 1 times for one publish to a dead broker
  (once for the failed publish, N times for the reconnects); a publish whose
  errback runs more often is counted once, while it is still retrying.

The totals are cumulative and go out every ``interval`` seconds in an
``exporter-publisher-stats`` event on the Celery event exchange, over a
connection of the hook's own, from a daemon thread that starts at the first
publish. When the broker is down the hook keeps counting and sends the totals
later. Nothing the hook does raises into the caller: its own failures are
swallowed and counted (``hook_errors``), and shipped too.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from bisect import bisect_left
from time import perf_counter

from ._events import EventLink
from .protocol import PUBLISHER_EVENT_FORMAT as FORMAT
from .protocol import PUBLISHER_EVENT_TYPE as EVENT_TYPE

__all__ = ["EVENT_TYPE", "DEFAULT_BUCKETS", "PublisherHook", "install", "instrument"]

DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_EXCEPTION_CLASSES = 32
ROUTING_KEY = EVENT_TYPE.replace("-", ".")
_ATTR = "_celery_health_exporter_publisher_hook"

log = logging.getLogger("celery_health_exporter.hooks.publisher")


class _Counters:
    """The counts of one thread (or greenlet). Only that thread writes them, so
    the hot path takes no lock; ``snapshot()`` sums them, and folds those of
    threads that have ended into the hook's base counters."""

    __slots__ = ("publishes", "retries", "exceeded", "failures", "counts", "sum",
                 "in_publish", "allowed", "over", "__weakref__")

    def __init__(self, buckets: int):
        self.publishes = self.retries = self.exceeded = 0
        self.failures: dict[str, int] = {}
        self.counts = [0] * buckets
        self.sum = 0.0
        self.in_publish = None  # errback calls of the publish running in this thread, None outside one
        self.allowed = None  # errback calls its retry policy allows (max_retries + 1), None = unbounded
        self.over = False

    def add_to(self, other: "_Counters") -> None:
        other.publishes += self.publishes
        other.retries += self.retries
        other.exceeded += self.exceeded
        for name, n in list(self.failures.items()):  # list(): a copy the owning thread cannot change under us
            other.failures[name] = other.failures.get(name, 0) + n
        other.counts = [a + b for a, b in zip(other.counts, self.counts)]
        other.sum += self.sum


class PublisherHook:
    """The counters of one process and the thread that ships them. Use ``install()``."""

    def __init__(self, app, *, interval: float = 15.0, publisher: str | None = None,
                 buckets: tuple = DEFAULT_BUCKETS, connect_timeout: float = 2.0, flush_at_exit: bool = True):
        self.app = app
        self.interval = float(interval) if interval and interval > 0 else 15.0
        self.publisher = publisher if isinstance(publisher, str) and publisher else socket.gethostname()
        self.bounds = tuple(float(b) for b in buckets)
        self.flush_at_exit = flush_at_exit
        self.connect_timeout = connect_timeout
        self._errbacks: dict = {}
        self._reset()
        self_ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _call(self_ref, "_reset"))
        if flush_at_exit:
            atexit.register(_call, self_ref, "_at_exit")

    def _reset(self) -> None:
        """Fresh counters, locks and identity: at start and in a forked child
        (gunicorn --preload forks after install(): the child is a new publisher
        process, not a copy of the parent's totals)."""
        self.instance = uuid.uuid4().hex
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._ship_lock = threading.Lock()
        self._local = threading.local()
        self._base = _Counters(len(self.bounds) + 1)  # of threads that ended
        self._threads: list[tuple] = []  # (weakref to a thread, its _Counters)
        self.hook_errors: dict[str, int] = {}
        self.shipped = 0  # events sent successfully
        # a new link in a forked child: the parent's socket is never closed from here
        self._link = EventLink(self.app, self.connect_timeout)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------- install
    def install(self) -> "PublisherHook":
        """Wrap the app's task sender, now if it exists, else when Celery creates it
        (it reads the configuration then: install() must not finalize it early)."""
        amqp = self.app.amqp
        current = amqp.__dict__.get("send_task_message")
        if current is not None:
            amqp.__dict__["send_task_message"] = self.wrap(current)
        else:
            create = amqp._create_task_sender
            amqp._create_task_sender = lambda: self.wrap(create())
        return self

    def wrap(self, send):
        hook = self
        bounds = self.bounds
        policy = self.app.conf.task_publish_retry_policy or {}
        default_errback = policy.get("errback")
        default_max = policy.get("max_retries")
        default_allowed = None if default_max is None else default_max + 1
        default_policy = {"errback": self._errback_for(default_errback)}  # merged by Celery into its default
        errbacks = self._errbacks

        def send_task_message(producer, name, message, *args, **kwargs):
            try:
                try:
                    counters = hook._local.counters
                except AttributeError:
                    counters = hook._counters_for_this_thread()
                retry_policy = kwargs.get("retry_policy")
                if len(args) >= 6:  # retry_policy given positionally: counted, not chained
                    counters.allowed = None
                elif retry_policy:
                    user_errback = retry_policy.get("errback", default_errback)
                    try:
                        errback = errbacks[user_errback]
                    except (KeyError, TypeError):  # first use, or an unhashable callable
                        errback = hook._errback_for(user_errback)
                    kwargs["retry_policy"] = {**retry_policy, "errback": errback}
                    max_retries = retry_policy.get("max_retries", default_max)
                    counters.allowed = None if max_retries is None else max_retries + 1
                else:
                    kwargs["retry_policy"] = default_policy
                    counters.allowed = default_allowed
                counters.in_publish = 0
                counters.over = False
                if hook._thread is None:
                    hook._start_thread()
                started = perf_counter()
            except Exception:
                hook._internal_error("wrap")
                return send(producer, name, message, *args, **kwargs)
            try:
                result = send(producer, name, message, *args, **kwargs)
            except BaseException as exc:
                hook._record_failure(counters, perf_counter() - started, exc)
                raise
            duration = perf_counter() - started
            try:
                counters.in_publish = None
                counters.counts[bisect_left(bounds, duration)] += 1
                counters.sum += duration
                counters.publishes += 1
            except Exception:
                hook._internal_error("record")
            return result

        send_task_message.__wrapped__ = send
        return send_task_message

    # ----------------------------------------------------------- counting
    def _counters_for_this_thread(self) -> _Counters:
        counters = _Counters(len(self.bounds) + 1)
        self._local.counters = counters
        with self._lock:
            self._threads.append((weakref.ref(threading.current_thread()), counters))
        return counters

    def _record_failure(self, counters: _Counters, duration: float, exc: BaseException) -> None:
        try:
            counters.in_publish = None
            counters.counts[bisect_left(self.bounds, duration)] += 1
            counters.sum += duration
            name = type(exc).__name__
            failures = counters.failures
            if name not in failures and len(failures) >= MAX_EXCEPTION_CLASSES:
                name = "other"
            failures[name] = failures.get(name, 0) + 1
            counters.publishes += 1
        except Exception:
            self._internal_error("record")

    def _errback_for(self, user_errback):
        """One errback per user errback, kept: kombu also stores it in the pooled
        connection's transport_options (``Producer.publish``), so it must not hold
        anything of a single publish."""
        hook_ref = weakref.ref(self)

        def errback(exc, interval):
            hook = hook_ref()
            if hook is not None:
                hook._on_retry()
            if user_errback is not None:
                return user_errback(exc, interval)  # the user's errback behaves as without the hook
            return None

        errback.__wrapped__ = user_errback
        try:
            if len(self._errbacks) < 64:
                self._errbacks[user_errback] = errback
        except TypeError:  # an unhashable callable: wrapped every time
            pass
        return errback

    def _on_retry(self) -> None:
        try:
            try:
                counters = self._local.counters
            except AttributeError:
                counters = self._counters_for_this_thread()
            counters.retries += 1
            calls = counters.in_publish
            if calls is None:
                return  # a reconnect outside a publish (kombu keeps the errback in transport_options)
            calls += 1
            counters.in_publish = calls
            allowed = counters.allowed
            if allowed is not None and calls > allowed and not counters.over:
                counters.over = True  # once per publish, while it still retries
                counters.exceeded += 1
        except Exception:
            self._internal_error("errback")

    def _internal_error(self, stage: str) -> None:
        try:
            with self._lock:
                self.hook_errors[stage] = self.hook_errors.get(stage, 0) + 1
        except Exception:
            pass

    # ------------------------------------------------------------ reading
    def totals(self) -> _Counters:
        """The sum over this process's threads (those that ended are folded in for good)."""
        total = _Counters(len(self.bounds) + 1)
        with self._lock:
            live = []
            for ref, counters in self._threads:
                thread = ref()
                if thread is None or not thread.is_alive():
                    counters.add_to(self._base)
                else:
                    live.append((ref, counters))
            self._threads = live
            self._base.add_to(total)
            for _, counters in live:
                counters.add_to(total)
        return total

    @property
    def publishes(self) -> int:
        return self.totals().publishes

    def snapshot(self) -> dict:
        """The cumulative totals, as shipped (fields of the event without the envelope)."""
        total = self.totals()
        with self._lock:
            hook_errors = dict(self.hook_errors)
        return {
            "publishes": total.publishes,
            "retries": total.retries,
            "retry_policy_exceeded": total.exceeded,
            "failures": total.failures,
            "hook_errors": hook_errors,
            "duration": {"bounds": list(self.bounds), "counts": total.counts, "sum": total.sum},
        }

    def event(self) -> dict:
        from celery.utils.time import utcoffset

        return {
            "type": EVENT_TYPE,
            "hostname": self.publisher,
            "timestamp": time.time(),
            "utcoffset": utcoffset(),
            "pid": os.getpid(),
            "clock": 0,
            "format": FORMAT,
            "instance": self.instance,
            "interval": self.interval,
            "started": self.started_at,
            **self.snapshot(),
        }

    # ------------------------------------------------------------ shipping
    def _start_thread(self) -> None:
        with self._lock:  # held briefly, never across network I/O
            if self._thread is not None:
                return
            thread = threading.Thread(target=_run, args=(weakref.ref(self), self._stop, self.interval),
                                      name="celery-health-exporter-publisher", daemon=True)
            self._thread = thread
        thread.start()

    def ship(self) -> bool:
        """Send the totals now. False (and counted in hook_errors["ship"]) when the broker is unreachable."""
        try:
            with self._ship_lock:
                self._link.publish(self.event(), ROUTING_KEY, self.publisher)
                self.shipped += 1
            return True
        except Exception:
            self._internal_error("ship")
            return False

    flush = ship

    def stop(self, flush: bool = True, timeout: float = 5.0) -> None:
        """Stop the thread (and send the totals one last time)."""
        self._stop.set()
        thread = self._thread
        if isinstance(thread, threading.Thread) and thread is not threading.current_thread():
            thread.join(timeout)
        if flush and thread is not None:
            self.ship()
        self._link.close()

    def _at_exit(self) -> None:
        if self._thread is not None and not self._stop.is_set():
            self.stop(flush=True, timeout=1.0)


def _call(ref, method: str) -> None:
    hook = ref()
    if hook is not None:
        try:
            getattr(hook, method)()
        except Exception:
            pass


def _run(ref, stop: threading.Event, interval: float) -> None:
    """The shipping loop; holds the hook weakly so that it can be collected."""
    while not stop.wait(interval):
        hook = ref()
        if hook is None:
            return
        hook.ship()
        del hook


def install(app, interval: float = 15, publisher: str | None = None, **options) -> PublisherHook | None:
    """Count the publishes of ``app`` in this process and ship them every ``interval`` seconds.

    ``publisher`` is the label the exporter shows (default: this host's name;
    never a process id: a gunicorn pool's processes add up under one label).
    Options: ``buckets`` (duration histogram bounds, seconds), ``connect_timeout``,
    ``flush_at_exit``. Calling it again for the same app returns the same hook
    (``instrument`` is this function under its first name).
    Never raises: on an internal error it logs one warning and returns None.
    """
    try:
        existing = getattr(app, _ATTR, None)
        if existing is not None:
            return existing
        hook = PublisherHook(app, interval=interval, publisher=publisher, **options).install()
        setattr(app, _ATTR, hook)
        return hook
    except Exception as exc:  # the application must start whatever happens here
        log.warning("celery-health-exporter publisher hook not installed: %s: %s", type(exc).__name__, exc)
        return None


instrument = install  # the name of the first releases
