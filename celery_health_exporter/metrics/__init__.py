"""Every metric the exporter serves, defined once, rendered from a snapshot of the state.

Each area module (``tasks``, ``workers``, ``exporter_self``...) declares its
``DEFINITIONS`` and a ``collect(ctx)`` generator of ``(definition, label
values, value)``. A scrape holds the state lock only while the areas copy their
samples (histograms frozen); the text is written after the lock is released,
so event intake and the other scrapers wait for a copy, not for a render
(``text.render_families`` is the one renderer: /metrics, the tests and the
benchmarks all go through it). Like node_exporter's collectors, each area runs
in its own guard: a bug in one leaves the others on the page and shows in
``celery_exporter_scrape_collector_success{collector}``. No value is cached
between scrapes, so a worker or queue that went away leaves no stale series
(only escaped label text is kept, see ``text.LabelCache``).
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field

from ..bugs import ContainedBugs

from .definitions import AREAS, MetricDef, all_definitions
from .exporter_self import COLLECTOR_DURATION, COLLECTOR_SUCCESS, INTERNAL_ERRORS, SCRAPE_DURATION
from .text import Column, LabelCache, expand_columns, render_families

__all__ = ["MetricDef", "ScrapeContext", "StateCollector", "all_definitions"]

log = logging.getLogger(__name__)


@dataclass
class ScrapeContext:
    """What a collect function may read: the state (the collector holds its lock), the
    sources' health, the clock."""

    state: object
    sources: list = field(default_factory=list)
    now: float = 0.0
    nonfinite_dropped: int = 0  # samples the renderer refused so far (see text.render_families)
    _in_flight: tuple | None = None

    @property
    def in_flight(self) -> tuple:
        """The in-flight task table summarised once per scrape, for every area that needs it."""
        if self._in_flight is None:
            self._in_flight = self.state.in_flight()
        return self._in_flight


def _frozen(sample: tuple) -> tuple:
    """A sample that no later event can change: histograms are the state's own
    objects, copied; every other value is already an immutable number or a new list."""
    definition, label_values, value = sample
    if definition.kind != "histogram":
        return sample
    if label_values is None:  # a Column
        return definition, None, Column(value.labels, [h.copy() for h in value.values])
    return definition, label_values, value.copy()


class _CollectionPause:
    """No garbage collection while a render holds its copy of the samples (~30,000 tuples at
    25,000 flows): collected then, they would be promoted as if long-lived, and every few
    scrapes a full collection would walk the whole model with the GIL held. Freed by their
    reference counts as the render ends, they never reach the collector. Process-wide, so
    counted: the collector is back on when the last concurrent render ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = True

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._was_enabled:
                gc.enable()


_collection_paused = _CollectionPause()


def area_name(area) -> str:
    return area.__name__.rsplit(".", 1)[-1]


class StateCollector:
    """The cluster state's and the sources' metrics, as exposition text."""

    def __init__(self, state, sources, *, prefix: str = "celery_", static_labels: dict | None = None,
                 other_bugs: tuple[ContainedBugs, ...] = ()):
        """``other_bugs``: the counts of parts that are neither a source nor a metrics area
        (the ticker), served beside the sources' and the areas' own."""
        self.state = state
        self.sources = sources
        self.prefix = prefix
        self.static_labels = dict(static_labels or {})
        self._labels = LabelCache(self.static_labels)
        self._render_lock = threading.Lock()  # the label cache is one render's at a time
        # Non-finite samples left out (celery_exporter_nonfinite_samples_dropped_total): the
        # model cannot hold one, so each is a bug; logged once per family.
        self.nonfinite_dropped = 0
        self._dropped_families: set[str] = set()
        self.bugs = ContainedBugs(log, "scrape")  # metrics areas whose collect raised
        self.other_bugs = tuple(other_bugs)
        self.last_scrape_seconds: float | None = None

    def snapshot(self) -> list:
        """Every sample of a scrape, copied while the state lock is held (and only then)."""
        now = time.time()
        ctx = ScrapeContext(self.state, self.sources, now, self.nonfinite_dropped)
        samples: list = []
        results: list[tuple[str, bool, float]] = []
        with self.state.lock:
            for area in AREAS:
                started = time.perf_counter()
                try:
                    part = [_frozen(sample) for sample in area.collect(ctx)]
                except Exception as exc:  # a bug in one area must not take the page down
                    self.bugs.record(exc, f"collecting metrics area {area_name(area)}",
                                     f"left out of this scrape (celery_exporter_scrape_collector_success"
                                     f"{{collector={area_name(area)!r}}} is 0)")
                    results.append((area_name(area), False, time.perf_counter() - started))
                    continue
                samples.extend(part)
                results.append((area_name(area), True, time.perf_counter() - started))
        for name, ok, seconds in results:
            samples.append((COLLECTOR_SUCCESS, (name,), 1 if ok else 0))
            samples.append((COLLECTOR_DURATION, (name,), seconds))
        for bugs in (self.bugs, *self.other_bugs):
            samples.append((INTERNAL_ERRORS, (bugs.owner,), bugs.count))
        if self.last_scrape_seconds is not None:
            samples.append((SCRAPE_DURATION, (), self.last_scrape_seconds))
        return samples

    def samples(self):
        """The snapshot with every Column split into one (definition, label values, value) per series."""
        return expand_columns(self.snapshot())

    def render(self, openmetrics: bool = False) -> str:
        """The exposition text of the state's metrics (the state lock is held only for the copy)."""
        started = time.perf_counter()
        with _collection_paused:
            samples = self.snapshot()
            with self._render_lock:
                text = render_families(samples, self.prefix, self.static_labels, openmetrics, self._labels,
                                       self._dropped)
            del samples
        self.last_scrape_seconds = time.perf_counter() - started
        return text

    def _dropped(self, family: str) -> None:
        """A sample of ``family`` was not finite and is not served (counted; shown from the next scrape)."""
        self.nonfinite_dropped += 1
        if family not in self._dropped_families:
            self._dropped_families.add(family)
            log.warning("dropped a sample of %s whose value is not finite (NaN or infinite): a bug, please "
                        "report it; counted in celery_exporter_nonfinite_samples_dropped_total", family)
