"""What every data source shares: a name, a health record, a thread, a clean stop.

A source only reads and translates into the state model; it never renders.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass


@dataclass
class SourceHealth:
    up: bool = False
    reason: str = "starting"
    last_success: float | None = None
    reconnects: int = 0
    down_since: float | None = None


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
        try:
            self.run()
        except Exception as exc:  # a bug must not kill the thread silently
            self.log.error("source %s stopped on an unexpected error: %s: %s", self.name, type(exc).__name__, exc)
            self.mark_down(f"crashed: {type(exc).__name__}")

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
