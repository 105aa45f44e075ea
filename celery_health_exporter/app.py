"""Wiring: the state, the sources and the HTTP server, started and stopped together."""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import threading
import time

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from . import __version__
from .broker import make_app
from .bugs import ContainedBugs
from .findings import diagnose
from .http import serve
from .metrics import StateCollector
from .sources import build_sources
from .state.cardinality import CardinalityCaps
from .state.flower import FlowerState
from .state.model import ClusterState

log = logging.getLogger("celery_health_exporter")
TICK_INTERVAL = 1.0
STOP_TIMEOUT = 3.0
# A scrape at 25,000 task flows builds tens of thousands of short-lived containers. With
# the interpreter's default first-generation threshold (700) they are collected while
# still alive, promoted, and every few scrapes a full collection walks the whole model
# (~100 ms with the GIL held: probes and event intake stop). Collecting the youngest
# generation every 10,000 allocations lets them die young instead (benchmarks/probes.py).
GC_THRESHOLDS = (10_000, 10, 10)
# Python hands the GIL from thread to thread every 5 ms by default: while a render and event
# intake are busy, a probe on the event loop waits several such turns. 1 ms keeps probes
# prompt for a little throughput (benchmarks/probes.py --compare measures both).
GIL_SWITCH_INTERVAL = 0.001


def build_state(config) -> ClusterState:
    state = ClusterState(
        worker_timeout=config.worker_timeout,
        purge_offline_after=config.purge_offline_after,
        runtime_buckets=config.runtime_buckets,
        queue_wait_buckets=config.queue_wait_buckets,
        task_histograms_by_worker=config.task_histograms_by_worker,
        max_tracked_tasks=config.max_tracked_tasks,
        stall_after=config.stall_after,
        lost_task_grace=config.lost_task_grace,
        task_sent_grace=config.task_sent_grace,
        task_sent_hostname=config.task_sent_hostname,
        generic_worker_task_hostname=config.generic_worker_task_hostname,
        unknown_queue=config.default_queue_name,
        caps=CardinalityCaps.from_config(config),
    )
    state.beat.timeout = config.beat_timeout
    state.beat.missed_grace = config.beat_missed_grace
    if config.flower_metrics:
        state.flower = FlowerState(state)  # follows the model's event handlers; rendered by metrics.flower
    return state


def internal_errors(sources, *others: ContainedBugs) -> dict[str, int]:
    """The bugs contained so far per source, as celery_exporter_internal_errors_total counts them;
    ``others``: those of the parts that are not sources (the collector's "scrape", the ticker's "tick")."""
    counts = {source.name: source.bugs.count for source in sources}
    counts.update((bugs.owner, bugs.count) for bugs in others)
    return counts


def diagnose_now(state, config, now: float | None = None, errors: dict[str, int] | None = None) -> list:
    """The findings of the moment (the status page, /api/findings and doctor share it);
    ``errors`` from internal_errors(). Only reads: the ticker moves the state in time.
    Blocks on the state lock: never call it from the event loop (the HTTP handlers run it
    in a thread)."""
    now = time.time() if now is None else now
    with state.lock:
        return diagnose(state, now, hint_after=config.no_task_events_hint_after, internal_errors=errors)


class Ticker:
    """The timer of the model's time-driven transitions (``ClusterState.tick``): a worker
    that went silent goes down on time even when nobody scrapes. A thread, not an
    asyncio task, because the event loop never takes the state lock."""

    def __init__(self, state, interval: float = TICK_INTERVAL):
        self.state = state
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-ticker", daemon=True)
        self.bugs = ContainedBugs(log, "tick")

    def start(self) -> "Ticker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.state.lock:
                    self.state.tick(time.time())
            except Exception as exc:  # a bug: the next tick tries again
                self.bugs.record(exc, "moving the model in time", "the rest of this tick skipped")


class Exporter:
    def __init__(self, config, listen_socket: socket.socket):
        self.config = config
        self.listen_socket = listen_socket
        self.version = __version__
        self.state = build_state(config)
        self.celery_app = make_app(config)
        self.sources = build_sources(config, self.state, self.celery_app)
        self.ticker = Ticker(self.state)
        self.collector = StateCollector(self.state, self.sources, prefix=config.metric_prefix,
                                        static_labels=config.static_labels, other_bugs=(self.ticker.bugs,))
        # The registry holds only the standard process and platform metrics; the
        # collector's own families are rendered by it directly (see http.metrics).
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    @property
    def ready(self) -> tuple[bool, str]:
        """Ready when every essential source works (the events source, or in
        host-only mode the host agent); a broker poller that is down does not
        make the exporter unready, it shows in celery_exporter_source_up."""
        essential = [s for s in self.sources if s.essential] or self.sources
        for source in essential:
            if not source.health.up:
                what = "events source not consuming" if source.name == "events" else f"{source.name} source down"
                return False, f"{what}: {source.health.reason}"
        return (True, "ok") if essential else (False, "no source enabled")

    def findings(self) -> list:
        return diagnose_now(self.state, self.config, errors=internal_errors(self.sources, self.collector.bugs,
                                                                         *self.collector.other_bugs))

    async def run(self) -> int:
        gc.set_threshold(*GC_THRESHOLDS)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for source in self.sources:
            source.start()
        self.ticker.start()
        runner = await serve(self, self.listen_socket)
        log.info("celery-health-exporter %s listening on %s:%d, broker %s", self.version,
                 self.config.listen_host, self.config.listen_port, self.config.masked_broker_url)
        await stop.wait()
        log.info("stopping")
        await asyncio.gather(
            asyncio.wait_for(runner.cleanup(), STOP_TIMEOUT),
            asyncio.to_thread(self.ticker.stop),
            *(asyncio.to_thread(source.stop) for source in self.sources),
            return_exceptions=True,
        )
        return 0
