"""What every data source shares: a name, a health record, a thread, a clean stop,
and the error model.

A source only reads and translates into the state model; it never renders.

Errors: only the broker's (or the host's) failures to answer are outages — connection,
channel and protocol errors of kombu, py-amqp, redis-py and aiohttp, ``OSError`` and
timeouts (``is_outage``). They mark the source down and it reconnects. Anything else is
a bug in this exporter: logged once with its traceback (per kind and place), counted
in ``celery_exporter_internal_errors_total{source}``, and the source carries on with
the next message or poll, keeping its connection and what it had read.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ..bugs import ContainedBugs


@dataclass
class SourceHealth:
    up: bool = False
    reason: str = "starting"
    last_success: float | None = None
    reconnects: int = 0
    down_since: float | None = None
    failures: int = 0  # failed reads (each retry during an outage counts)
    last_poll_seconds: float | None = None  # polling sources: how long the last poll took


class PollError(Exception):
    """A failure of the broker already put in words for the log and the status page (no secrets)."""


@functools.cache
def _outage_types() -> tuple[type, ...]:
    import aiohttp
    import amqp.exceptions
    import kombu.exceptions
    import psutil
    import redis.exceptions

    return (OSError, TimeoutError, PollError,  # OSError: sockets, TLS, DNS, refused, reset
            amqp.exceptions.AMQPError,  # connection, channel and frame errors, ACCESS_REFUSED, NOT_FOUND
            kombu.exceptions.OperationalError, kombu.exceptions.ConnectionError,
            kombu.exceptions.ChannelError, kombu.exceptions.InconsistencyError,
            redis.exceptions.RedisError,  # connection, timeout, protocol, NOPERM, auth
            aiohttp.ClientError,
            psutil.Error)  # the host's process table cannot be read


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the data cannot be read now (retry), rather than a bug here."""
    return isinstance(exc, _outage_types())


class Source:
    """A background reader with outage bookkeeping: one log line when an outage
    starts and one when it ends, however many retries happen in between."""

    name = "source"
    essential = False  # must be up for /readyz
    stop_timeout = 3.0  # how long stop() waits for the thread (it is a daemon: the process exits anyway)

    def __init__(self):
        self.health = SourceHealth()
        self.log = logging.getLogger(f"celery_health_exporter.sources.{self.name}")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_up_once = False
        self.bugs = ContainedBugs(self.log, self.name)

    # lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_guarded, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(self.stop_timeout if timeout is None else timeout)

    def wake(self) -> None:
        """Interrupt a blocking read so that stop() is quick (sources override)."""

    def run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_guarded(self) -> None:
        """run() contains its own bugs; one that escapes it restarts it (after a pause),
        so that a bug never stops a source for good."""
        backoff = Backoff(first=1.0, ceiling=60.0)
        while not self.stopping:
            try:
                self.run()
                return
            except Exception as exc:
                if self.stopping:
                    return
                self.internal_error(exc, "running")
                self.sleep(backoff.next())

    # errors ---------------------------------------------------------------
    def internal_error(self, exc: BaseException, doing: str) -> None:
        """Count a bug; log it with its traceback the first time it happens at its place."""
        self.bugs.record(exc, doing)

    @contextmanager
    def bugs_contained(self, doing: str):
        """Run a step; a bug in it is counted and skipped, an outage goes up to the caller."""
        try:
            yield
        except Exception as exc:
            if is_outage(exc):
                raise
            self.internal_error(exc, doing)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def sleep(self, seconds: float) -> bool:
        """Wait, returning early (True) when asked to stop."""
        return self._stopping.wait(seconds)

    # health ---------------------------------------------------------------
    def mark_up(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        health = self.health
        if not health.up:
            if self._was_up_once:
                health.reconnects += 1
                outage = now - health.down_since if health.down_since else 0.0
                self.log.info("%s: recovered after %.1fs", self.name, outage)
            else:
                self.log.info("%s: connected", self.name)
            self._was_up_once = True
            health.up = True
            health.reason = "ok"
            health.down_since = None
        health.last_success = now

    def mark_down(self, reason: str, now: float | None = None) -> None:
        health = self.health
        health.failures += 1
        if health.up or health.down_since is None:
            self.log.warning("%s: down: %s (retrying in the background; logged once per outage)",
                             self.name, reason)
            health.down_since = time.time() if now is None else now
        health.up = False
        health.reason = reason

    def describe(self) -> str:
        """One line for the status page: what this source reads from."""
        return ""


class Backoff:
    """1, 2, 4 ... seconds up to a ceiling; reset after a success."""

    def __init__(self, first: float = 1.0, ceiling: float = 10.0):
        self.first, self.ceiling = first, ceiling
        self.current = first

    def next(self) -> float:
        delay = self.current
        self.current = min(self.ceiling, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.first
