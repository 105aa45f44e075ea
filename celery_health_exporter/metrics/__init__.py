"""Every metric the exporter serves, defined once, rendered from state at scrape time.

Each area module (``tasks``, ``workers``, ``exporter_self``...) declares its
``DEFINITIONS`` and a ``collect(ctx)`` generator of ``(definition, label
values, value)``; this module turns them into Prometheus families with the
configured prefix and static labels. No value is cached between scrapes, so a
worker or queue that went away leaves no stale series (only escaped label text
is kept, see ``text.LabelCache``).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from prometheus_client.metrics_core import Metric

from .definitions import AREAS, MetricDef, all_definitions
from .text import LabelCache, expand_columns, finite_value, render_families

__all__ = ["MetricDef", "ScrapeContext", "StateCollector", "all_definitions"]

log = logging.getLogger(__name__)


@dataclass
class ScrapeContext:
    """What a collect function may read: the state (lock held), the sources' health, the clock."""

    state: object
    sources: list = field(default_factory=list)
    now: float = 0.0
    nonfinite_dropped: int = 0  # samples the renderer refused so far (see text.render_families)
    _in_flight: tuple | None = None

    @property
    def in_flight(self) -> tuple:
        """The one pass over the in-flight task table, shared by every area of a scrape."""
        if self._in_flight is None:
            self._in_flight = self.state.in_flight()
        return self._in_flight


class StateCollector:
    """A prometheus_client collector over the cluster state and the sources."""

    def __init__(self, state, sources, *, prefix: str = "celery_", static_labels: dict | None = None):
        self.state = state
        self.sources = sources
        self.prefix = prefix
        self.static_labels = dict(static_labels or {})
        self._labels = LabelCache(self.static_labels)
        self._render_lock = threading.Lock()  # the label cache is one scrape's at a time
        # Non-finite samples left out (celery_exporter_nonfinite_samples_dropped_total): the
        # model cannot hold one, so each is a bug; logged once per family.
        self.nonfinite_dropped = 0
        self._dropped_families: set[str] = set()

    def samples(self):
        """Every (definition, label values, value) of a scrape. The state lock is held
        while the caller consumes it: consume it at once."""
        return expand_columns(self._samples())

    def _samples(self):
        """The same, with the task flows as text.Column samples (what render() takes)."""
        now = time.time()
        ctx = ScrapeContext(self.state, self.sources, now, self.nonfinite_dropped)
        with self.state.lock:
            self.state.expire(now)
            for area in AREAS:
                yield from area.collect(ctx)

    def collect(self) -> Iterator[Metric]:
        families: dict[MetricDef, Metric] = {}
        for definition, label_values, value in self.samples():
            if not finite_value(definition.kind, value):
                self._dropped(self.prefix + definition.name)
                continue
            family = families.get(definition)
            if family is None:
                family = families[definition] = Metric(
                    self.prefix + definition.name, definition.help, definition.kind)
            self._add(family, definition, label_values, value)
        return iter(families.values())

    def render(self, openmetrics: bool = False) -> str:
        """The exposition text of the state's metrics, written directly.

        Same output as prometheus_client's encoders for these families (a test checks
        it), without building a Metric and a Sample object per line: at 1,000 task
        flows that took about a second, under the state lock."""
        with self._render_lock:
            return render_families(self._samples(), self.prefix, self.static_labels, openmetrics, self._labels,
                                   self._dropped)

    def _dropped(self, family: str) -> None:
        """A sample of ``family`` was not finite and is not served (counted; shown from the next scrape)."""
        self.nonfinite_dropped += 1
        if family not in self._dropped_families:
            self._dropped_families.add(family)
            log.warning("dropped a sample of %s whose value is not finite (NaN or infinite): a bug, please "
                        "report it; counted in celery_exporter_nonfinite_samples_dropped_total", family)

    def _add(self, family: Metric, definition: MetricDef, label_values: Iterable, value) -> None:
        labels = dict(zip(definition.labels, label_values))
        if self.static_labels:
            labels = {**self.static_labels, **labels}
        name = family.name
        if definition.kind == "counter":
            family.add_sample(name + "_total", labels, value)
        elif definition.kind == "histogram":
            for le, count in value.cumulative():
                family.add_sample(name + "_bucket", {**labels, "le": le}, count)
            family.add_sample(name + "_count", labels, value.count)
            family.add_sample(name + "_sum", labels, value.sum)
        else:
            family.add_sample(name, labels, value)
