"""What every broker poller shares: which queues count, the poll loop, the hand-over to the state.

A broker module subclasses ``QueuePoller`` and implements ``poll()`` (return a
complete ``QueuesSnapshot`` or raise) and ``close()``; the loop, the outage
bookkeeping and the dropping of stale values are here. A third broker (SQS,
say) is one more module and one more line in ``sources/__init__.py``.
"""
from __future__ import annotations

import re
import time
from typing import Callable

from ..logs import describe_error
from ..state.queues import QueuesSnapshot
from .base import PollError, Source, is_outage  # PollError: re-exported for the pollers

# Celery's own plumbing, never task queues: event receivers (celeryev.<uuid>, ours too),
# remote-control mailboxes (<node>.celery.pidbox, <uuid>.reply.celery.pidbox), server-named
# queues (amq.gen-...), the rpc:// result backend's reply queues (a bare uuid) and, with
# quorum queues (Celery 5.5+), the native delayed delivery's celery_delayed_0..27 (optionally
# prefixed): they hold countdown/ETA tasks with no consumer by design, never a black hole.
INTERNAL_QUEUES = re.compile(
    r"celeryev\..*|.*\.pidbox|amq\..*|(.+_)?celery_delayed_\d+"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
)


def queue_filter(include: str = "", exclude: str = "") -> Callable[[str], bool]:
    """The one rule that decides which queues are reported, for every broker:
    Celery's internal queues never; then ``--queue-include`` / ``--queue-exclude``,
    regexes matched against the whole name (anchored, like Prometheus relabelling)."""
    included = re.compile(include) if include else None
    excluded = re.compile(exclude) if exclude else None

    def accept(name: str) -> bool:
        if not name or INTERNAL_QUEUES.fullmatch(name):
            return False
        if included is not None and not included.fullmatch(name):
            return False
        return not (excluded is not None and excluded.fullmatch(name))

    return accept


class QueuePoller(Source):
    """Polls the broker every ``--broker-poll-interval`` seconds in its own thread."""

    kind = ""
    missing = ""  # what this broker or mode cannot tell, said once in the log and on /

    def __init__(self, config, state, app):
        super().__init__()
        self.config = config
        self.state = state
        self.app = app
        self.interval = config.broker_poll_interval
        self.accept = queue_filter(config.queue_include, config.queue_exclude)
        with state.lock:
            state.broker.configure(kind=self.kind, broker=config.masked_broker_url, accept=self.accept,
                                   missing=self.missing)

    # subclasses -----------------------------------------------------------
    def poll(self) -> QueuesSnapshot:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (after a failure too: the next poll reconnects)."""

    # the loop -------------------------------------------------------------
    def run(self) -> None:
        if self.missing:
            self.log.warning("%s: %s", self.name, self.missing)
        try:
            while not self.stopping:
                started = time.monotonic()
                self.poll_once()
                self.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            self._close_quietly()

    def poll_once(self) -> bool:
        """One poll; its result replaces the last one, or the values are dropped (never
        served stale). A broker failure is an outage (reconnect); a bug is counted and
        the connection kept."""
        started = time.monotonic()
        try:
            snapshot = self.poll()
        except Exception as exc:
            if self.stopping:
                return False
            if is_outage(exc):
                reason = str(exc) if isinstance(exc, PollError) else describe_error(exc)
                self.mark_down(reason)
                self._close_quietly()
            else:
                self.internal_error(exc, "polling the broker")
                reason = f"internal error: {type(exc).__name__} (a bug, see the log)"
            with self.state.lock:
                self.state.broker.fail(reason)
            return False
        finally:
            self.health.last_poll_seconds = time.monotonic() - started
        with self.state.lock:
            self.state.broker.replace(snapshot)
        self.mark_up()
        return True

    def mark_down(self, reason: str, now: float | None = None) -> None:
        # One line per change of state: the start of an outage (base class), and a
        # change of cause during one (401 fixed, now a timeout), never one per retry.
        health = self.health
        if not health.up and health.down_since is not None and reason != health.reason:
            self.log.warning("%s: still down, now: %s", self.name, reason)
        super().mark_down(reason, now)

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception:  # already failing or stopping; nothing to add
            pass

    def describe(self) -> str:
        return self.missing
